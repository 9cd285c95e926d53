"""One worker thread for filesystem work a caller overlaps with waiting on something else.

A generation switch waits about two milliseconds for a node to restart an app; the fsync
that makes the switch durable and the GC root the new code needs can be written in that
time instead of after it. :func:`in_background` hands such work to a single long-lived
thread (starting one per call would cost as much as some of the work) and returns its
:class:`~concurrent.futures.Future`; the caller waits on it before it relies on the
result. One thread keeps the work in submission order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

_T = TypeVar("_T")

_worker: ThreadPoolExecutor | None = None


def in_background(fn: Callable[[], _T]) -> Future[_T]:
    """Run ``fn`` on the background thread; its future (``result()`` re-raises)."""
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bstore-background")
    return _worker.submit(fn)


def _forget_worker() -> None:
    # A forked child has the executor but not its thread: submitting would wait forever.
    global _worker
    _worker = None


os.register_at_fork(after_in_child=_forget_worker)
