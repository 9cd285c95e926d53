"""What every build system shares: inputs, the workspace, and the finished output.

A build gets a source tree, already-built dependency libs and a toolchain; it runs in
``<work_dir>/src`` (a copy: the source tree is never modified), with dependencies made
visible under ``<work_dir>/deps``, and leaves an OTP lib dir that :func:`finalize`
turns into ``<out_dir>/lib/<app>-<vsn>/{ebin,priv,include}`` with a correct ``.app``
(``vsn`` = the spec's version, ``modules`` = exactly the ``.beam`` files in ``ebin``).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bstore.builders.sandbox import BuildError, Sandbox
from bstore.builders.toolchain import Toolchain

# An application name is an unquoted Erlang atom (it names the .app file, a directory
# and a module-like atom); anything else is refused before any command runs.
APP_NAME_RE = re.compile(r"^[a-z][a-zA-Z0-9_]{0,127}$")
# Versions as Hex/rebar3/mix write them (SemVer plus build metadata). No '/', no
# whitespace, no shell or Make metacharacters: the version becomes a directory name.
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_~-]{0,127}$")

# The output sub-directories an OTP lib dir may carry into the store.
OUTPUT_DIRS = ("ebin", "priv", "include")

# Elixir writes the absolute source path into each module's debug info; it is replaced
# by this prefix (plus ``<app>-<vsn>``) so the output does not depend on where it was built.
CANONICAL_BUILD_PREFIX = "/build"


def validate_app_name(app_name: str) -> str:
    """``app_name`` if it is a valid OTP application name, else :class:`BuildError`."""
    if not isinstance(app_name, str) or not APP_NAME_RE.match(app_name):
        raise BuildError(
            f"invalid application name {app_name!r}",
            hint="an application name is a lowercase Erlang atom: [a-z][a-zA-Z0-9_]*",
        )
    return app_name


def validate_version(version: str) -> str:
    """``version`` if it is a usable version string, else :class:`BuildError`."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise BuildError(
            f"invalid version {version!r}",
            hint="a version is letters, digits and . + _ ~ - (e.g. 1.2.3 or 1.0.0-rc.1+b5)",
        )
    return version


@dataclass(frozen=True)
class DepLib:
    """An already-built dependency: ``lib_dir`` is ``<dep_out>/lib/<name>-<version>``."""

    name: str
    version: str
    lib_dir: Path

    def __post_init__(self) -> None:
        validate_app_name(self.name)
        validate_version(self.version)
        if not Path(self.lib_dir).is_absolute():
            raise BuildError(f"dependency {self.name!r} lib dir {str(self.lib_dir)!r} "
                             "is not absolute")
        object.__setattr__(self, "lib_dir", Path(self.lib_dir))

    @property
    def ebin(self) -> Path:
        """The dependency's ``ebin`` directory."""
        return self.lib_dir / "ebin"

    @classmethod
    def from_out(cls, out_dir: Path, name: str, version: str) -> DepLib:
        """The dependency built into ``out_dir`` by :func:`~bstore.builders.buildsystems.build`."""
        return cls(name=name, version=version, lib_dir=Path(out_dir) / "lib" / f"{name}-{version}")


@dataclass(frozen=True)
class BuildResult:
    """What a finished build produced."""

    app_name: str
    version: str
    build_system: str
    lib_dir: Path
    modules: tuple[str, ...]
    log_path: Path
    network_isolated: bool
    filesystem_isolated: bool

    def __post_init__(self) -> None:
        validate_app_name(self.app_name)
        validate_version(self.version)


@dataclass(frozen=True)
class BuiltTree:
    """What a runner leaves: ``lib_dir`` holds ``ebin`` (and maybe ``priv``/``include``);
    ``fallback`` is where ``priv``/``include`` are taken from when ``lib_dir`` lacks
    them; ``app_src`` generates the ``.app`` when the build wrote none."""

    lib_dir: Path
    fallback: Path | None = None
    app_src: Path | None = None


@dataclass(frozen=True)
class BuildContext:
    """Everything one build-system runner needs (made by :func:`prepare`)."""

    app_name: str
    version: str
    src: Path
    work_dir: Path
    deps_dir: Path
    deps: tuple[DepLib, ...]
    toolchain: Toolchain
    sandbox: Sandbox
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_app_name(self.app_name)
        validate_version(self.version)

    @property
    def lib_name(self) -> str:
        """``<app>-<vsn>``: the name of the output lib dir."""
        return f"{self.app_name}-{self.version}"

    @property
    def stage_dir(self) -> Path:
        """Where the runner's result is assembled before it is copied to ``out_dir``."""
        return self.work_dir / "stage" / self.lib_name


def _check_inside(path: Path, root: Path, what: str) -> None:
    """Refuse a symlink in a tree that points outside it (would leak host files)."""
    target = Path(os.path.realpath(path))
    real_root = Path(os.path.realpath(root))
    if target != real_root and real_root not in target.parents:
        raise BuildError(
            f"{what} {str(path)!r} is a symlink to {str(target)!r}, outside the tree",
            hint="sources and build outputs may only link inside themselves",
        )


def copy_tree(src: Path, dst: Path, *, what: str, root: Path | None = None) -> None:
    """Copy ``src`` to ``dst``, following symlinks only when they stay inside ``root``
    (default ``src``): a link out of the tree is an error, never a copy of host files."""
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for name in (*dirnames, *filenames):
            entry = Path(dirpath) / name
            if entry.is_symlink():
                _check_inside(entry, root or src, what)
            elif not (entry.is_file() or entry.is_dir()):
                # A FIFO would block the copy forever; devices and sockets have no
                # business in a source tree or a build output.
                raise BuildError(
                    f"{what} {str(entry)!r} is not a regular file, directory or symlink",
                    hint="remove special files (FIFOs, sockets, devices) from the tree",
                )
    try:
        shutil.copytree(src, dst, symlinks=False)
    except (OSError, shutil.Error) as exc:
        raise BuildError(f"cannot copy {what} {str(src)!r} to {str(dst)!r}: {exc}") from exc


def _make_user_writable(tree: Path) -> None:
    """Add the owner's write bit to every directory and file under ``tree`` (not
    following symlinks)."""
    for dirpath, _dirnames, filenames in os.walk(tree, followlinks=False):
        for path in (Path(dirpath), *(Path(dirpath) / f for f in filenames)):
            if not path.is_symlink():
                mode = path.stat().st_mode
                if not mode & stat.S_IWUSR:
                    path.chmod(stat.S_IMODE(mode) | stat.S_IWUSR)


def prepare_workspace(
    source_dir: Path, work_dir: Path, deps: Sequence[DepLib]
) -> tuple[Path, Path]:
    """Copy the source into ``work_dir/src`` and link each dependency into
    ``work_dir/deps/<name>-<vsn>``; returns ``(src, deps_dir)``.

    ``work_dir`` must be empty or not exist yet, so nothing of an earlier build leaks in.
    """
    if not Path(source_dir).is_dir():
        raise BuildError(f"source directory {str(source_dir)!r} does not exist")
    if work_dir.exists() and any(work_dir.iterdir()):
        raise BuildError(
            f"work directory {str(work_dir)!r} is not empty",
            hint="give each build a fresh, empty work directory",
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    src = work_dir / "src"
    copy_tree(Path(source_dir), src, what="source")
    # The source comes from the store (dirs 0555, files 0444) and the copy keeps those
    # modes; the build writes into it (ebin/, _build/), which root may do anyway but any
    # other user may not.
    _make_user_writable(src)
    deps_dir = work_dir / "deps"
    deps_dir.mkdir()
    seen: set[str] = set()
    for dep in deps:
        if dep.name in seen:
            raise BuildError(f"dependency {dep.name!r} is given twice")
        seen.add(dep.name)
        if not (dep.ebin / f"{dep.name}.app").is_file():
            raise BuildError(
                f"dependency {dep.name!r} has no {dep.name}.app in {str(dep.ebin)!r}",
                hint="build the dependency first; its output must be <out>/lib/<dep>-<vsn>",
            )
        (deps_dir / f"{dep.name}-{dep.version}").symlink_to(dep.lib_dir, target_is_directory=True)
    return src, deps_dir


def stage_output(ctx: BuildContext, built: Path, *, fallback: Path | None = None) -> None:
    """Assemble ``ctx.stage_dir`` from the runner's ``built`` lib dir: its ``ebin``, and
    ``priv``/``include`` from ``built`` or else from ``fallback`` (the source copy)."""
    ebin = built / "ebin"
    if not ebin.is_dir():
        raise BuildError(
            f"the build of {ctx.lib_name!r} produced no ebin directory in {str(built)!r}",
            hint=f"see the build log at {str(ctx.sandbox.log_path)!r}",
            log_path=ctx.sandbox.log_path,
        )
    ctx.stage_dir.parent.mkdir(parents=True, exist_ok=True)
    for sub in OUTPUT_DIRS:
        for root in (built, fallback):
            if root is None:
                continue
            candidate = root / sub
            if candidate.is_dir():
                copy_tree(candidate, ctx.stage_dir / sub, what=f"build output {sub}",
                          root=ctx.work_dir)
                break
