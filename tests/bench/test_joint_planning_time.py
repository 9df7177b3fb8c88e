"""bench/joint_planning_time.py's bookkeeping (nothing planned): phases charged exclusive time,
and a before/after pair compared point by point in the Markdown."""

import time
import types

from bench import joint_planning_time as jpt

MiB = 2**20


def test_a_phase_is_charged_its_time_less_its_timed_callees():
    timer = jpt.PhaseTimer()
    inner = timer.wrap("inner", lambda: time.sleep(0.05))

    def outer_fn():
        time.sleep(0.02)
        inner()

    outer = timer.wrap("outer", outer_fn)
    outer()
    assert timer.calls == {"outer": 1, "inner": 1}
    assert 0.045 < timer.seconds["inner"] < 0.2
    assert 0.015 < timer.seconds["outer"] < 0.045  # the inner call's time is not its own


def test_install_wraps_and_uninstall_restores(monkeypatch):
    module = types.ModuleType("fake_module")
    module.f = lambda: 1
    monkeypatch.setitem(__import__("sys").modules, "fake_module", module)
    original = module.f
    timer = jpt.PhaseTimer()
    missing = timer.install([("f", "fake_module", "f"), ("g", "fake_module", "g")])
    assert missing == ["fake_module.g"] and module.f is not original and module.f() == 1
    timer.uninstall()
    assert module.f is original and timer.calls == {"f": 1}


def _run(seconds, peak):
    point = dict(k=1, precision="fp32", density=None, peak=peak, seconds=0.5, fits=True,
                 floor=peak // 2, recomputed=3)
    return {"date": "d", "command": "c", "torch": "t", "cpu": "x", "cores": 2, "threads": 2,
            "load_before": [1.0, 1.0, 1.0], "load_after": [1.0, 1.0, 1.0],
            "parameters": 123_800_000, "seconds": seconds, "cpu_seconds": seconds,
            "config": dict(batch=8, seq=256, budget=3 * 2**30, floors=True,
                           levers=["recompute"], search="all"),
            "phases": {"solves": seconds}, "calls": {"solves": 1}, "points": [point],
            "chosen": "whole batch", "floor": peak // 2, "skipped": []}


def test_the_markdown_compares_a_before_with_its_after(tmp_path):
    runs = {"before-x": _run(10.0, 100 * MiB), "after-x": _run(5.0, 100 * MiB),
            "after-y": _run(3.0, 90 * MiB)}
    path = tmp_path / "r.md"
    jpt.write_markdown(runs, path, notes="## notes\n\nhow")
    text = path.read_text()
    assert "## before-x against after-x" in text and "(2.0x)" in text
    assert "1 of 1 points identical" in text
    assert "before-x against after-y" not in text and "## notes" in text
