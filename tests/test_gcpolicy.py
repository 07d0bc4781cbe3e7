"""graphopt.core.gcpolicy: the collector's thresholds while a job runs."""

from __future__ import annotations

import gc

import pytest

from graphopt.core.gcpolicy import JOB_THRESHOLDS, job_gc, with_job_gc


def test_thresholds_raised_inside_and_restored_after() -> None:
    old = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with job_gc():
            assert gc.get_threshold() == JOB_THRESHOLDS
            assert gc.isenabled()  # raised, never turned off
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*old)


def test_never_lowered_and_restored_on_error() -> None:
    old = gc.get_threshold()
    try:
        gc.set_threshold(10**6, 1, 1000)
        with pytest.raises(ValueError), job_gc():
            assert gc.get_threshold() == (10**6, JOB_THRESHOLDS[1], 1000)
            raise ValueError
        assert gc.get_threshold() == (10**6, 1, 1000)
    finally:
        gc.set_threshold(*old)


def test_decorator_keeps_the_function() -> None:
    @with_job_gc
    def f(x: int, *, y: int = 1) -> tuple[int, tuple[int, int, int]]:
        """Doc."""
        return x + y, gc.get_threshold()

    old = gc.get_threshold()
    value, inside = f(1, y=2)
    assert value == 3 and inside[0] >= JOB_THRESHOLDS[0]
    assert f.__doc__ == "Doc." and f.__name__ == "f"
    assert gc.get_threshold() == old


def test_jobs_run_inside_it() -> None:
    from graphopt.jobs.optimize import optimize  # noqa: PLC0415
    from graphopt.jobs.plan import plan_memory  # noqa: PLC0415

    for job in (optimize, plan_memory):
        assert getattr(job, "__wrapped__", None) is not None


def test_a_cli_command_reports_under_the_job_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line's whole command runs under them, the report after the job included (the
    JSON's figures of the result walk the graph once the job has returned)."""
    import graphopt.cli.inspect as cli_inspect
    from graphopt.cli import main
    from graphopt.fixtures import fixture_path

    seen: list[tuple[int, int, int]] = []
    monkeypatch.setattr(cli_inspect, "emit_json", lambda obj: seen.append(gc.get_threshold()))
    old = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert main(["inspect", str(fixture_path("cnn.onnx")), "--json"]) == 0
        assert seen == [JOB_THRESHOLDS]
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*old)
