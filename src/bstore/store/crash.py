"""Named crash and pause points, for testing crash safety and races with real processes.

``BSTORE_CRASH_AT=<name>`` makes the process ``SIGKILL`` itself when it reaches the point
``<name>`` — no cleanup handlers, no ``finally`` blocks, exactly like a power cut as far as
the store's own files are concerned. ``BSTORE_PAUSE_AT=<name>`` together with
``BSTORE_PAUSE_FILE=<path>`` makes it create ``<path>.reached`` at the point and wait
until ``<path>`` exists (bounded), so a test can run a GC or a second writer at exactly
that moment. Both cost one dict lookup when unset.

Points of the add/register path, in order: ``after-stage``, ``after-fsync``,
``after-rename``, ``before-commit``, ``after-commit``. GC: ``gc-after-invalidate``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

#: Every point the store code calls, so tests can iterate over them.
CRASH_POINTS = ("after-stage", "after-fsync", "after-rename", "before-commit", "after-commit")
GC_CRASH_POINTS = ("gc-after-invalidate",)
#: Upper bound of a pause, so a test that forgets to release cannot hang forever.
_PAUSE_LIMIT_SECONDS = 120.0


def crash_point(name: str) -> None:
    """Die with SIGKILL at ``name`` or pause there, if the environment asks for it."""
    if os.environ.get("BSTORE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("BSTORE_PAUSE_AT") == name:
        release = Path(os.environ["BSTORE_PAUSE_FILE"])
        Path(f"{release}.reached").write_text(str(os.getpid()))
        deadline = time.monotonic() + _PAUSE_LIMIT_SECONDS
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
