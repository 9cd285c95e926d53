"""Build systems: turn a source tree into an OTP lib dir, hermetically.

:func:`build` is the one entry point: it detects (or is told) the build system, copies
the source into ``work_dir``, runs the build system's runner in the
:mod:`~bstore.builders.sandbox`, fixes the ``.app`` and writes
``<out_dir>/lib/<app>-<vsn>/{ebin,priv,include}``. Runners (one module each):

=========  =====================================================================
``mix``    ``mix compile --no-deps-check`` with deps in ``_build/prod/lib``
``rebar3`` ``rebar3 bare compile`` with deps on ``ERL_LIBS``
``make``   erlang.mk ``make app`` with deps in ``DEPS_DIR`` (vendored erlang.mk)
``erlc``   ``erlc +deterministic`` of ``src/*.erl`` and ``.app`` from ``.app.src``
=========  =====================================================================
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bstore.builders.buildsystems import erlang_mk, erlc, mix, rebar3
from bstore.builders.buildsystems.base import (
    BuildContext,
    BuildResult,
    BuiltTree,
    DepLib,
    copy_tree,
    prepare_workspace,
    stage_output,
    validate_app_name,
    validate_version,
)
from bstore.builders.buildsystems.detect import (
    BUILD_SYSTEMS,
    BuildSystemNotDetected,
    detect_build_system,
)
from bstore.builders.buildsystems.finalize import finalize
from bstore.builders.sandbox import BuildError, Isolation, Sandbox
from bstore.builders.toolchain import Toolchain, ToolchainError

__all__ = [
    "BUILD_SYSTEMS",
    "BuildError",
    "BuildResult",
    "BuildSystemNotDetected",
    "DepLib",
    "build",
    "detect_build_system",
]

RUNNERS: Mapping[str, Callable[[BuildContext], BuiltTree]] = {
    "mix": mix.run,
    "rebar3": rebar3.run,
    "make": erlang_mk.run,
    "erlc": erlc.run,
}


def _rmtree(path: Path) -> None:
    """Remove ``path`` even where a build left read-only directories."""

    def onerror(func: Callable[..., object], name: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(name), stat.S_IRWXU)
            os.chmod(name, stat.S_IRWXU)
            func(name)
        except OSError:
            pass

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, onerror=onerror)


def _clean_work_dir(work_dir: Path, log_path: Path) -> None:
    """Empty ``work_dir``, keeping the log if it lives there."""
    if not work_dir.is_dir():
        return
    log_abs = Path(os.path.abspath(log_path))
    for entry in work_dir.iterdir():
        entry_abs = Path(os.path.abspath(entry))
        if entry_abs == log_abs or entry_abs in log_abs.parents:
            continue
        _rmtree(entry)


def build(
    source_dir: Path,
    out_dir: Path,
    *,
    app_name: str,
    version: str,
    deps: Sequence[DepLib],
    toolchain: Toolchain,
    work_dir: Path,
    log_path: Path,
    timeout: float,
    build_system: str | None = None,
    env: Mapping[str, str] | None = None,
    isolation: Isolation | None = None,
    cancel: threading.Event | None = None,
    keep_work_dir: bool = False,
) -> BuildResult:
    """Build the OTP application at ``source_dir`` into ``<out_dir>/lib/<app>-<vsn>``.

    ``deps`` are the already-built dependencies; ``work_dir`` (empty or absent) is the
    only place the build writes besides the final copy into ``out_dir``, and is emptied
    afterwards unless ``keep_work_dir``; ``log_path`` receives every command's output;
    ``timeout`` (seconds) bounds the whole build. ``build_system`` overrides detection;
    ``env`` adds variables to the sandbox's whitelisted environment; ``isolation``
    overrides the detected sandbox (tests); setting ``cancel`` kills the build.

    Raises :class:`BuildError` (with the log path and tail) on any failure, after
    killing the build and leaving neither a partial output nor the work files behind.
    """
    validate_app_name(app_name)
    validate_version(version)
    system = build_system if build_system is not None else detect_build_system(source_dir)
    if system not in RUNNERS:
        raise BuildError(
            f"unknown build system {system!r}",
            hint=f"use one of {', '.join(BUILD_SYSTEMS)}",
        )
    work_dir = Path(os.path.abspath(work_dir))
    if ":" in str(work_dir):
        # ERL_LIBS is a ':'-separated list: such a directory could not be put on it.
        raise BuildError(f"work directory {str(work_dir)!r} contains ':'",
                         hint="build in a directory whose path has no ':'")
    if work_dir.exists() and any(work_dir.iterdir()):
        # Checked before anything is cleaned: a non-empty dir is not ours to empty.
        raise BuildError(f"work directory {str(work_dir)!r} is not empty",
                         hint="give each build a fresh, empty work directory")
    target = Path(out_dir) / "lib" / f"{app_name}-{version}"
    if target.exists() or target.is_symlink():
        raise BuildError(f"output {str(target)!r} already exists",
                         hint="build into a fresh output directory")
    sandbox = Sandbox(work_dir=work_dir, log_path=Path(log_path), timeout=timeout,
                      tool_dirs=toolchain.tool_dirs(), isolation=isolation, cancel=cancel)
    created_target = False
    try:
        src, deps_dir = prepare_workspace(Path(source_dir), work_dir, deps)
        ctx = BuildContext(app_name=app_name, version=version, src=src, work_dir=work_dir,
                           deps_dir=deps_dir, deps=tuple(deps), toolchain=toolchain,
                           sandbox=sandbox, env=dict(env or {}))
        try:
            built = RUNNERS[system](ctx)
        except ToolchainError as exc:
            raise BuildError(exc.message, exc.hint, log_path=Path(log_path)) from exc
        stage_output(ctx, built.lib_dir, fallback=built.fallback)
        finalize(ctx, app_src=built.app_src, source_root=src)
        modules = tuple(sorted(p.stem for p in (ctx.stage_dir / "ebin").glob("*.beam")))
        target.parent.mkdir(parents=True, exist_ok=True)
        created_target = True
        copy_tree(ctx.stage_dir, target, what="staged output")
    except BaseException:
        if created_target:
            _rmtree(target)
        raise
    finally:
        if not keep_work_dir:
            _clean_work_dir(work_dir, Path(log_path))
    iso = sandbox.isolation
    return BuildResult(
        app_name=app_name, version=version, build_system=system, lib_dir=target,
        modules=modules, log_path=Path(log_path),
        network_isolated=bool(iso and iso.network),
        filesystem_isolated=bool(iso and iso.filesystem),
    )
