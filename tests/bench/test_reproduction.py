"""bench/reproduction.py runs end to end on tiny sizes: eager against fxmem's plan at its floor
(plus a margin) and every lever at a fixed budget and density, the step measured and trained,
the results written (tables, JSON, plot)."""

import json

from bench import reproduction


def test_reproduction_quick_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduction, "RESULTS", tmp_path)
    # 'all' at a fixed budget and density (--budget, --density): planned without a floor search
    assert reproduction.main(["--quick", "--workloads", "lm", "--modes", "eager,exact,all",
                              "--lowering", "eager", "--time-limit", "1", "--budget", "lm=64",
                              "--density", "lm=0.5", "--out", "smoke"]) == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    rows = {r["mode"]: r for r in data["runs"]}
    assert set(rows) == {"eager", "exact", "all"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    eager, exact = rows["eager"], rows["exact"]
    assert eager["measured_peak"] > 0 and eager["steps"] == 2 and "val_loss" in eager
    assert exact["budget"] >= exact["floor"]["floor"] and exact["predicted_peak"] > 0
    assert exact["reduction"] == eager["measured_peak"] / exact["measured_peak"]
    md = (tmp_path / "smoke.md").read_text()
    assert md.count("Command: `python bench/reproduction.py --quick") == 1
    assert "| lm | exact |" in md and "## Training on real data" in md
    assert (tmp_path / "smoke.png").stat().st_size > 0
    lossy = rows["all"]
    assert lossy["floor"] is None and lossy["budget"] == 64 * 2**20
    assert lossy["forced"] == {"sparse_density": 0.5, "precision": "bf16"}
    assert lossy["bf16"] and abs(lossy["density"] - 0.5) < 0.01
    assert lossy["measured_peak"] <= lossy["budget"]
    assert "planned at a budget of 64.0 MiB" in md

