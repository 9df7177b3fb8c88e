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


def test_a_fixed_budget_and_density_plan_the_lossy_mode_without_a_floor_search(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(reproduction, "RESULTS", tmp_path)
    monkeypatch.setattr(reproduction, "find_floor",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("searched")))
    assert reproduction.main(["--quick", "--workloads", "lm", "--modes", "all",
                              "--lowering", "eager", "--time-limit", "1", "--budget", "lm=64",
                              "--density", "lm=0.5", "--out", "fixed"]) == 0
    row = json.loads((tmp_path / "fixed.json").read_text())["runs"][0]
    assert row["status"] == "ok", row.get("traceback")
    assert row["floor"] is None and row["budget"] == 64 * 2**20
    assert row["forced"] == {"sparse_density": 0.5, "precision": "bf16"}
    assert row["bf16"] and abs(row["density"] - 0.5) < 0.01
    assert row["measured_peak"] <= row["budget"]
    assert "planned at a budget of 64.0 MiB" in (tmp_path / "fixed.md").read_text()
