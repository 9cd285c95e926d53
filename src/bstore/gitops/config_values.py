"""Checks of single configuration values: durations, names, URLs, addresses, keys.

Pure functions that raise ``ValueError`` with a message quoting the value; the
configuration loader (:mod:`bstore.gitops.config`) adds which key and which file.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from urllib.parse import urlsplit

import pygit2
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bstore.builders.fetch_git import GitFetchError, validate_url

#: Longest accepted duration: a month. Anything longer is almost surely a unit mistake.
MAX_SECONDS = 30 * 24 * 3600.0
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def duration_seconds(value: int | str) -> float:
    """Integer milliseconds, or a string with a unit (``"500ms"``, ``"1.5s"``, ``"5m"``,
    ``"1h"``; a bare digit string is milliseconds), as checked seconds."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # a number from the environment: milliseconds, like integers
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value / 1000.0
    else:
        match = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
        if not match:
            raise ValueError(f"{value!r} is not a duration")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        check_seconds(seconds)
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from exc
    return seconds


def bool_from_text(text: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case), as from the environment."""
    lowered = text.strip().lower()
    if lowered not in _TRUE | _FALSE:
        raise ValueError(f"{text!r} is not a boolean")
    return lowered in _TRUE


def check_hex_name(value: str) -> None:
    """A Hex repository name (``hexpm``, ``hexpm:org``)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*", value):
        raise ValueError(f"name {value!r} is not a valid repository name")


def check_pem(value: str) -> None:
    """A PEM-encoded public key (the signer of a Hex registry)."""
    try:
        load_pem_public_key(value.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError("public_key is not a PEM public key") from exc


def check_positive(value: int) -> None:
    """A positive integer (never a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{value!r} must be a positive integer")


def check_env_name(value: str) -> None:
    """The name of an environment variable."""
    if not ENV_NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an environment variable name")


def check_seconds(value: float) -> None:
    """A duration in seconds: positive, at most :data:`MAX_SECONDS`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a duration")
    if not 0 < value <= MAX_SECONDS:
        raise ValueError(f"duration {value:g} s must be positive and at most 30 days")


def check_repo_url(value: str) -> None:
    """A git URL bstore can fetch (see :func:`~bstore.builders.fetch_git.validate_url`)."""
    try:
        validate_url(value)
    except GitFetchError as exc:
        raise ValueError(exc.message) from exc


def check_branch(value: str) -> None:
    """A branch name git accepts."""
    # git itself refuses branch names starting with '-' (they read as options).
    if not value or value.startswith("-") or not pygit2.reference_is_valid_name(
        f"refs/heads/{value}"
    ):
        raise ValueError(f"{value!r} is not a valid branch name")


def check_apps_dir(value: str) -> None:
    """A directory inside the repository: relative, without ``..``."""
    if value == ".":
        return  # the specs are at the top of the repository
    if not value or value.startswith("/") or "\0" in value or any(
        part in ("", ".", "..") for part in value.split("/")
    ):
        raise ValueError(
            f"{value!r} must be a relative path inside the repository (no '..', not absolute)"
        )


def check_name(value: str) -> None:
    """A profile or activator name: letters, digits, ``.``, ``_``, ``-``."""
    if not NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"{value!r} must be letters, digits, '.', '_' or '-'")


def check_url(value: str, schemes: tuple[str, ...]) -> None:
    """A URL with one of ``schemes``."""
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "file"):
        raise ValueError(f"{value!r} is not a {'/'.join(schemes)} URL")


def split_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) split into host and port."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", value)
    if not match:
        raise ValueError(f"{value!r} is not 'host:port' (IPv6 as '[::1]:port')")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"port {port} in {value!r} is above 65535")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{host!r} in {value!r} is not an IPv6 address") from exc
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_public_key(value: str) -> None:
    """A trusted key ``name:<base64 ed25519 public key>`` (Nix's format)."""
    name, sep, key = value.partition(":")
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error:
        raw = b""
    if not sep or not NAME_RE.fullmatch(name) or len(raw) != 32:
        raise ValueError(f"{value!r} is not 'name:<base64 of a 32-byte ed25519 key>'")
