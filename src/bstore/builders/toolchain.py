"""The toolchain fingerprint: which Erlang/Elixir tools a build runs with.

A build's output depends on the compiler that produced it, so the derivation hash
includes a :class:`Toolchain` (OTP release and full OTP version, ERTS version, Elixir
version, rebar3 version, and the ``erlc`` that compiles). Detection runs each tool once
and is cached for the life of the process: the tools do not change under a running
bstore, and starting a BEAM per build just to ask would cost more than the build.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bstore.errors import BstoreError

# A BEAM starts in well under a second; ten seconds means something is wrong (a hung
# NFS mount, a broken install) and the user should hear about it rather than wait.
_PROBE_TIMEOUT = 10.0

_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$")

# Printed by `erl -eval` below: OTP release, ERTS version, full OTP version (the
# releases/<R>/OTP_VERSION file, which says e.g. 25.2.3 where otp_release says 25).
_ERL_PROBE = (
    'R = erlang:system_info(otp_release),'
    'V = filename:join([code:root_dir(), "releases", R, "OTP_VERSION"]),'
    "Full = case file:read_file(V) of"
    " {ok, B} -> string:trim(binary_to_list(B)); _ -> R end,"
    'io:format("~s ~s ~s~n", [R, erlang:system_info(version), Full]),'
    "halt()."
)


class ToolchainError(BstoreError):
    """A required build tool is missing or does not answer as expected."""


@dataclass(frozen=True)
class Toolchain:
    """The build tools found on this machine, with their versions.

    ``erl`` and ``erlc`` are required; the others are ``None`` when not installed
    (a build that needs them then fails with a clear error). Paths are absolute.
    """

    otp_release: str
    otp_version: str
    erts_version: str
    erl: str
    erlc: str
    elixir_version: str | None = None
    rebar3_version: str | None = None
    rebar3: str | None = None
    mix: str | None = None
    elixir: str | None = None
    make: str | None = None

    def __post_init__(self) -> None:
        for name in ("otp_release", "otp_version", "erts_version"):
            value = getattr(self, name)
            if not _VERSION_RE.match(value):
                raise ToolchainError(f"toolchain {name} {value!r} is not a version")
        for name in ("elixir_version", "rebar3_version"):
            value = getattr(self, name)
            if value is not None and not _VERSION_RE.match(value):
                raise ToolchainError(f"toolchain {name} {value!r} is not a version")
        for name in ("erl", "erlc", "rebar3", "mix", "elixir", "make"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_absolute():
                raise ToolchainError(
                    f"toolchain {name} path {value!r} is not absolute",
                    hint="give tool paths as absolute paths",
                )

    def fingerprint(self) -> dict[str, str]:
        """The canonical form that goes into the derivation hash.

        Versions, and the path of the compiler (a second OTP install of the same
        version elsewhere may be built differently). Absent tools are ``""`` so every
        key is always present and the JSON stays canonical.
        """
        return {
            "erlc": self.erlc,
            "erts_version": self.erts_version,
            "elixir_version": self.elixir_version or "",
            "otp_release": self.otp_release,
            "otp_version": self.otp_version,
            "rebar3_version": self.rebar3_version or "",
        }

    def tool_dirs(self) -> tuple[str, ...]:
        """Directories of the tools, in a stable order without duplicates (for PATH)."""
        dirs: list[str] = []
        for tool in (self.erl, self.erlc, self.rebar3, self.mix, self.elixir, self.make):
            if tool is not None:
                parent = str(Path(tool).parent)
                if parent not in dirs:
                    dirs.append(parent)
        return tuple(dirs)

    def require(self, tool: str) -> str:
        """The absolute path of ``tool`` (``rebar3``, ``mix``, ``make``…) or an error."""
        path = getattr(self, tool, None)
        if not isinstance(path, str):
            raise ToolchainError(
                f"build tool {tool!r} is not installed (not found on PATH)",
                hint=f"install {tool} (see SYSTEM_PACKAGES in ./dev) and retry",
            )
        return path


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolchainError(
            f"could not run {argv[0]!r} to detect the toolchain: {exc}",
            hint="check that the Erlang/Elixir tools are installed and runnable",
        ) from exc
    if proc.returncode != 0:
        raise ToolchainError(
            f"{argv[0]!r} exited with status {proc.returncode} while detecting the "
            f"toolchain: {proc.stderr.strip()[-400:]!r}",
            hint="check that the tool works when run by hand",
        )
    return proc.stdout


def parse_rebar3_version(text: str) -> str:
    """The version from ``rebar3 version`` output (``rebar 3.19.0 on Erlang/OTP …``)."""
    match = re.search(r"\brebar\s+(\S+)", text)
    if not match or not _VERSION_RE.match(match.group(1)):
        raise ToolchainError(f"cannot read a version from rebar3 output {text.strip()!r}")
    return match.group(1)


def parse_elixir_version(text: str) -> str:
    """The version from ``elixir --version`` output (the line ``Elixir 1.14.0 …``)."""
    match = re.search(r"^Elixir\s+(\S+)", text, re.MULTILINE)
    if not match or not _VERSION_RE.match(match.group(1)):
        raise ToolchainError(f"cannot read a version from elixir output {text.strip()!r}")
    return match.group(1)


def probe_toolchain(path: str | None = None) -> Toolchain:
    """Run the tools found on ``path`` (default: ``$PATH``) and describe them. Uncached."""
    erl = shutil.which("erl", path=path)
    erlc = shutil.which("erlc", path=path)
    if erl is None or erlc is None:
        raise ToolchainError(
            f"Erlang/OTP is not installed: {'erl' if erl is None else 'erlc'} not found on PATH",
            hint="install Erlang/OTP (Debian: erlang-nox erlang-dev)",
        )
    fields = _run([erl, "-noshell", "-eval", _ERL_PROBE]).split()
    if len(fields) != 3:
        raise ToolchainError(f"unexpected answer from {erl!r}: {' '.join(fields)!r}")
    otp_release, erts_version, otp_version = fields
    rebar3 = shutil.which("rebar3", path=path)
    mix = shutil.which("mix", path=path)
    elixir = shutil.which("elixir", path=path)
    make = shutil.which("make", path=path)
    rebar3_version = parse_rebar3_version(_run([rebar3, "version"])) if rebar3 else None
    elixir_version = parse_elixir_version(_run([elixir, "--version"])) if elixir else None
    return Toolchain(
        otp_release=otp_release,
        otp_version=otp_version,
        erts_version=erts_version,
        erl=str(Path(erl).absolute()),
        erlc=str(Path(erlc).absolute()),
        elixir_version=elixir_version,
        rebar3_version=rebar3_version,
        rebar3=str(Path(rebar3).absolute()) if rebar3 else None,
        mix=str(Path(mix).absolute()) if mix else None,
        elixir=str(Path(elixir).absolute()) if elixir else None,
        make=str(Path(make).absolute()) if make else None,
    )


@functools.cache
def detect_toolchain() -> Toolchain:
    """The toolchain on ``$PATH``, detected once per process."""
    return probe_toolchain()
