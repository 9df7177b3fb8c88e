import json
import sys
import textwrap

import pytest

import fxmem
from fxmem.api.cli import main
from fxmem.budget import format_bytes


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_workload.py").write_text(textwrap.dedent("""
        import torch, torch.nn as nn, torch.nn.functional as F

        def make():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
            x, y = torch.randn(128, 32), torch.randint(0, 4, (128,))
            return dict(model=model, args=(x,), loss_fn=lambda m, x: F.cross_entropy(m(x), y),
                        optimizer=torch.optim.Adam(model.parameters()))

        def no_loss():
            return (nn.Linear(4, 4), (torch.randn(2, 4),))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiny_workload"
    sys.modules.pop("tiny_workload", None)


def test_estimate_prints_a_table_and_writes_a_plot_and_json(factory_module, tmp_path, capsys):
    png, js = tmp_path / "m.png", tmp_path / "m.json"
    assert main(["estimate", f"{factory_module}:make", "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    for line in ("predicted peak", "measured peak", "saved activations", "optimizer state", "error"):
        assert line in out
    assert png.stat().st_size > 10_000
    record = json.loads(js.read_text())
    assert record["measured_peak"] > 0
    assert abs(record["predicted_peak"] - record["measured_peak"]) / record["measured_peak"] < 0.01


def test_bad_factory_and_bad_model_are_clear_errors(factory_module, capsys):
    assert main(["estimate", "no_such_module_xyz:make"]) == 2
    assert "cannot import module" in capsys.readouterr().err
    assert main(["estimate", f"{factory_module}:nope"]) == 2
    assert "has no callable 'nope'" in capsys.readouterr().err
    assert main(["estimate", f"{factory_module}:no_loss", "--no-measure"]) == 2
    assert "the loss must be a scalar tensor" in capsys.readouterr().err


def test_plan_runs_the_step_under_the_budget(factory_module, capsys):
    assert main(["plan", f"{factory_module}:make", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "\nwithin budget   yes\n" in out
    assert main(["plan", f"{factory_module}:make", "--budget", "2KiB"]) == 2
    assert "smallest feasible budget" in capsys.readouterr().err


def test_demo_plans_under_a_relative_budget_measures_and_plots(tmp_path, monkeypatch, capsys):
    """`make demo`'s path (`fxmem plan ... --budget 70% --plot`) on a smaller demo GPT + Adam:
    the unoptimised step and the planned one run and are measured, the summary's numbers agree
    with the JSON, the measured peak is within the budget, and the before/after PNG is written."""
    (tmp_path / "small_demo.py").write_text(textwrap.dedent("""
        from fxmem.examples import demo_workload

        def small():
            return demo_workload(n_layer=2, d_model=64, n_head=2, vocab_size=512, batch=4, seq=32)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    png, js = tmp_path / "plan.png", tmp_path / "plan.json"
    try:
        assert main(["plan", "small_demo:small", "--budget", "90%", "--plot", str(png),
                     "--json", str(js)]) == 0
    finally:
        sys.modules.pop("small_demo", None)
    out = capsys.readouterr().out
    record = json.loads(js.read_text())
    keys = ("budget", "predicted peak", "measured peak", "within budget", "recomputed")
    rows = {key: line[len(key):].strip() for line in out.splitlines() for key in keys
            if line.startswith(key + "  ")}  # the summary's rows (the report's lines differ)
    assert set(rows) == set(keys)
    assert rows["budget"].startswith(format_bytes(record["budget"]) + " (90% of the unoptimised")
    assert rows["predicted peak"] == format_bytes(record["predicted_peak"])
    assert rows["measured peak"] == (f"{format_bytes(record['measured_peak'])} "
                                     f"({record['measured_peak']} bytes)")
    assert rows["within budget"] == "yes" and record["within_budget"]
    assert record["budget"] == int(0.9 * record["unoptimized_peak"])
    assert record["measured_peak"] <= record["budget"] < record["unoptimized_measured_peak"]
    assert record["predicted_peak"] <= record["budget"]
    assert record["recomputed"] and rows["recomputed"].startswith(f"{len(record['recomputed'])} ")
    assert png.stat().st_size > 10_000


def test_relative_budgets_are_read_by_the_cli_only(capsys):
    from fxmem.api.cli import _relative_budget

    assert _relative_budget("55%") == 0.55 and _relative_budget(" 60.5% ") == 0.605
    assert _relative_budget("2GiB") is None
    for bad in ("0%", "-5%", "x%"):
        with pytest.raises(fxmem.BudgetError, match="percentage of the unoptimised peak"):
            _relative_budget(bad)
    with pytest.raises(fxmem.BudgetError):  # the library's budgets stay absolute
        fxmem.parse_budget("55%")
    assert main(["plan", "no_such_module_xyz:make", "--budget", "abc%"]) == 2
    assert "percentage of the unoptimised peak" in capsys.readouterr().err


def test_plan_prefer_reaches_the_joint_planner_and_is_checked(factory_module, monkeypatch,
                                                                capsys):
    """``--prefer time`` runs the joint planner with that choice (``--prefer`` implies
    ``--alternatives``); with ``--search needed`` it is a usage error, not a traceback."""
    import fxmem.api.cli as cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_explore(ns, workload, budget):
        seen.update(prefer=ns.prefer, search=ns.search, budget=budget)
        raise Stop

    monkeypatch.setattr(cli, "_explore", fake_explore)
    with pytest.raises(Stop):
        cli.main(["plan", f"{factory_module}:make", "--budget", "1GiB", "--prefer", "time"])
    assert seen == {"prefer": "time", "search": "all", "budget": 2**30}
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", f"{factory_module}:make", "--budget", "1GiB", "--prefer", "time",
                  "--search", "needed"])
    assert exc.value.code == 2 and "needs --prefer exact" in capsys.readouterr().err
