"""Which build system a source tree uses, from the files it ships.

In order (the first that matches wins, as in the issue): ``mix.exs`` → ``mix``;
``rebar.config`` (or ``rebar.config.script``) → ``rebar3``; a ``Makefile`` that includes
``erlang.mk`` → ``make``; only ``src/*.app.src`` → plain ``erlc``. The names are the
``builder`` values of a derivation.
"""

from __future__ import annotations

import re
from pathlib import Path

from bstore.builders.sandbox import BuildError

BUILD_SYSTEMS = ("mix", "rebar3", "make", "erlc")

# `include erlang.mk`, `-include $(CURDIR)/erlang.mk`, `include ../../erlang.mk`…
_INCLUDES_ERLANG_MK = re.compile(r"^\s*-?s?include\s+\S*erlang\.mk\s*$", re.MULTILINE)
_MAKEFILES = ("GNUmakefile", "makefile", "Makefile")
# A Makefile larger than this is not read whole just to look for an include line.
_MAKEFILE_READ_LIMIT = 1 << 20


class BuildSystemNotDetected(BuildError):
    """A source tree with none of the files that name a build system."""


def _includes_erlang_mk(makefile: Path) -> bool:
    try:
        with open(makefile, "rb") as fh:
            text = fh.read(_MAKEFILE_READ_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return False
    return _INCLUDES_ERLANG_MK.search(text) is not None


def detect_build_system(source_dir: Path) -> str:
    """The build system of the tree at ``source_dir`` (one of :data:`BUILD_SYSTEMS`)."""
    root = Path(source_dir)
    if not root.is_dir():
        raise BuildSystemNotDetected(f"source directory {str(root)!r} does not exist")
    if (root / "mix.exs").is_file():
        return "mix"
    if (root / "rebar.config").is_file() or (root / "rebar.config.script").is_file():
        return "rebar3"
    if any((root / name).is_file() and _includes_erlang_mk(root / name) for name in _MAKEFILES):
        return "make"
    if (root / "src").is_dir() and any((root / "src").glob("*.app.src")):
        return "erlc"
    raise BuildSystemNotDetected(
        f"cannot tell how to build {str(root)!r}: no mix.exs, rebar.config, erlang.mk "
        "Makefile or src/*.app.src",
        hint="the source must be an OTP application built by mix, rebar3, erlang.mk or erlc",
    )
