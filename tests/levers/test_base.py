"""The lever interface: levers register by name, unknown and unbuilt ones are clear errors, and a
lever that rewrites nothing passes the graphs and the step through unchanged."""

import pytest

import fxmem.levers.base as base
from fxmem.levers.base import NOT_BUILT, REGISTRY, Lever, lever_for, register
from fxmem.levers.microbatch.lever import MicrobatchLever
from fxmem.levers.recompute.lever import RecomputeLever
from fxmem.passes.base import StepGraphs
from fxmem.planning.options import EXACT_LEVERS, LEVERS


def test_the_built_levers_are_registered_by_name_and_exact():
    assert lever_for("recompute") is RecomputeLever
    assert lever_for("microbatch") is MicrobatchLever
    assert {name for name in REGISTRY if lever_for(name).exact} >= set(EXACT_LEVERS)


def test_every_lever_the_options_accept_is_built_or_named_as_not_built():
    assert set(LEVERS) == set(REGISTRY) | set(NOT_BUILT)


def test_a_lever_not_built_yet_says_so(monkeypatch):
    monkeypatch.setattr(base, "NOT_BUILT", ("token-split",))  # every lever named today is built
    with pytest.raises(NotImplementedError, match="the 'token-split' lever is not built yet"):
        lever_for("token-split")


def test_every_lever_is_built():
    assert NOT_BUILT == () and lever_for("precision").name == "precision"
    assert lever_for("sparse").name == "sparse" and not lever_for("sparse").exact


def test_an_unknown_lever_is_a_value_error_listing_the_levers():
    with pytest.raises(ValueError, match=r"unknown lever 'teleport'; the levers are \[") as info:
        lever_for("teleport")
    for name in ("recompute", "microbatch", *NOT_BUILT):
        assert repr(name) in str(info.value)


def test_register_makes_a_lever_known_and_its_defaults_change_nothing(monkeypatch):
    monkeypatch.setattr(base, "REGISTRY", dict(REGISTRY))  # the real registry stays as it is

    @register
    class Noop(Lever):
        name, exact = "noop", True

        def analyse(self):
            return {}

    assert lever_for("noop") is Noop and "noop" not in REGISTRY
    graphs = StepGraphs(num_fwd_outputs=1)
    assert Noop().apply(graphs, decision=None) == (graphs, [])

    def step():
        return 42

    assert Noop().runtime(step, decision=None) is step


def test_a_lever_must_say_how_it_analyses():
    class Half(Lever):
        name, exact = "half", True

    with pytest.raises(TypeError, match="abstract"):
        Half()
