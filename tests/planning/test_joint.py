"""The joint planner (fxmem.planning.joint): every combination of the allowed levers' settings
planned under one budget, the Pareto front, the choice, the floor; ``fxmem plan --alternatives``
end to end on a Hugging Face GPT-2 built from a config."""

import sys
import textwrap

import pytest
import torch

from fxmem.planning.joint import (JointPoint, choose, explore, format_alternatives,
                                  pareto_front, plot_pareto)
from tests.helpers import make_tiny_gpt

FAST = dict(lowering="eager", time_limit=1.0, progress=False)


def _tiny():
    """A tiny GPT whose weights hold most of its step: the sparse lever's floor is far under
    the exact one."""
    model, args, _ = make_tiny_gpt(n_layer=2, seq=16, batch=2, vocab=128, d_model=64)
    return model, args, torch.optim.AdamW(model.parameters())


class _Calls:
    """Counts the calls of the functions it wraps (installed with a MonkeyPatch)."""

    def __init__(self, monkeypatch, *targets):
        self.n = {}
        for owner, name in targets:
            fn = getattr(owner, name)

            def counted(*a, _fn=fn, _name=name, **kw):
                self.n[_name] = self.n.get(_name, 0) + 1
                return _fn(*a, **kw)

            monkeypatch.setattr(owner, name, counted)


@pytest.fixture(scope="module")
def floors():
    """Every combination of (recompute, sparse at density 0.1) under a 1-byte budget: none fits,
    so each one's floor comes from its BudgetError; and what the model held before; and how many
    times the step was captured and the model sparsified."""
    from fxmem.api.optimize import OptimizedModule
    from fxmem.levers.sparse import fallback

    model, args, opt = _tiny()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [list(g["params"]) for g in opt.param_groups]
    with pytest.MonkeyPatch.context() as mp:
        calls = _Calls(mp, (OptimizedModule, "_plan_once"), (fallback, "_sparsify_in_place"))
        e = explore(model, *args, budget=1, allow=("recompute", "sparse"), densities=(0.1,),
                    optimizer=opt, **FAST)
    return model, args, opt, e, (params, state, groups), calls.n


def test_the_floor_is_the_smallest_of_every_combination(floors):
    *_, e, _, _ = floors
    assert e.chosen is None and len(e.points) == 2
    assert all(p.floor is not None and not p.fits for p in e.points)
    assert e.floor == min(p.floor for p in e.points)
    dense, sparse = sorted(e.points, key=lambda p: p.density is not None)
    assert dense.exact and not sparse.exact and sparse.density == 0.1
    assert e.floor == sparse.floor < 0.6 * dense.floor  # the weights shrink
    # a point that does not fit is its combination planned with no limit: nothing recomputed
    assert all(p.peak > e.budget and p.recomputed == 0 for p in e.points)


def test_the_users_model_and_optimizer_are_left_as_they_were(floors):
    model, _, opt, _, (params, state, groups), _ = floors
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert all(a is b for a, b in zip(model.parameters(), params.values()))
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert not hasattr(model, "sparsity")


def test_a_budget_only_a_lossy_combination_meets_picks_it(floors):
    model, args, opt, e0, _, _ = floors
    exact = next(p for p in e0.points if p.exact)
    budget = (exact.floor + e0.floor) // 2  # under the exact floor, well over the sparse one
    e = explore(model, *args, budget=budget, allow=("recompute", "sparse"), densities=(0.1,),
                optimizer=opt, floors=False, **FAST)
    assert e.chosen is not None and not e.chosen.exact and e.chosen.density == 0.1
    assert e.chosen.fits and e.chosen.peak <= budget
    assert [p.fits for p in e.points if p.exact] == [False]
    assert e.chosen in e.front


class _Bar:
    """A stand-in for the tqdm bar: what its total and count were."""

    def __init__(self, total):
        self.total, self.n, self.totals = total, 0, [total]

    def update(self, n):
        self.n += n

    def refresh(self):
        self.totals.append(self.total)

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def test_exact_is_chosen_over_lossy_when_both_fit(monkeypatch):
    from fxmem.planning import joint

    bars = []
    monkeypatch.setattr(joint, "_bar", lambda progress, total: bars.append(_Bar(total))
                        or bars[-1])
    model, args, opt = _tiny()
    e = explore(model, *args, budget=10**9, allow=("recompute", "microbatch", "precision"),
                optimizer=opt, floors=False, **FAST)
    assert {p.precision for p in e.points} == {"fp32", "bf16"}
    assert all(p.fits and p.microbatches == 1 and not p.recomputed for p in e.points)
    assert e.chosen.exact
    # k=1 fits with nothing recomputed: a larger k is only slower
    assert any("k > 1 not planned" in s for s in e.skipped)
    assert e.floor is None  # the floors of combinations that fit were not searched
    assert e.optimize_kwargs() == dict(allow=("recompute",), microbatches=None, precision=None,
                                       sparse_density=None)
    # search="needed": an exact combination fits, so the lossy ones are not planned; the same
    # choice
    needed = explore(model, *args, budget=10**9, allow=("recompute", "microbatch", "precision"),
                     optimizer=opt, floors=False, search="needed", **FAST)
    assert [p.precision for p in needed.points] == ["fp32"] and needed.chosen == e.chosen
    # its progress bar counted the tier it planned (fp32, each k), not bf16's too, and ended full
    assert bars[-1].total == bars[-1].n == bars[0].total // 2
    assert bars[0].total == bars[0].n
    assert any("bf16 compute: not planned (search='needed'" in s for s in needed.skipped)
    assert needed.floor is None


def test_each_combination_is_captured_once_and_each_density_sparsified_once(floors):
    *_, e, _, calls = floors
    # a combination over the budget: planned under it (its floor) and with no limit, from one
    # capture; the density's combinations share one sparsified copy of the model
    assert len(e.points) == 2 and calls == {"_plan_once": 2, "_sparsify_in_place": 1}


def test_replanning_a_capture_gives_what_planning_from_scratch_gives(monkeypatch):
    """k=2 under a 1-byte budget: its point's floor and no-limit peak, from one capture and one
    batch analysis, equal two fresh plans' (a 1-byte budget and none)."""
    import fxmem
    from fxmem.budget import BudgetError
    from fxmem.levers.microbatch import lever

    model, args, _ = make_tiny_gpt(n_layer=1, seq=16, batch=2, vocab=64, d_model=32)
    calls = _Calls(monkeypatch, (lever, "capture_step"))
    e = explore(model, *args, budget=1, allow=("recompute", "microbatch"), **FAST)
    assert [p.microbatches for p in e.points] == [1, 2] and not any(p.fits for p in e.points)
    assert calls.n == {"capture_step": 1}  # the whole batch's analysis, shared by k=2's plans
    split = e.points[1]
    fresh = dict(lowering="eager", time_limit=1.0, allow=("recompute",), microbatches=2)
    with pytest.raises(BudgetError) as err:
        fxmem.optimize(model, 1, **fresh).plan_for(*args)
    assert split.floor == err.value.floor
    unlimited = fxmem.optimize(model, 2**62, **fresh).plan_for(*args)
    assert (split.peak, split.recomputed) == (unlimited.predicted_peak,
                                              len(unlimited.record.recomputed))


def _p(seconds, *, peak=100, precision="fp32", density=None, fits=True, k=1):
    return JointPoint(k, precision, density, peak, seconds, fits)


def test_the_choice_rule_and_the_front():
    exact, bf16, sparse = _p(1.0), _p(0.995, precision="bf16"), _p(0.9, density=0.5)
    # within 1%, exact beats lossy; lossy only when no exact point fits
    assert choose([exact, bf16]) is exact
    assert choose([exact, sparse]) is exact  # faster, but exact fits
    assert choose([_p(1.0, fits=False), bf16, sparse]) is sparse  # the fastest lossy
    assert choose([_p(1.0, fits=False), bf16, _p(0.99, density=0.5)]) is bf16  # least lossy
    assert choose([_p(1.0, fits=False)]) is None
    # prefer="time": lossy points compete on time; ties (1%) still go to the less lossy
    assert choose([exact, sparse], prefer="time") is sparse
    assert choose([exact, bf16], prefer="time") is exact
    assert choose([_p(0.5, fits=False), exact], prefer="time") is exact
    with pytest.raises(ValueError, match="prefer"):
        choose([exact], prefer="fast")
    points = [exact, bf16, sparse, _p(2.0, peak=50, k=2), _p(3.0, peak=60, k=4),
              _p(0.5, peak=500, fits=False)]
    front = pareto_front(points)
    assert _p(3.0, peak=60, k=4) not in front  # k=2 is smaller and faster, and as exact
    assert exact in front and _p(0.5, peak=500, fits=False) in front
    for p in front:
        assert not any(q.peak <= p.peak and q.seconds <= p.seconds and q.lossiness <= p.lossiness
                       and q != p for q in points)


def test_the_front_holds_the_chosen_point_and_the_table_and_png_are_written(floors, tmp_path):
    model, args, opt, e0, _, _ = floors
    budget = int(1.02 * max(p.peak for p in e0.points))  # every combination fits
    e = explore(model, *args, budget=budget, allow=("recompute", "sparse"), densities=(0.1,),
                optimizer=opt, floors=False, **FAST)
    assert e.chosen.exact and e.chosen in e.front
    for p in e.front:
        assert not any(q is not p and q.peak <= p.peak and q.seconds <= p.seconds
                       and q.lossiness <= p.lossiness
                       and (q.peak, q.seconds, q.lossiness) != (p.peak, p.seconds, p.lossiness)
                       for q in e.points)
    table = format_alternatives(e)
    lines = table.splitlines()
    assert "predicted peak" in lines[1] and "predicted time" in lines[1]
    assert lines[3].startswith("*") and "exact" in lines[3]  # the chosen, first
    assert "density 0.1" in table and "lossy" in table
    png = plot_pareto(e, tmp_path / "front.png")
    assert png.stat().st_size > 10_000


FACTORY = """
    import torch
    import transformers

    def make():
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32,
                                         vocab_size=128)
        model = transformers.GPT2LMHeadModel(config).train()
        ids = torch.randint(0, 128, (2, 32))
        return {"model": model, "kwargs": {"input_ids": ids, "labels": ids}, "name": "hf-gpt2",
                "optimizer": torch.optim.AdamW(model.parameters())}
"""


def test_fxmem_plan_prints_the_alternatives_and_writes_the_front(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from fxmem.api.cli import main

    (tmp_path / "hf_joint_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    png = tmp_path / "pareto.png"
    try:
        assert main(["plan", "hf_joint_factory:make", "--budget", "90%", "--lowering", "eager",
                     "--allow", "recompute,microbatch,precision", "--time-limit", "1",
                     "--alternatives", "--pareto", str(png)]) == 0
    finally:
        sys.modules.pop("hf_joint_factory", None)
    captured = capsys.readouterr()
    out = captured.out
    assert "fxmem: planning combinations" in captured.err  # the progress bar (tqdm), on stderr
    assert "chosen by the joint planner:" in out and "(exact)" in out
    report, table = out.split("alternatives under", 1)
    assert "measured peak" in report and "within budget" in report
    assert "predicted time" in table and "bf16 compute" in table and "\n*" in table
    assert f"Pareto front: {png}" in out and png.stat().st_size > 10_000


def test_search_needed_needs_the_exact_preference():
    model, args, opt = _tiny()
    with pytest.raises(ValueError, match="prefer='exact'"):
        explore(model, *args, budget=10**9, search="needed", prefer="time", **FAST)
