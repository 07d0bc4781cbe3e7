"""Pass manager, registry and error reporting."""

from __future__ import annotations

import pytest

from graphopt.core.errors import PassError, UnknownPassError
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassManager, PassResult
from graphopt.fixtures import fixture_path
from graphopt.passes import get_pass, registered_passes, resolve_passes


class CountDown(Pass):
    """Reports modified until it has run n times."""

    name = "test-countdown"

    def __init__(self, n: int = 3) -> None:
        self.n = n

    def call(self, model: Model) -> PassResult:
        self.n -= 1
        return PassResult(model, self.n > 0, {"left": self.n})


class Boom(Pass):
    name = "test-boom"

    def call(self, model: Model) -> PassResult:
        raise ValueError("kaput")


class BadAnalysis(Pass):
    name = "test-bad-analysis"
    analysis = True

    def call(self, model: Model) -> PassResult:
        return PassResult(model, True)


def _model() -> Model:
    return load(fixture_path("cnn.onnx"))


def test_registry_has_builtins() -> None:
    names = registered_passes()
    for n in ("eliminate-dead", "eliminate-identity", "toposort"):
        assert n in names
        assert get_pass(n).name == n


def test_unknown_pass_suggests() -> None:
    with pytest.raises(UnknownPassError, match="did you mean eliminate-dead"):
        get_pass("eliminate-deadd")


def test_fixed_point_and_early_stop() -> None:
    cd = CountDown(3)
    res = PassManager([cd], steps=10)(_model())
    assert res.steps == 3 and res.modified
    cd2 = CountDown(100)
    res2 = PassManager([cd2], steps=4)(_model())
    assert res2.steps == 4


def test_error_names_pass_and_history() -> None:
    with pytest.raises(PassError) as ei:
        PassManager(resolve_passes(["eliminate-identity", "toposort", Boom()]))(_model())
    msg = str(ei.value)
    assert "test-boom" in msg and "eliminate-identity, toposort" in msg and "kaput" in msg


def test_analysis_pass_may_not_modify() -> None:
    with pytest.raises(PassError, match="analysis"):
        PassManager([BadAnalysis()])(_model())


def test_pass_index_matches_registrations() -> None:
    from graphopt import passes

    registered = {
        n: c.__module__.rsplit(".", 1)[-1]
        for n, c in registered_passes().items()
        if c.__module__.startswith("graphopt.passes.")
    }
    assert registered == passes.PASS_INDEX


class Once(Pass):
    """Modifies on its first run only; counts its runs."""

    name = "test-once"

    def __init__(self) -> None:
        self.runs = 0

    def call(self, model: Model) -> PassResult:
        self.runs += 1
        return PassResult(model, self.runs == 1)


class Never(Pass):
    name = "test-never"

    def __init__(self) -> None:
        self.runs = 0

    def call(self, model: Model) -> PassResult:
        self.runs += 1
        return PassResult(model, False)


def test_fixed_point_skips_passes_that_already_saw_the_final_model() -> None:
    first, last = Never(), Once()
    after = Never()
    res = PassManager([first, last, after], steps=10)(_model())
    # sweep 1: first (clean), last (modifies), after (clean); sweep 2: first, last (clean) -> every
    # pass has now run on the final model, so `after` is not run again
    assert (first.runs, last.runs, after.runs) == (2, 2, 1)
    assert res.modified and res.steps == 2
