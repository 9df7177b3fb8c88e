import json
import sys
import textwrap

import pytest

from fxmem.api.cli import main


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
    assert "predicted peak" in out and "within the budget" in out
    assert main(["plan", f"{factory_module}:make", "--budget", "2KiB"]) == 2
    assert "smallest feasible budget" in capsys.readouterr().err
