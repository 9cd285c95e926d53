"""The distribution cookie shared by a profile's host node and its guest VMs.

Where it comes from, first match wins: the configured value, ``RELEASE_COOKIE``,
``ERLANG_COOKIE``, the user's ``~/.erlang.cookie``, else a fresh random one (160 bits)
kept in ``<state>/cookie`` (mode 0400) so every later VM gets the same one.

It never appears on a command line (``/proc/<pid>/cmdline`` is world-readable, so
``-setcookie`` is out) nor in an environment variable of the VM: each VM gets a private
``HOME`` (mode 0700) holding ``.erlang.cookie`` (mode 0400), which is where ``erl``
reads it from. Log and error messages show only the source, never the value.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bstore.errors import BstoreError

COOKIE_FILE = ".erlang.cookie"
#: A cookie must be a plain atom erl reads from a file: no quoting, no whitespace.
_COOKIE_RE = re.compile(r"[A-Za-z0-9_@.+\-]{1,255}")
#: 20 random bytes: 160 bits, above the 128 the design asks for.
_RANDOM_BYTES = 20
ENV_VARS = ("RELEASE_COOKIE", "ERLANG_COOKIE")


class CookieError(BstoreError):
    """A cookie that is malformed or cannot be read or stored (never shows the value)."""


@dataclass(frozen=True)
class Cookie:
    """A cookie and where it came from. ``repr`` and ``str`` hide the value."""

    value: str
    source: str

    def __post_init__(self) -> None:
        if not _COOKIE_RE.fullmatch(self.value):
            raise CookieError(f"the cookie from {self.source} is not usable (it must be 1-255"
                              " letters, digits or _@.+-)",
                              hint="set a cookie of plain characters, or remove it so bstore"
                              " generates one")

    def __repr__(self) -> str:
        return f"Cookie(source={self.source!r})"

    __str__ = __repr__


def _read_private(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CookieError(f"cannot read the cookie file {path}: {exc}",
                          hint="fix its permissions or remove it") from exc


def _write_0400(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` with mode 0400, atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    try:
        try:
            os.write(fd, value.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def resolve_cookie(state_dir: Path, configured: str | None = None, *,
                   environ: Mapping[str, str] | None = None,
                   home: Path | None = None) -> Cookie:
    """The cookie to use (see the module docstring for the order).

    ``state_dir`` keeps a generated cookie; ``environ`` and ``home`` default to the
    process environment and ``$HOME``.
    """
    env = os.environ if environ is None else environ
    if configured:
        return Cookie(configured.strip(), "configuration")
    for var in ENV_VARS:
        if env.get(var):
            return Cookie(env[var].strip(), f"${var}")
    home_dir = home if home is not None else Path(env.get("HOME") or Path.home())
    user = _read_private(home_dir / COOKIE_FILE)
    if user:
        return Cookie(user, str(home_dir / COOKIE_FILE))
    stored_path = Path(state_dir) / "cookie"
    stored = _read_private(stored_path)
    if stored:
        return Cookie(stored, str(stored_path))
    value = secrets.token_hex(_RANDOM_BYTES)
    tmp = stored_path.with_name(f".cookie.{secrets.token_hex(4)}.new")
    try:
        Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        try:
            os.write(fd, value.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link(2) fails if the name exists: two racing bstores end up with one cookie.
            os.link(tmp, stored_path)
        except FileExistsError:
            value = _read_private(stored_path) or value
    except OSError as exc:
        raise CookieError(f"cannot store a generated cookie in {stored_path}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return Cookie(value, str(stored_path))


def cookie_home(directory: Path, cookie: Cookie) -> Path:
    """A private ``HOME`` for a VM (0700) with ``.erlang.cookie`` (0400) holding ``cookie``.

    Rewritten only when the value differs, so a running VM's file is left alone.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        target = directory / COOKIE_FILE
        if _read_private(target) != cookie.value:
            _write_0400(target, cookie.value)
    except OSError as exc:
        raise CookieError(f"cannot write the VM cookie file under {directory}: {exc}") from exc
    return directory


def vm_environment(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a VM: ``base`` (default: ours) without any cookie variable,
    with the private ``HOME`` and epmd bound to loopback."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ENV_VARS and k not in ("ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS")}
    env["HOME"] = str(home)
    # epmd started on behalf of this VM listens on loopback only.
    env["ERL_EPMD_ADDRESS"] = "127.0.0.1"
    return env
