"""bench/reproduction.py runs end to end on tiny sizes: eager against fxmem's plan at its floor
(plus a margin), the step measured and trained, the results written (tables, JSON, plot)."""

import json

from bench import reproduction


def test_reproduction_quick_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduction, "RESULTS", tmp_path)
    assert reproduction.main(["--quick", "--workloads", "lm", "--modes", "eager,exact",
                              "--lowering", "eager", "--time-limit", "1",
                              "--out", "smoke"]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    rows = {r["mode"]: r for r in data["runs"]}
    assert set(rows) == {"eager", "exact"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    eager, exact = rows["eager"], rows["exact"]
    assert eager["measured_peak"] > 0 and eager["steps"] == 2 and "val_loss" in eager
    assert exact["budget"] >= exact["floor"]["floor"] and exact["predicted_peak"] > 0
    assert exact["reduction"] == eager["measured_peak"] / exact["measured_peak"]
    md = (tmp_path / "smoke.md").read_text()
    assert md.count("Command: `python bench/reproduction.py --quick") == 1
    assert "| lm | exact |" in md and "## Training on real data" in md
    assert (tmp_path / "smoke.png").stat().st_size > 0
