"""bench/joint_sweep.py's verdicts on made-up measurements (nothing planned or run): a peak over
its budget and a significant step-time rise are flagged, the planner blamed only when the
predicted time rose too, and the front's ranking checked pair by pair."""

import json
import math

from bench import joint_sweep as js
from fxmem.planning.joint import JointExploration, JointPoint

MiB = 2**20


def plan(peak, seconds, predicted, settings=(1, False, None), recomputed=0):
    return {"measured_peak": peak, "seconds": seconds, "predicted_seconds": predicted,
            "settings": settings, "recomputed": recomputed, "levers": "x",
            "predicted_peak": peak,
            "median_seconds": sorted(seconds)[len(seconds) // 2]}


def test_violation_and_rises_are_flagged():
    rows = [{"budget": 10 * MiB, "optimize": plan(9 * MiB, [1.0] * 9, 1.0, recomputed=5)},
            {"budget": 12 * MiB, "optimize": plan(13 * MiB, [1.2] * 9, 1.1, recomputed=2)},
            {"budget": 14 * MiB, "optimize": plan(13 * MiB, [1.3] * 9, 1.0, recomputed=0)},
            {"budget": 16 * MiB, "optimize": plan(13 * MiB, [1.31, 1.29, 1.32, 1.28, 1.33], 0.9,
                                                  recomputed=0)}]
    v = js.violations(rows)
    assert [(x["budget"], x["plan"]) for x in v] == [(12 * MiB, "optimize")]
    assert v[0]["over"] == MiB
    r = js.rises(rows, "optimize")
    assert [x["rise"] for x in r] == [True, True, False]
    assert [x["cause"] for x in r] == ["planner", "cost model", "noise"]
    assert math.isclose(r[0]["median_ratio"], 1.2) and r[0]["p"] < 0.01


def test_ranking_helpers():
    assert js.spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert js.spearman([1, 2, 3], [30, 20, 10]) == -1.0
    assert js.ranks([5, 1, 5]) == [2.5, 1.0, 2.5]
    d = js.discordant(["a", "b", "c"], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert len(d) == 1 and d[0]["predicted_faster"] == "b" and d[0]["predicted_slower"] == "c"
    assert d[0]["predicted_ratio"] == 1.5 and d[0]["measured_ratio"] == 2 / 3


def test_pick_front_tops_up_to_six():
    pts = [JointPoint(1, "fp32", None, peak=10 - i, seconds=1.0 + i, fits=True) for i in range(4)]
    pts += [JointPoint(2, "fp32", None, peak=20, seconds=5.0 + i, fits=False) for i in range(4)]
    e = JointExploration(budget=15, allow=("recompute",), points=tuple(pts), front=tuple(pts[:4]),
                         chosen=pts[0], floor=None)
    picked, added = js.pick_front(e, 8)  # the whole front, then the fastest off-front points
    assert added and picked == pts[:6]
    picked, added = js.pick_front(e, 3)  # 3 spread over the front, topped up with its 4th
    assert added and len(picked) == 6 and set(pts[:4]) <= set(picked)


def test_report_says_no(tmp_path, monkeypatch):
    monkeypatch.setattr(js, "RESULTS", tmp_path)
    rows = [{"budget": 10 * MiB, "optimize": dict(plan(11 * MiB, [1.0] * 5, 1.0),
                                                  within_budget=False),
             "joint": None, "joint_point": None}]
    res = {"size": {}, "allow": list(js.ALL), "eager_peak": 20 * MiB, "budgets": [10 * MiB],
           "floor": {"floor": 9 * MiB, "message": "m", "seconds": 1.0}, "sweep": rows,
           "explorations": [], "violations": js.violations(rows),
           "rises": {"optimize": [], "joint": []}}
    meta = {"command": "c", "date": "d", "torch": "t", "python": "p", "cpu": "c", "threads": 1,
            "time_limit": 1, "densities": [0.5], "total_seconds": 1.0}
    js.write(meta, res, "t")
    md = (tmp_path / "t.md").read_text()
    assert "at or under the budget at every budget (both plans): **NO**" in md
    assert "| 10.00 | optimize | x | 11.00 | 11.00 | **NO** |" in md
    assert json.loads((tmp_path / "t.json").read_text())["verdicts"]["peak_within"] is False


def test_a_slower_less_lossy_plan_is_the_policy():
    rows = [{"budget": 10, "optimize": plan(9, [1.0] * 7, 1.0, settings=(1, False, 0.05))},
            {"budget": 12, "optimize": plan(11, [1.5] * 7, 1.2, settings=(1, False, None))},
            {"budget": 14, "optimize": plan(13, [2.0] * 7, 1.1, settings=(1, False, 0.5)),
             "joint_same_as_optimize": True, "joint": plan(15, [2.0] * 7, 1.1)}]
    r = js.rises(rows, "optimize")
    assert r[0]["rise"] and r[0]["cause"].startswith("policy")
    assert r[1]["rise"] and r[1]["cause"] == "cost model"  # more lossy, predicted faster
    rows[1]["optimize"]["predicted_seconds"] = 0.9  # less lossy but predicted faster
    assert js.rises(rows, "optimize")[0]["cause"].startswith("cost model")
    assert js.violations(rows) == []  # over, but the joint row stands for optimize's: not counted
