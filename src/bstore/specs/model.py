"""The validated application spec: what one app is, where it comes from, how it runs.

:class:`AppSpec` is the normalised result of reading a spec file in any format, with
defaults filled in. Every part is a frozen dataclass that checks itself in
``__post_init__``, so an invalid spec cannot be constructed; the schema reader
(:mod:`bstore.specs.schema`) checks the same rules first, with positions. ``env`` keeps
the exact Erlang terms the user wrote; :meth:`AppSpec.to_json` writes them in the
tagged form of :mod:`bstore.specs.termjson` and :meth:`AppSpec.from_json` reads them
back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bstore.errors import BstoreError
from bstore.specs import identicon, termjson
from bstore.specs.located import Position
from bstore.specs.terms.model import Atom, Term

#: OTP application names: atoms that need no quoting (and so make plain file and node names).
APP_NAME_RE = re.compile(r"[a-z][A-Za-z0-9_]{0,254}")
MCID_RE = re.compile(r"mcid1-manifest-blake3-[0-9a-f]{64}")
SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
#: Versions become part of file and store path names (``lib/<app>-<vsn>``).
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_\-]{0,99}")
NODE_PREFIX_RE = re.compile(r"[A-Za-z0-9_.\-]{0,200}")
DEFAULT_HEALTH_INTERVAL_MS = 30_000
DEFAULT_HEALTH_TIMEOUT_MS = 5_000
DEFAULT_BASE64_ICON_MIME = "image/png"
IDENTICON_MIME = "image/svg+xml"


def _as_term(mapping: Mapping[Atom, Term]) -> Term:
    return {k: v for k, v in mapping.items()}


class InvalidSpec(BstoreError):
    """A spec value that breaks a rule of the model (constructed without the schema)."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSpec(message)


def _positive_int(value: object, what: str, upper: int | None = None) -> None:
    _check(
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= 1
        and (upper is None or value <= upper),
        f"{what} must be an integer from 1 to {upper or 'any'}, got {value!r}",
    )


def valid_app_name(name: str) -> bool:
    """Whether ``name`` is a usable OTP application name (an unquoted Erlang atom)."""
    return APP_NAME_RE.fullmatch(name) is not None


def _safe_arg(text: str | None, what: str) -> None:
    # URLs and refs reach git/curl command lines: a leading '-' would read as an option.
    if text is not None:
        _check(
            bool(text) and not text.startswith("-"),
            f"{what} {text!r} must not be empty or start with '-'",
        )
        _check(
            not any(c.isspace() or ord(c) < 32 for c in text),
            f"{what} {text!r} contains whitespace or control characters",
        )


class IconType(StrEnum):
    """Where an app's icon comes from."""

    URL = "url"
    BASE64 = "base64"
    IDENTICON = "identicon"


@dataclass(frozen=True, slots=True)
class IconSpec:
    """An icon: a URL, inline base64 data, or the identicon generated from the app name."""

    type: IconType
    value: str
    mime_type: str | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.type, IconType), f"icon type {self.type!r} is not an IconType")
        _check(bool(self.value), "an icon needs a value")

    @classmethod
    def identicon(cls, app_name: str) -> IconSpec:
        """The generated identicon of ``app_name`` (as bc_gitops makes it)."""
        return cls(IconType.IDENTICON, identicon.data_uri(app_name), IDENTICON_MIME)


class SourceType(StrEnum):
    """How an app's code is fetched."""

    HEX = "hex"
    GIT = "git"
    RELEASE = "release"
    MESH = "mesh"


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """Where the code comes from.

    ``hex``: package ``<app name>`` at ``ref`` (default: the app version) from ``repo``
    (``None``: hex.pm). ``git``: ``url`` at ``ref`` (branch, tag or commit; ``None``: the
    remote's default branch). ``release``: a tarball at ``url`` whose SHA-256 is
    ``sha256`` (64 lowercase hex digits). ``mesh``: the tree with content id ``mcid``.
    """

    type: SourceType
    ref: str | None = None
    repo: str | None = None
    url: str | None = None
    sha256: str | None = None
    mcid: str | None = None

    def __post_init__(self) -> None:
        t = self.type
        _check(isinstance(t, SourceType), f"source type {t!r} is not a SourceType")
        _safe_arg(self.ref, "source ref")
        _safe_arg(self.url, "source url")
        if t is SourceType.GIT or t is SourceType.RELEASE:
            _check(self.url is not None, f"a {t.value} source needs a url")
        if t is SourceType.RELEASE:
            _check(
                self.sha256 is not None and SHA256_HEX_RE.fullmatch(self.sha256) is not None,
                f"a release source needs sha256 as 64 lowercase hex digits, got {self.sha256!r}",
            )
        if t is SourceType.MESH:
            _check(
                self.mcid is not None and MCID_RE.fullmatch(self.mcid) is not None,
                "a mesh source needs an mcid like mcid1-manifest-blake3-<64 hex>,"
                f" got {self.mcid!r}",
            )


class HealthType(StrEnum):
    """How an app's health is checked."""

    HTTP = "http"
    TCP = "tcp"
    CUSTOM = "custom"


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """A health check: ``GET http://localhost:<port><path>``, a TCP connect, or ``module:check()``.

    ``interval`` and ``timeout`` are milliseconds.
    """

    type: HealthType
    port: int | None = None
    path: str | None = None
    module: str | None = None
    interval: int = DEFAULT_HEALTH_INTERVAL_MS
    timeout: int = DEFAULT_HEALTH_TIMEOUT_MS

    def __post_init__(self) -> None:
        _check(isinstance(self.type, HealthType), f"health type {self.type!r} is not a HealthType")
        if self.type in (HealthType.HTTP, HealthType.TCP):
            _positive_int(self.port, "health port", 65535)
        if self.type is HealthType.HTTP:
            _check(
                self.path is not None and self.path.startswith("/"),
                f"health path {self.path!r} must start with '/'",
            )
        if self.type is HealthType.CUSTOM:
            _check(
                self.module is not None and bool(self.module),
                "a custom health check needs a module",
            )
        _positive_int(self.interval, "health interval")
        _positive_int(self.timeout, "health timeout")


class Isolation(StrEnum):
    """Where an app runs: in the shared host node, or in a VM of its own."""

    EMBEDDED = "embedded"
    VM = "vm"


@dataclass(frozen=True, slots=True)
class VmConfig:
    """Settings of an app's own VM (``isolation = vm``).

    Memory limit in MB, scheduler count, node name prefix, extra ``erl`` arguments.
    """

    memory_limit: int | None = None
    scheduler_limit: int | None = None
    node_prefix: str | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.memory_limit is not None:
            _positive_int(self.memory_limit, "vm_config memory_limit")
        if self.scheduler_limit is not None:
            _positive_int(self.scheduler_limit, "vm_config scheduler_limit", 1024)
        if self.node_prefix is not None:
            _check(
                NODE_PREFIX_RE.fullmatch(self.node_prefix) is not None,
                f"node_prefix {self.node_prefix!r} has characters a node name cannot hold",
            )
        _check(all(isinstance(a, str) for a in self.extra_args), "extra_args must be strings")


@dataclass(frozen=True, slots=True)
class SpecOrigin:
    """Where a spec was read from: the file, and the positions cross-app checks point at."""

    source: str
    name_pos: Position | None = None
    depends_on_pos: tuple[Position, ...] = ()


@dataclass(frozen=True)
class AppSpec:
    """One application to run, normalised, with defaults filled in.

    ``env`` maps atoms to the exact Erlang terms the user wrote; ``extra`` keeps top-level
    keys bstore does not know (reported as warnings when read). ``origin`` (not part of
    equality) says where the spec came from.
    """

    name: str
    version: str
    source: SourceSpec
    icon: IconSpec
    description: str | None = None
    env: Mapping[Atom, Term] = field(default_factory=dict)
    health: HealthSpec | None = None
    depends_on: tuple[str, ...] = ()
    isolation: Isolation = Isolation.EMBEDDED
    vm_config: VmConfig | None = None
    extra: Mapping[Atom, Term] = field(default_factory=dict)
    origin: SpecOrigin | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check(valid_app_name(self.name), f"{self.name!r} is not a valid OTP application name")
        _check(
            VERSION_RE.fullmatch(self.version) is not None,
            f"version {self.version!r} is not usable in a path",
        )
        _check(all(isinstance(k, Atom) for k in self.env), "env keys must be atoms")
        _check(
            all(valid_app_name(d) for d in self.depends_on),
            f"depends_on {self.depends_on!r} holds an invalid app name",
        )
        _check(
            isinstance(self.isolation, Isolation),
            f"isolation {self.isolation!r} is not an Isolation",
        )
        _check(
            self.vm_config is None or self.isolation is Isolation.VM,
            "vm_config is only used with isolation vm",
        )
        if self.source.type is SourceType.HEX:
            _check(self.source.ref is not None, "a hex source needs a ref (the version by default)")
        # Own copies, so a caller's later mutation cannot change a frozen spec.
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "extra", dict(self.extra))

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict; Erlang terms in the :mod:`termjson` tagged form."""
        s, h, v = self.source, self.health, self.vm_config
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "icon": {
                "type": self.icon.type.value,
                "value": self.icon.value,
                "mime_type": self.icon.mime_type,
            },
            "source": {
                "type": s.type.value,
                "ref": s.ref,
                "repo": s.repo,
                "url": s.url,
                "sha256": s.sha256,
                "mcid": s.mcid,
            },
            "env": termjson.encode(_as_term(self.env)),
            "health": None
            if h is None
            else {
                "type": h.type.value,
                "port": h.port,
                "path": h.path,
                "module": h.module,
                "interval": h.interval,
                "timeout": h.timeout,
            },
            "depends_on": list(self.depends_on),
            "isolation": self.isolation.value,
            "vm_config": None
            if v is None
            else {
                "memory_limit": v.memory_limit,
                "scheduler_limit": v.scheduler_limit,
                "node_prefix": v.node_prefix,
                "extra_args": list(v.extra_args),
            },
            "extra": termjson.encode(_as_term(self.extra)),
        }

    def to_term(self) -> dict[Term, Term]:
        """The spec as one Erlang map (what an ``app.config`` with every default would hold)."""

        def b(text: str | None) -> Term:
            return Atom("undefined") if text is None else text.encode("utf-8")

        def a(name: str | None) -> Term:
            return Atom("undefined") if name is None else Atom(name)

        def n(number: int | None) -> Term:
            return Atom("undefined") if number is None else number

        s, h, v = self.source, self.health, self.vm_config
        source: dict[Term, Term] = {Atom("type"): Atom(s.type.value)}
        for key, value in (("ref", s.ref), ("repo", s.repo), ("url", s.url)):
            if value is not None:
                source[Atom(key)] = b(value)
        if s.sha256 is not None:
            source[Atom("sha256")] = b(s.sha256)
        if s.mcid is not None:
            source[Atom("mcid")] = b(s.mcid)
        term: dict[Term, Term] = {
            Atom("name"): Atom(self.name),
            Atom("version"): b(self.version),
            Atom("description"): b(self.description),
            Atom("icon"): {
                Atom("type"): Atom(self.icon.type.value),
                Atom("value"): b(self.icon.value),
                Atom("mime_type"): b(self.icon.mime_type),
            },
            Atom("source"): source,
            Atom("env"): _as_term(self.env),
            Atom("health"): Atom("undefined")
            if h is None
            else {
                Atom("type"): Atom(h.type.value),
                Atom("port"): n(h.port),
                Atom("path"): b(h.path),
                Atom("module"): a(h.module),
                Atom("interval"): h.interval,
                Atom("timeout"): h.timeout,
            },
            Atom("depends_on"): [Atom(d) for d in self.depends_on],
            Atom("isolation"): Atom(self.isolation.value),
            Atom("vm_config"): Atom("undefined")
            if v is None
            else {
                Atom("memory_limit"): n(v.memory_limit),
                Atom("scheduler_limit"): n(v.scheduler_limit),
                Atom("node_prefix"): b(v.node_prefix),
                Atom("extra_args"): [b(arg) for arg in v.extra_args],
            },
        }
        for extra_key, extra_value in self.extra.items():
            term[extra_key] = extra_value
        return term

    def to_erlang(self) -> str:
        """:meth:`to_term` as Erlang source, ending in ``.`` (``file:consult/1`` reads it)."""
        from bstore.specs import terms  # the printer; imported late to keep this module light

        # One top-level key per line: readable, and still one term file:consult/1 reads.
        lines = [f"{terms.format(k)} => {terms.format(v)}" for k, v in self.to_term().items()]
        return "#{" + ",\n  ".join(lines) + "}.\n"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AppSpec:
        """The spec :meth:`to_json` wrote (raises :class:`InvalidSpec` on anything else)."""
        try:
            s, h, v, i = data["source"], data["health"], data["vm_config"], data["icon"]
            env = termjson.decode(data["env"])
            extra = termjson.decode(data["extra"])
            if not isinstance(env, dict) or not isinstance(extra, dict):
                raise InvalidSpec("env and extra must be JSON objects")
            return cls(
                name=data["name"],
                version=data["version"],
                description=data["description"],
                icon=IconSpec(IconType(i["type"]), i["value"], i["mime_type"]),
                source=SourceSpec(
                    SourceType(s["type"]), s["ref"], s["repo"], s["url"], s["sha256"], s["mcid"]
                ),
                env=env,  # type: ignore[arg-type]
                health=None
                if h is None
                else HealthSpec(
                    HealthType(h["type"]),
                    h["port"],
                    h["path"],
                    h["module"],
                    h["interval"],
                    h["timeout"],
                ),
                depends_on=tuple(data["depends_on"]),
                isolation=Isolation(data["isolation"]),
                vm_config=None
                if v is None
                else VmConfig(
                    v["memory_limit"],
                    v["scheduler_limit"],
                    v["node_prefix"],
                    tuple(v["extra_args"]),
                ),
                extra=extra,  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidSpec(f"not an AppSpec JSON document: {exc}") from exc
