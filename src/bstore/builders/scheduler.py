"""Run a graph of jobs in dependency order, N at a time.

The scheduler knows nothing about building: it takes job ids, each job's dependencies
and a function that runs one job, and guarantees that a job starts only after all of its
dependencies succeeded. A failed job fails its dependents (with the reason naming the
failed dependency); with ``keep_going`` independent jobs still run, otherwise no new job
starts after the first failure (running ones finish, so nothing is left half-done).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from bstore.errors import BstoreError

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class CycleError(BstoreError):
    """The job graph has a cycle (named in the message)."""


class JobState(StrEnum):
    """How a job ended."""

    DONE = "done"
    FAILED = "failed"
    DEPENDENCY_FAILED = "dependency-failed"
    NOT_STARTED = "not-started"  # stopped after another job failed (no --keep-going)


@dataclass(frozen=True)
class JobOutcome(Generic[R]):
    """The end of one job: its state, its result when done, the error when not."""

    state: JobState
    result: R | None = None
    error: BaseException | None = None
    reason: str | None = None


@dataclass(frozen=True)
class SchedulerHooks(Generic[K]):
    """Progress callbacks (called from worker threads; keep them quick)."""

    on_start: Callable[[K], None] = lambda _k: None
    on_finish: Callable[[K, JobState], None] = lambda _k, _s: None


def topological_order(deps: Mapping[K, Sequence[K]]) -> list[K]:
    """Jobs ordered so every job comes after its dependencies; raises on a cycle."""
    order: list[K] = []
    state: dict[K, int] = {}  # 1 = on the current path, 2 = finished
    for start in deps:
        if state.get(start) == 2:
            continue
        stack: list[tuple[K, int]] = [(start, 0)]
        path: list[K] = []
        while stack:
            node, index = stack.pop()
            if index == 0:
                if state.get(node) == 2:
                    continue
                state[node] = 1
                path.append(node)
            children = list(deps.get(node, ()))
            if index < len(children):
                stack.append((node, index + 1))
                child = children[index]
                if state.get(child) == 1:
                    cycle = [*path[path.index(child) :], child]
                    raise CycleError(
                        "dependency cycle: " + " -> ".join(str(c) for c in cycle)
                    )
                if state.get(child) != 2:
                    stack.append((child, 0))
            else:
                state[node] = 2
                path.pop()
                order.append(node)
    return order


def run_graph(
    deps: Mapping[K, Sequence[K]],
    run: Callable[[K], R],
    *,
    jobs: int = 1,
    keep_going: bool = False,
    hooks: SchedulerHooks[K] | None = None,
) -> dict[K, JobOutcome[R]]:
    """Run ``run(job)`` for every job in ``deps`` respecting dependencies.

    ``deps`` maps each job to the jobs it needs; every dependency must itself be a key.
    Returns an outcome for every job.
    """
    for job, needed in deps.items():
        for dep in needed:
            if dep not in deps:
                raise BstoreError(f"job {job!r} depends on unknown job {dep!r}")
    order = topological_order(deps)
    hooks = hooks or SchedulerHooks()
    outcomes: dict[K, JobOutcome[R]] = {}
    lock = threading.Lock()
    pending = list(order)
    running: dict[Future[R], K] = {}
    stopped = False

    def ready(job: K) -> bool:
        return all(outcomes.get(d) is not None and outcomes[d].state is JobState.DONE
                   for d in deps[job])

    def settle_blocked() -> None:
        # Jobs whose dependency failed can never run: record why, transitively.
        changed = True
        while changed:
            changed = False
            for job in list(pending):
                bad = [d for d in deps[job]
                       if d in outcomes and outcomes[d].state is not JobState.DONE]
                if bad:
                    pending.remove(job)
                    outcomes[job] = JobOutcome(
                        JobState.DEPENDENCY_FAILED, reason=f"dependency {bad[0]} failed"
                    )
                    hooks.on_finish(job, JobState.DEPENDENCY_FAILED)
                    changed = True

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            if not stopped:
                for job in list(pending):
                    if len(running) >= max(1, jobs):
                        break
                    if ready(job):
                        pending.remove(job)
                        hooks.on_start(job)
                        running[pool.submit(run, job)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                error = future.exception()
                with lock:
                    if error is None:
                        outcomes[job] = JobOutcome(JobState.DONE, result=future.result())
                    else:
                        outcomes[job] = JobOutcome(JobState.FAILED, error=error,
                                                   reason=str(error))
                        if not keep_going:
                            stopped = True
                hooks.on_finish(job, outcomes[job].state)
            settle_blocked()
    for job in pending:
        outcomes[job] = JobOutcome(JobState.NOT_STARTED, reason="stopped after a failure")
    return outcomes
