"""Compile the bstore control agent (``agent/bstore_agent.erl``) with the real ``erlc``.

The agent is our own Erlang module, OTP only. :func:`compile_agent` is the whole build:
``erlc +deterministic`` (no paths or times in the ``.beam``, so the same source and
toolchain give the same bytes) into ``<out_dir>/ebin``. The lead wraps it in a store
derivation; until then callers compile into a directory they own.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bstore.errors import BstoreError

AGENT_MODULE = "bstore_agent"
AGENT_SOURCE = Path(__file__).parent / "agent" / f"{AGENT_MODULE}.erl"


class AgentBuildError(BstoreError):
    """``erlc`` is missing or rejected the agent source (its output is in the message)."""


def compile_agent(out_dir: Path, *, erlc: str = "erlc", timeout: float = 120.0) -> Path:
    """Compile the agent into ``out_dir/ebin`` and return that ebin directory.

    Warnings are errors: the agent runs inside every node bstore controls.
    """
    exe = shutil.which(erlc)
    if exe is None:
        raise AgentBuildError(
            f"cannot compile {AGENT_SOURCE.name}: {erlc!r} not found on PATH",
            hint="install Erlang/OTP (erlc) or pass erlc=<path>",
        )
    ebin = out_dir / "ebin"
    try:
        ebin.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [exe, "+deterministic", "+warnings_as_errors", "-o", str(ebin), str(AGENT_SOURCE)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentBuildError(f"cannot run {exe} on {AGENT_SOURCE}: {exc}") from exc
    beam = ebin / f"{AGENT_MODULE}.beam"
    if proc.returncode != 0 or not beam.is_file():
        output = (proc.stdout + proc.stderr).strip()
        raise AgentBuildError(
            f"erlc failed on {AGENT_SOURCE} (exit {proc.returncode}): {output[-4000:]}"
        )
    return ebin
