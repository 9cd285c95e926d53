"""The job-graph scheduler: order, parallelism, failure propagation, cycles."""

from __future__ import annotations

import threading
import time

import pytest

from bstore.builders.scheduler import (
    CycleError,
    JobState,
    SchedulerHooks,
    run_graph,
    topological_order,
)

DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": []}


def test_dependencies_finish_before_dependents() -> None:
    finished: list[str] = []
    lock = threading.Lock()

    def run(job: str) -> str:
        with lock:
            for dep in DIAMOND[job]:
                assert dep in finished, f"{job} started before {dep} finished"
        time.sleep(0.01)
        with lock:
            finished.append(job)
        return job * 2

    outcomes = run_graph(DIAMOND, run, jobs=3)
    assert {k: o.state for k, o in outcomes.items()} == dict.fromkeys(DIAMOND, JobState.DONE)
    assert outcomes["d"].result == "dd"


def test_runs_n_at_a_time() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()
    barrier = threading.Barrier(2, timeout=5)

    def run(job: str) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        if job in ("x0", "x1"):
            barrier.wait()  # fails unless two jobs really run at once
        with lock:
            running -= 1

    graph: dict[str, list[str]] = {f"x{i}": [] for i in range(6)}
    outcomes = run_graph(graph, run, jobs=2)
    assert all(o.state is JobState.DONE for o in outcomes.values())
    assert peak == 2


def test_failure_blocks_dependents_and_keep_going_runs_the_rest() -> None:
    def run(job: str) -> None:
        if job == "b":
            raise RuntimeError("compile error in b")

    outcomes = run_graph(DIAMOND, run, jobs=1, keep_going=True)
    assert outcomes["b"].state is JobState.FAILED
    assert "compile error in b" in (outcomes["b"].reason or "")
    assert outcomes["d"].state is JobState.DEPENDENCY_FAILED
    assert outcomes["d"].reason == "dependency b failed"
    assert outcomes["c"].state is JobState.DONE
    assert outcomes["e"].state is JobState.DONE


def test_without_keep_going_nothing_new_starts_after_a_failure() -> None:
    started: list[str] = []

    def run(job: str) -> None:
        started.append(job)
        if job == "a":
            raise RuntimeError("boom")

    graph = {"a": [], "z": ["a"], "y": []}
    outcomes = run_graph(graph, run, jobs=1)
    assert started == ["a"]
    assert outcomes["z"].state is JobState.DEPENDENCY_FAILED
    assert outcomes["y"].state is JobState.NOT_STARTED


def test_hooks_see_every_job() -> None:
    seen: list[tuple[str, str]] = []
    hooks = SchedulerHooks[str](
        on_start=lambda k: seen.append(("start", k)),
        on_finish=lambda k, s: seen.append((s.value, k)),
    )
    run_graph({"a": [], "b": ["a"]}, lambda k: None, hooks=hooks)
    assert seen == [("start", "a"), ("done", "a"), ("start", "b"), ("done", "b")]


def test_cycle_is_named() -> None:
    with pytest.raises(CycleError, match="a -> b -> c -> a"):
        topological_order({"a": ["b"], "b": ["c"], "c": ["a"]})


def test_unknown_dependency() -> None:
    with pytest.raises(Exception, match="unknown job 'nope'"):
        run_graph({"a": ["nope"]}, lambda k: None)


def test_deep_chain_does_not_recurse() -> None:
    graph = {i: ([i - 1] if i else []) for i in range(20000)}
    assert topological_order(graph)[:3] == [0, 1, 2]
