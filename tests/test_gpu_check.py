"""bench/gpu_check.py's CPU dry run: the one-shot GPU check's code, end to end, on tiny workloads."""

import json

import pytest

from bench import gpu_check
from bench.workloads import WORKLOADS


@pytest.mark.slow
def test_dry_run_plans_three_budgets_per_workload_within_each(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_dry_run_cpu.md").read_text()
    assert capsys.readouterr().out.count("| wrn_28_2 |") == 3  # the table is printed too
    data = json.loads((tmp_path / "gpu_dry_run_cpu.json").read_text())
    assert data["env"]["dry_run"] and data["env"]["device"] == "cpu"
    assert [r["workload"] for r in data["workloads"]] == list(WORKLOADS)
    for r in data["workloads"]:
        assert "error" not in r, r.get("traceback")
        assert r["floor"] < r["unoptimized_peak"]
        budgets = [row["budget"] for row in r["budgets"]]
        assert len(budgets) == 3 and budgets == sorted(budgets, reverse=True)
        assert budgets[0] == r["unoptimized_peak"]
        for row in r["budgets"]:
            assert "error" not in row and "skipped" not in row, row
            assert row["measured"] <= row["budget"] and row["within_budget"]
            assert row["predicted"] <= row["budget"]
            assert row["grads_ok"] and row["time_ratio"] > 0
        assert r["budgets"][-1]["recomputed"] > 0  # near the floor, something is recomputed
        rows = [line for line in md.splitlines() if line.startswith(f"| {r['workload']} |")]
        assert len(rows) == 3 and all(" | yes | " in line for line in rows)
    assert "9 of 9 runs done (0 skipped at the deadline, 0 failed); 9 within budget" in md


def test_a_passed_deadline_skips_the_work_and_says_so(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--deadline", "0"]) == 0
    md = (tmp_path / "gpu_dry_run_cpu.md").read_text()
    assert md.count("skipped: deadline") == 3 * len(WORKLOADS)
    assert "0 of 9 runs done (9 skipped at the deadline, 0 failed)" in md


def test_help_names_the_one_command(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "python bench/gpu_check.py" in out and "--dry-run" in out and "--deadline" in out
