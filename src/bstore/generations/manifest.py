"""The generation manifest: what one generation runs, as a pure value and as JSON.

A generation's ``manifest.json`` (schema :data:`SCHEMA`)::

    {
      "schema": "bstore-generation/1",
      "content_hash": "<blake3 hex of the canonical JSON of the hashed part>",
      "code_path": {"<app>-<vsn>": "<store base>/lib/<app>-<vsn>", ...},
      "apps": [ {                                    sorted by name
          "name": "web", "version": "1.2.0",
          "output": "<digest>-web-1.2.0",             the app's build output (base name)
          "mcid": "mcid1-manifest-blake3-...",        the output's content id
          "closure": ["<base>", ...],                 output and everything it references
          "modules": {"web_app": "<blake3 of ebin/web_app.beam>", ...},
          "resources": "<blake3 over every other file of the output>",
          "env": {...},                               env, tagged JSON form (termjson)
          "env_erlang": "#{port => 8080}",            env, exact Erlang source
          "isolation": "embedded" | "vm",
          "vm_config": null | {memory_limit, scheduler_limit, node_prefix, extra_args},
          "health": null | {type, port, path, module, interval, timeout},
          "depends_on": ["db"],
          "source": {type, ref, repo, url, sha256, mcid, resolved},
          "origin": "apps/web.config" | null,         not hashed
          "commit": "<git commit>" | null             not hashed
      } ],
      "meta": {"created": "2026-11-27T21:00:00Z", "commit": "<git commit>" | null}
    }

The store path of a generation is computed from ``content_hash``, which covers only what
decides what runs (``apps`` without ``origin``/``commit``, and ``code_path``): the same
content built at another time or from another commit that changes nothing that runs
gives the same store path, and the profile reuses the current generation. ``meta`` and
the per-app ``origin``/``commit`` are informational; when two writers race for the same
path the first one's metadata is kept.

:func:`parse_manifest` treats the file as untrusted: every field is type-checked, the
two env forms must agree exactly, the hash must match, and each problem names the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import blake3

from bstore.errors import BstoreError
from bstore.specs import termjson
from bstore.specs import terms as erl_terms
from bstore.specs.model import (
    MCID_RE,
    VERSION_RE,
    HealthSpec,
    HealthType,
    Isolation,
    SourceSpec,
    SourceType,
    VmConfig,
    valid_app_name,
)
from bstore.specs.terms.model import Atom, ImproperList, Term, exactly_equal
from bstore.store.paths import InvalidStorePath, StorePath

SCHEMA = "bstore-generation/1"
#: A generation of hundreds of apps is a few hundred KiB; anything this big is hostile.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MODULE_RE = re.compile(r"[A-Za-z0-9_@.\-]{1,255}")
_LIB_ENTRY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,254}")
#: Keys of an app's JSON that are recorded but not part of the content hash.
UNHASHED_APP_KEYS = ("origin", "commit")


class ManifestError(BstoreError):
    """A generation manifest that is malformed, inconsistent or not readable."""


def canonical_term(term: Term) -> Term:
    """``term`` with every map's keys in one fixed order (by their Erlang source).

    Erlang maps have no order, but the printer and the JSON form keep insertion order;
    sorting makes equal envs print, hash and compare as the same bytes.
    """
    if isinstance(term, dict):
        items = [(canonical_term(k), canonical_term(v)) for k, v in term.items()]
        items.sort(key=lambda kv: erl_terms.format(kv[0]))
        return dict(items)
    if isinstance(term, list):
        return [canonical_term(t) for t in term]
    if isinstance(term, tuple):
        return tuple(canonical_term(t) for t in term)
    if isinstance(term, ImproperList):
        return ImproperList(tuple(canonical_term(t) for t in term.items),
                            canonical_term(term.tail))
    return term


def env_term(env: Mapping[Atom, Term]) -> Term:
    """An env mapping as the Erlang map term it stands for."""
    return {k: v for k, v in env.items()}


def canonical_json(value: Any) -> bytes:
    """The one byte form hashed: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class SourceIdentity:
    """Where an app's code came from: the spec's source fields plus what they resolved to
    (e.g. the git commit a branch pointed at, or the fetched source's store path)."""

    type: SourceType
    ref: str | None = None
    repo: str | None = None
    url: str | None = None
    sha256: str | None = None
    mcid: str | None = None
    resolved: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, SourceType):
            raise ManifestError(f"source type {self.type!r} is not one of "
                                f"{', '.join(t.value for t in SourceType)}")
        for name in ("ref", "repo", "url", "sha256", "mcid", "resolved"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ManifestError(f"source {name} {value!r} is not a string")

    @classmethod
    def from_spec(cls, spec: SourceSpec, resolved: str | None = None) -> SourceIdentity:
        """The identity of a spec's source."""
        return cls(spec.type, spec.ref, spec.repo, spec.url, spec.sha256, spec.mcid, resolved)

    def same_spec(self, other: SourceIdentity) -> bool:
        """Whether both name the same source (``resolved`` aside: a branch that moved
        shows up as changed modules, not as a different source)."""
        return (self.type, self.ref, self.repo, self.url, self.sha256, self.mcid) == (
            other.type, other.ref, other.repo, other.url, other.sha256, other.mcid)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"type": self.type.value, "ref": self.ref, "repo": self.repo, "url": self.url,
                "sha256": self.sha256, "mcid": self.mcid, "resolved": self.resolved}


@dataclass(frozen=True)
class AppEntry:
    """One app of a generation (see the module docstring for the JSON form).

    ``env`` keeps the exact Erlang terms (keys are atoms); ``modules`` maps each module of
    the app's own ``ebin`` to the blake3 of its ``.beam``; ``resources`` hashes every other
    file of the output (``.app``, ``priv``...), so a change there is told apart from a
    module-only change.
    """

    name: str
    version: str
    output: StorePath
    mcid: str
    closure: tuple[StorePath, ...]
    modules: Mapping[str, str]
    resources: str
    source: SourceIdentity
    env: Mapping[Atom, Term] = field(default_factory=dict)
    isolation: Isolation = Isolation.EMBEDDED
    vm_config: VmConfig | None = None
    health: HealthSpec | None = None
    depends_on: tuple[str, ...] = ()
    origin: str | None = field(default=None, compare=False)
    commit: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"app {self.name!r}"
        if not isinstance(self.name, str) or not valid_app_name(self.name):
            raise ManifestError(f"{self.name!r} is not a valid OTP application name")
        if not isinstance(self.version, str) or not VERSION_RE.fullmatch(self.version):
            raise ManifestError(f"{where}: version {self.version!r} is not usable in a path")
        if not isinstance(self.output, StorePath):
            raise ManifestError(f"{where}: output {self.output!r} is not a store path")
        if not isinstance(self.mcid, str) or not MCID_RE.fullmatch(self.mcid):
            raise ManifestError(f"{where}: mcid {self.mcid!r} is not a content id")
        if self.output not in self.closure:
            raise ManifestError(f"{where}: closure does not contain the output {self.output}")
        if len(set(self.closure)) != len(self.closure):
            raise ManifestError(f"{where}: closure lists a path twice")
        for mod, digest in self.modules.items():
            if not isinstance(mod, str) or not _MODULE_RE.fullmatch(mod):
                raise ManifestError(f"{where}: module name {mod!r} is not valid")
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ManifestError(f"{where}: module {mod!r} hash {digest!r} is not blake3 hex")
        if not isinstance(self.resources, str) or not _HEX64.fullmatch(self.resources):
            raise ManifestError(f"{where}: resources hash {self.resources!r} is not blake3 hex")
        if not all(isinstance(k, Atom) for k in self.env):
            raise ManifestError(f"{where}: env keys must be atoms")
        if not isinstance(self.isolation, Isolation):
            raise ManifestError(f"{where}: isolation {self.isolation!r} is not an Isolation")
        if self.vm_config is not None and self.isolation is not Isolation.VM:
            raise ManifestError(f"{where}: vm_config is only used with isolation vm")
        if not all(isinstance(d, str) and valid_app_name(d) for d in self.depends_on):
            raise ManifestError(f"{where}: depends_on {self.depends_on!r} holds an invalid name")
        if self.name in self.depends_on:
            raise ManifestError(f"{where} depends on itself")
        for name, value in (("origin", self.origin), ("commit", self.commit)):
            if value is not None and not isinstance(value, str):
                raise ManifestError(f"{where}: {name} {value!r} is not a string")
        object.__setattr__(self, "env", canonical_term(env_term(self.env)))
        object.__setattr__(self, "modules", dict(sorted(self.modules.items())))

    @property
    def lib_name(self) -> str:
        """``<app>-<vsn>``: the app's directory under ``lib/``."""
        return f"{self.name}-{self.version}"

    def env_erlang(self) -> str:
        """The env as Erlang source (a map), exactly the stored terms."""
        return erl_terms.format(env_term(self.env))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (see the module docstring)."""
        h, v = self.health, self.vm_config
        return {
            "name": self.name,
            "version": self.version,
            "output": str(self.output),
            "mcid": self.mcid,
            "closure": [str(p) for p in self.closure],
            "modules": dict(self.modules),
            "resources": self.resources,
            "env": termjson.encode(env_term(self.env)),
            "env_erlang": self.env_erlang(),
            "isolation": self.isolation.value,
            "vm_config": None if v is None else {
                "memory_limit": v.memory_limit, "scheduler_limit": v.scheduler_limit,
                "node_prefix": v.node_prefix, "extra_args": list(v.extra_args)},
            "health": None if h is None else {
                "type": h.type.value, "port": h.port, "path": h.path, "module": h.module,
                "interval": h.interval, "timeout": h.timeout},
            "depends_on": list(self.depends_on),
            "source": self.source.to_json(),
            "origin": self.origin,
            "commit": self.commit,
        }


@dataclass(frozen=True)
class GenerationManifest:
    """A whole generation: its apps (by name), its code path, and metadata.

    ``code_path`` maps each ``lib/`` entry name to ``<store base>/lib/<entry>``: the app
    dirs of every app's closure. ``created`` and ``commit`` are not hashed.
    """

    apps: Mapping[str, AppEntry]
    code_path: Mapping[str, str] = field(default_factory=dict)
    created: datetime | None = field(default=None, compare=False)
    commit: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for key, app in self.apps.items():
            if not isinstance(app, AppEntry) or key != app.name:
                raise ManifestError(f"apps key {key!r} does not name its app entry")
        for entry, target in self.code_path.items():
            if not isinstance(entry, str) or not _LIB_ENTRY_RE.fullmatch(entry):
                raise ManifestError(f"code_path entry {entry!r} is not a lib dir name")
            parts = target.split("/") if isinstance(target, str) else []
            if len(parts) != 3 or parts[1] != "lib" or parts[2] != entry:
                raise ManifestError(f"code_path {entry!r} -> {target!r} is not"
                                    f" '<store path>/lib/{entry}'")
            try:
                StorePath.parse(parts[0])
            except InvalidStorePath as exc:
                raise ManifestError(f"code_path {entry!r}: {exc.message}") from exc
        if self.created is not None and self.created.tzinfo is None:
            raise ManifestError("created time must carry a time zone")
        if self.commit is not None and not isinstance(self.commit, str):
            raise ManifestError(f"commit {self.commit!r} is not a string")
        object.__setattr__(self, "apps", dict(sorted(self.apps.items())))
        object.__setattr__(self, "code_path", dict(sorted(self.code_path.items())))

    @classmethod
    def of(cls, apps: Sequence[AppEntry], code_path: Mapping[str, str] | None = None, *,
           created: datetime | None = None, commit: str | None = None) -> GenerationManifest:
        """Build from a list of apps (names must be unique)."""
        by_name: dict[str, AppEntry] = {}
        for app in apps:
            if app.name in by_name:
                raise ManifestError(f"app {app.name!r} appears twice in the generation")
            by_name[app.name] = app
        return cls(by_name, dict(code_path or {}), created, commit)

    def hashed_content(self) -> dict[str, Any]:
        """The part of the JSON the content hash covers."""
        apps = []
        for app in self.apps.values():
            data = app.to_json()
            for key in UNHASHED_APP_KEYS:
                del data[key]
            apps.append(data)
        return {"schema": SCHEMA, "apps": apps, "code_path": dict(self.code_path)}

    def content_hash(self) -> str:
        """blake3 hex of :meth:`hashed_content` in canonical JSON: the store path's hash."""
        return self._content_hash

    @cached_property
    def _content_hash(self) -> str:
        # Cached: the value is frozen, and a switch needs the hash more than once.
        return str(blake3.blake3(canonical_json(self.hashed_content())).hexdigest())

    def to_json(self) -> dict[str, Any]:
        """The full ``manifest.json`` document."""
        created = self.created
        return {
            "schema": SCHEMA,
            "content_hash": self.content_hash(),
            "code_path": dict(self.code_path),
            "apps": [app.to_json() for app in self.apps.values()],
            "meta": {
                "created": None if created is None
                else created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "commit": self.commit,
            },
        }

    def to_bytes(self) -> bytes:
        """``manifest.json`` bytes: canonical JSON plus a newline."""
        return canonical_json(self.to_json()) + b"\n"


# -- strict parsing ------------------------------------------------------------------------


class _Reader:
    """Typed access to an untrusted JSON object, errors naming the file and key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ManifestError:
        return ManifestError(f"{self.source}: {where}: {message}",
                             hint="the generation is damaged; switch to another generation"
                             " (bstore rollback --to N) and delete this one")

    def obj(self, value: Any, where: str, keys: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, found {type(value).__name__}")
        missing = [k for k in keys if k not in value]
        unknown = sorted(set(value) - set(keys))
        if missing:
            raise self.fail(where, f"missing key(s) {', '.join(map(repr, missing))}")
        if unknown:
            raise self.fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}")
        return value

    def text(self, value: Any, where: str, *, optional: bool = False) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, found {value!r:.60}")
        return value

    def integer(self, value: Any, where: str, *, optional: bool = False) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"expected an integer, found {value!r:.60}")
        return value

    def strings(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(where, "expected a list of strings")
        return value


def _parse_app(r: _Reader, raw: Any, index: int) -> AppEntry:
    keys = ("name", "version", "output", "mcid", "closure", "modules", "resources", "env",
            "env_erlang", "isolation", "vm_config", "health", "depends_on", "source",
            "origin", "commit")
    where = f"apps[{index}]"
    d = r.obj(raw, where, keys)
    name = r.text(d["name"], f"{where}.name")
    where = f"app {name!r}"
    env_text = r.text(d["env_erlang"], f"{where}.env_erlang")
    try:
        parsed = erl_terms.parse(env_text + ".", f"{r.source} ({where} env_erlang)")
        from_json = termjson.decode(d["env"], f"{r.source} ({where} env)")
    except BstoreError as exc:
        raise r.fail(where, f"env does not parse: {exc.message}") from exc
    if len(parsed) != 1 or not isinstance(parsed[0], dict):
        raise r.fail(where, "env_erlang is not one map")
    env = parsed[0]
    if not exactly_equal(env, from_json):
        raise r.fail(where, "env and env_erlang disagree")
    modules = d["modules"]
    if not isinstance(modules, dict):
        raise r.fail(f"{where}.modules", "expected an object")
    s = r.obj(d["source"], f"{where}.source",
              ("type", "ref", "repo", "url", "sha256", "mcid", "resolved"))
    try:
        source = SourceIdentity(SourceType(s["type"]), *(
            r.text(s[k], f"{where}.source.{k}", optional=True)
            for k in ("ref", "repo", "url", "sha256", "mcid", "resolved")))
        h = d["health"]
        health = None
        if h is not None:
            h = r.obj(h, f"{where}.health", ("type", "port", "path", "module", "interval",
                                             "timeout"))
            health = HealthSpec(HealthType(h["type"]),
                                r.integer(h["port"], f"{where}.health.port", optional=True),
                                r.text(h["path"], f"{where}.health.path", optional=True),
                                r.text(h["module"], f"{where}.health.module", optional=True),
                                r.integer(h["interval"], f"{where}.health.interval"),
                                r.integer(h["timeout"], f"{where}.health.timeout"))
        v = d["vm_config"]
        vm_config = None
        if v is not None:
            v = r.obj(v, f"{where}.vm_config",
                      ("memory_limit", "scheduler_limit", "node_prefix", "extra_args"))
            vm_config = VmConfig(
                r.integer(v["memory_limit"], f"{where}.vm_config.memory_limit", optional=True),
                r.integer(v["scheduler_limit"], f"{where}.vm_config.scheduler_limit",
                          optional=True),
                r.text(v["node_prefix"], f"{where}.vm_config.node_prefix", optional=True),
                tuple(r.strings(v["extra_args"], f"{where}.vm_config.extra_args")))
        return AppEntry(
            name=name,
            version=r.text(d["version"], f"{where}.version"),
            output=StorePath.parse(r.text(d["output"], f"{where}.output")),
            mcid=r.text(d["mcid"], f"{where}.mcid"),
            closure=tuple(StorePath.parse(p) for p in r.strings(d["closure"],
                                                                  f"{where}.closure")),
            modules=modules,
            resources=r.text(d["resources"], f"{where}.resources"),
            env=env,  # type: ignore[arg-type]  # checked by AppEntry: keys are atoms
            isolation=Isolation(r.text(d["isolation"], f"{where}.isolation")),
            vm_config=vm_config,
            health=health,
            depends_on=tuple(r.strings(d["depends_on"], f"{where}.depends_on")),
            source=source,
            origin=r.text(d["origin"], f"{where}.origin", optional=True),
            commit=r.text(d["commit"], f"{where}.commit", optional=True),
        )
    except ManifestError as exc:
        if exc.message.startswith(r.source):
            raise
        raise r.fail(where, exc.message) from exc
    except (BstoreError, ValueError) as exc:
        message = exc.message if isinstance(exc, BstoreError) else str(exc)
        raise r.fail(where, message) from exc


def parse_manifest(data: bytes, source: str = "manifest.json") -> GenerationManifest:
    """Read an untrusted ``manifest.json``; :class:`ManifestError` names ``source`` and the
    offending key. Checks the schema, every field, env consistency, dependency cycles and
    the content hash."""
    r = _Reader(source)
    if len(data) > MAX_MANIFEST_BYTES:
        raise r.fail("file", f"is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise r.fail("file", f"is not valid JSON ({exc})") from exc
    d = r.obj(raw, "top level", ("schema", "content_hash", "code_path", "apps", "meta"))
    if d["schema"] != SCHEMA:
        raise r.fail("schema", f"{d['schema']!r:.60} is not {SCHEMA!r}")
    if not isinstance(d["apps"], list):
        raise r.fail("apps", "expected a list")
    apps = [_parse_app(r, raw_app, i) for i, raw_app in enumerate(d["apps"])]
    names = [a.name for a in apps]
    if names != sorted(set(names)):
        raise r.fail("apps", "apps are not sorted by name or a name appears twice")
    code_path = d["code_path"]
    if not isinstance(code_path, dict) or not all(isinstance(v, str)
                                                  for v in code_path.values()):
        raise r.fail("code_path", "expected an object of strings")
    meta = r.obj(d["meta"], "meta", ("created", "commit"))
    created = None
    if meta["created"] is not None:
        try:
            created = datetime.strptime(r.text(meta["created"], "meta.created"),
                                        "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError as exc:
            raise r.fail("meta.created", f"{meta['created']!r} is not a UTC time") from exc
    try:
        manifest = GenerationManifest.of(apps, code_path, created=created,
                                         commit=r.text(meta["commit"], "meta.commit",
                                                       optional=True))
        dependency_order(manifest)
    except ManifestError as exc:
        raise r.fail("apps", exc.message) from exc
    actual = manifest.content_hash()
    if d["content_hash"] != actual:
        raise r.fail("content_hash", f"recorded {d['content_hash']!r:.80} but the content"
                     f" hashes to {actual!r}")
    return manifest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def dependency_order(manifest: GenerationManifest) -> list[str]:
    """App names, every app after the apps it depends on (deterministic: depth first
    from the names in sorted order).

    Dependencies that are not apps of the generation (OTP apps, libraries in a closure)
    impose no order. A cycle raises :class:`ManifestError` naming it.
    """
    apps = manifest.apps
    deps = {n: sorted({d for d in a.depends_on if d in apps}) for n, a in apps.items()}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(apps):
        if state.get(start) == 2:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        state[start] = 1
        while stack:
            node, i = stack[-1]
            if i < len(deps[node]):
                stack[-1] = (node, i + 1)
                nxt = deps[node][i]
                if state.get(nxt) == 1:
                    cycle = [n for n, _ in stack]
                    cycle = [*cycle[cycle.index(nxt):], nxt]
                    raise ManifestError(f"dependency cycle: {' -> '.join(cycle)}",
                                        hint="remove one depends_on entry of the cycle")
                if state.get(nxt) != 2:
                    state[nxt] = 1
                    stack.append((nxt, 0))
            else:
                stack.pop()
                state[node] = 2
                order.append(node)
    return order


def now_utc() -> datetime:
    """The current time, whole seconds, UTC (what ``meta.created`` records)."""
    return datetime.now(UTC).replace(microsecond=0)
