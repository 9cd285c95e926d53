"""The app-spec schema: a positioned term tree in, an :class:`AppSpec` and problems out (pure).

The same rules apply whatever the file format; the reader knows the format only to
phrase values the way the user wrote them and to resolve the tagged form
(:mod:`bstore.specs.termjson`) in YAML/JSON ``env``. Every problem names the file,
line and column and says what was expected; a spec with any error yields no
:class:`AppSpec`. Unknown keys are kept (``AppSpec.extra``) and reported as warnings.

For optional fields, the atoms ``undefined`` and ``null`` (YAML/JSON ``null``) mean
"not given", as they do in bc_gitops.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bstore.specs import termjson, terms
from bstore.specs.formats import SpecFormat
from bstore.specs.located import Located, Position
from bstore.specs.model import (
    DEFAULT_BASE64_ICON_MIME,
    DEFAULT_HEALTH_INTERVAL_MS,
    DEFAULT_HEALTH_TIMEOUT_MS,
    MCID_RE,
    NODE_PREFIX_RE,
    VERSION_RE,
    AppSpec,
    HealthSpec,
    HealthType,
    IconSpec,
    IconType,
    InvalidSpec,
    Isolation,
    SourceSpec,
    SourceType,
    SpecOrigin,
    VmConfig,
    valid_app_name,
)
from bstore.specs.problems import Problem, Severity, SpecError, errors_in
from bstore.specs.terms.model import Atom, Term

T = TypeVar("T")

KNOWN_KEYS = (
    "name",
    "version",
    "description",
    "icon",
    "source",
    "env",
    "health",
    "depends_on",
    "isolation",
    "vm_config",
)
_SOURCE_KEYS = {
    SourceType.HEX: ("type", "repo", "ref"),
    SourceType.GIT: ("type", "url", "ref"),
    SourceType.RELEASE: ("type", "url", "sha256"),
    SourceType.MESH: ("type", "mcid"),
}
_HEALTH_KEYS = {
    HealthType.HTTP: ("type", "port", "path", "interval", "timeout"),
    HealthType.TCP: ("type", "port", "interval", "timeout"),
    HealthType.CUSTOM: ("type", "module", "interval", "timeout"),
}
_ICON_KEYS = ("type", "value", "mime_type")
_VM_KEYS = ("memory_limit", "scheduler_limit", "node_prefix", "extra_args")
_MODULE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.@]{0,254}")
_RELEASE_URL_RE = re.compile(r"(https?|file)://\S+")
_ABSENT = (Atom("undefined"), Atom("null"))
#: A memory limit above this (1 TiB, in MB) is a unit mistake, not a plan.
_MAX_MEMORY_MB = 1 << 20


class _Invalid(Exception):
    """Internal: a field was reported as an error; stop reading that field."""


@dataclass
class _Map:
    """A map (or proplist) read into its keys: name -> (key node, value node)."""

    node: Located
    path: str
    entries: dict[str, tuple[Located, Located]] = field(default_factory=dict)

    def get(self, key: str) -> Located | None:
        entry = self.entries.get(key)
        if entry is None or entry[1].term in _ABSENT:
            return None
        return entry[1]

    def where(self, key: str) -> Position:
        entry = self.entries.get(key)
        return entry[0].pos if entry else self.node.pos


class _Reader:
    def __init__(self, source: str, fmt: SpecFormat) -> None:
        self.source, self.fmt = source, fmt
        self.problems: list[Problem] = []

    # -- reporting ---------------------------------------------------------------

    def error(self, pos: Position, message: str, hint: str | None = None) -> _Invalid:
        self.problems.append(Problem(Severity.ERROR, self.source, pos, message, hint))
        return _Invalid()

    def warn(self, pos: Position, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(Severity.WARNING, self.source, pos, message, hint))

    def show(self, term: Term) -> str:
        """``term`` as the user would have written it, for messages."""
        erlang = self.fmt is SpecFormat.ERLANG
        if isinstance(term, Atom):
            return terms.format(term) if erlang else term.name
        if isinstance(term, bytes):
            text = term.decode("utf-8", "replace")
            short = text if len(text) <= 60 else text[:57] + "..."
            return f'<<"{short}">>' if erlang else f"string {short!r}"
        if isinstance(term, int | float):
            return f"{'integer' if isinstance(term, int) else 'float'} {term!r}"
        if isinstance(term, list):
            chars = _charlist(term)
            if chars:
                return f'the string "{chars[:60]}"' if erlang else "a list of numbers"
            return "a list"
        if isinstance(term, tuple):
            return "a tuple"
        if isinstance(term, dict):
            return "a map" if erlang else "a mapping"
        return "an improper list"

    def expected(self, node: Located, path: str, what: str, hint: str | None = None) -> _Invalid:
        return self.error(node.pos, f"{path}: expected {what}, found {self.show(node.term)}", hint)

    # -- value readers ------------------------------------------------------------

    def text(self, node: Located, path: str, hint: str | None = None) -> str:
        term = node.term
        if isinstance(term, bytes):
            try:
                return term.decode("utf-8")
            except UnicodeDecodeError:
                raise self.error(node.pos, f"{path}: expected UTF-8 text in the binary") from None
        if self.fmt is SpecFormat.ERLANG and isinstance(term, list):
            text = _charlist(term)
            if text is not None:
                return text
        what = 'a string (<<"...">> or "...")' if self.fmt is SpecFormat.ERLANG else "a string"
        raise self.expected(node, path, what, hint)

    def name(self, node: Located, path: str) -> str:
        term = node.term
        text = term.name if isinstance(term, Atom) else self.text(node, path)
        if not valid_app_name(text):
            raise self.error(
                node.pos,
                f"{path}: {text!r} is not a valid OTP application name",
                hint="use a lowercase letter, then letters, digits or '_' (at most 255)",
            )
        return text

    def choice(self, node: Located, path: str, choices: Callable[[str], T], names: str) -> T:
        term = node.term
        text = term.name if isinstance(term, Atom) else None
        if isinstance(term, bytes | list):
            try:
                text = self.text(node, path)
            except _Invalid:
                self.problems.pop()
                text = None
        if text is not None:
            try:
                return choices(text)
            except ValueError:
                pass
        raise self.expected(node, path, names)

    def integer(self, node: Located, path: str, low: int, high: int, unit: str = "") -> int:
        term = node.term
        if not isinstance(term, int):
            raise self.expected(node, path, f"an integer{unit}")
        if not low <= term <= high:
            raise self.error(
                node.pos, f"{path}: {term} is out of range; expected {low} to {high}{unit}"
            )
        return term

    def mapping(self, node: Located, path: str) -> _Map:
        """A map, or (in Erlang terms) a proplist of ``{atom, Value}``, by key name."""
        result = _Map(node, path)
        term = node.term
        if isinstance(term, dict):
            pairs = list(zip(node.children[0::2], node.children[1::2], strict=True))
        elif isinstance(term, list) and (self.fmt is SpecFormat.ERLANG or not term):
            pairs = []
            for item in node.children:
                if not (isinstance(item.term, tuple) and len(item.term) == 2):
                    raise self.expected(item, path, "a {Key, Value} pair in the proplist")
                pairs.append((item.children[0], item.children[1]))
        else:
            what = (
                "a map #{...} or a proplist [{Key, Value}]"
                if self.fmt is SpecFormat.ERLANG
                else "a mapping"
            )
            raise self.expected(node, path, what)
        for key, value in pairs:
            if not isinstance(key.term, Atom):
                raise self.expected(
                    key,
                    path,
                    "an atom key",
                    hint='keys are atoms: write name => ..., not <<"name">> => ...',
                )
            name = key.term.name
            if name in result.entries:
                first = result.entries[name][0].pos
                raise self.error(key.pos, f"{path}: duplicate key {name!r} (first at {first})")
            result.entries[name] = (key, value)
        return result

    def unknown(self, m: _Map, allowed: tuple[str, ...], what: str) -> None:
        for name, (key, _value) in m.entries.items():
            if name not in allowed:
                self.warn(
                    key.pos,
                    f"{m.path}: key {name!r} is not used {what} (ignored)",
                    hint=f"known keys: {', '.join(allowed)}",
                )

    def required(self, m: _Map, key: str, what: str) -> Located:
        node = m.get(key)
        if node is None:
            raise self.error(m.node.pos, f"{m.path}: missing required key {key!r} ({what})")
        return node

    def field(self, read: Callable[[], T]) -> T | None:
        """Run one field reader; its errors are already recorded, so carry on."""
        try:
            return read()
        except _Invalid:
            return None

    # -- fields -------------------------------------------------------------------

    def icon(self, m: _Map, name: str) -> IconSpec:
        node = m.get("icon")
        if node is None:
            return IconSpec.identicon(name)
        icon = self.mapping(node, "icon")
        type_node = icon.get("type")
        kind = (
            IconType.IDENTICON
            if type_node is None
            else self.choice(type_node, "icon.type", IconType, "url, base64 or identicon")
        )
        self.unknown(icon, _ICON_KEYS, "in icon")
        if kind is IconType.IDENTICON:
            if icon.get("value") is not None:
                self.warn(
                    icon.where("value"), "icon.value is not used with type identicon (ignored)"
                )
            return IconSpec.identicon(name)
        value = self.text(
            self.required(icon, "value", f"the icon {'URL' if kind is IconType.URL else 'data'}"),
            "icon.value",
        )
        mime_node = icon.get("mime_type")
        mime = self.text(mime_node, "icon.mime_type") if mime_node else None
        if kind is IconType.BASE64:
            value_node = icon.get("value")
            assert value_node is not None
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise self.error(value_node.pos, "icon.value: expected base64 data") from None
            mime = mime or DEFAULT_BASE64_ICON_MIME
        return IconSpec(kind, value, mime)

    def source_spec(self, m: _Map, version: str | None) -> SourceSpec | None:
        node = m.get("source")
        if node is None:
            return SourceSpec(SourceType.HEX, ref=version) if version else None
        src = self.mapping(node, "source")
        kind = self.choice(
            self.required(src, "type", "hex, git, release or mesh"),
            "source.type",
            SourceType,
            "hex, git, release or mesh",
        )
        self.unknown(src, _SOURCE_KEYS[kind], f"by {kind.value} sources")

        def opt(key: str) -> str | None:
            value = src.get(key)
            if value is None:
                return None
            text = self.text(value, f"source.{key}")
            if not text or text.startswith("-") or any(c.isspace() or ord(c) < 32 for c in text):
                raise self.error(
                    value.pos,
                    f"source.{key}: {text!r} must be non-empty, without whitespace,"
                    " and not start with '-'",
                )
            return text

        if kind is SourceType.HEX:
            ref = opt("ref") or version
            return SourceSpec(kind, ref=ref, repo=opt("repo")) if ref else None
        if kind is SourceType.GIT:
            self.required(src, "url", "the repository to clone")
            return SourceSpec(kind, url=opt("url"), ref=opt("ref"))
        if kind is SourceType.RELEASE:
            url_node = self.required(src, "url", "where to download the release")
            sha_node = self.required(src, "sha256", "the SHA-256 of the download")
            url = opt("url")
            if url is None or not _RELEASE_URL_RE.fullmatch(url):
                raise self.error(
                    url_node.pos,
                    f"source.url: expected an http://, https:// or file:// URL, found {url!r}",
                )
            return SourceSpec(kind, url=url, sha256=self.sha256(sha_node))
        mcid_node = self.required(src, "mcid", "the content id of the tree")
        mcid = self.text(mcid_node, "source.mcid")
        if not MCID_RE.fullmatch(mcid):
            raise self.error(
                mcid_node.pos,
                "source.mcid: expected mcid1-manifest-blake3-<64 lowercase hex digits>,"
                f" found {mcid!r}",
            )
        return SourceSpec(kind, mcid=mcid)

    def sha256(self, node: Located) -> str:
        text = self.text(node, "source.sha256").strip()
        if re.fullmatch(r"[0-9a-fA-F]+", text):
            if len(text) == 64:
                return text.lower()
            raise self.error(
                node.pos,
                f"source.sha256: {text!r} is {len(text)} hex digits;"
                " expected 64 (or 44 base64 characters)",
            )
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self.error(
                node.pos, f"source.sha256: {text!r} is neither hex nor base64"
            ) from None
        if len(raw) != 32:
            raise self.error(
                node.pos, f"source.sha256: {text!r} decodes to {len(raw)} bytes; a SHA-256 is 32"
            )
        return raw.hex()

    def env(self, m: _Map) -> dict[Atom, Term]:
        node = m.get("env")
        if node is None:
            return {}
        env = self.mapping(node, "env")
        result: dict[Atom, Term] = {}
        for name, (_key, value) in env.entries.items():
            if self.fmt is SpecFormat.ERLANG:
                result[Atom(name)] = value.term
                continue
            try:
                result[Atom(name)] = termjson.untag(value, self.source)
            except SpecError as exc:
                self.problems.append(exc.problem)
                raise _Invalid() from exc
        return result

    def health(self, m: _Map) -> HealthSpec | None:
        node = m.get("health")
        if node is None:
            return None
        h = self.mapping(node, "health")
        kind = self.choice(
            self.required(h, "type", "http, tcp or custom"),
            "health.type",
            HealthType,
            "http, tcp or custom",
        )
        self.unknown(h, _HEALTH_KEYS[kind], f"by {kind.value} health checks")
        port = path = module = None
        if kind in (HealthType.HTTP, HealthType.TCP):
            port = self.integer(self.required(h, "port", "1-65535"), "health.port", 1, 65535)
        if kind is HealthType.HTTP:
            path_node = self.required(h, "path", "the URL path to GET, e.g. /health")
            path = self.text(path_node, "health.path")
            if not path.startswith("/") or any(c.isspace() or ord(c) < 32 for c in path):
                raise self.error(
                    path_node.pos,
                    f"health.path: expected a URL path starting with '/', found {path!r}",
                )
        if kind is HealthType.CUSTOM:
            mod_node = self.required(h, "module", "a module exporting check/0")
            term = mod_node.term
            module = term.name if isinstance(term, Atom) else self.text(mod_node, "health.module")
            if not _MODULE_RE.fullmatch(module):
                raise self.error(mod_node.pos, f"health.module: {module!r} is not a module name")
        ms = " (milliseconds)"
        interval_node, timeout_node = h.get("interval"), h.get("timeout")
        interval = (
            self.integer(interval_node, "health.interval", 1, 86_400_000, ms)
            if interval_node
            else DEFAULT_HEALTH_INTERVAL_MS
        )
        timeout = (
            self.integer(timeout_node, "health.timeout", 1, 86_400_000, ms)
            if timeout_node
            else DEFAULT_HEALTH_TIMEOUT_MS
        )
        return HealthSpec(kind, port, path, module, interval, timeout)

    def depends_on(self, m: _Map) -> tuple[tuple[str, ...], tuple[Position, ...]]:
        node = m.get("depends_on")
        if node is None:
            return (), ()
        if not isinstance(node.term, list) or (
            self.fmt is SpecFormat.ERLANG and _charlist(node.term)
        ):
            raise self.expected(node, "depends_on", "a list of app names", hint="e.g. [db, cache]")
        names: list[str] = []
        positions: list[Position] = []
        for item in node.children:
            dep = self.name(item, "depends_on")
            if dep in names:
                self.warn(item.pos, f"depends_on: {dep!r} is listed twice")
                continue
            names.append(dep)
            positions.append(item.pos)
        return tuple(names), tuple(positions)

    def vm_config(self, m: _Map, isolation: Isolation | None) -> VmConfig | None:
        node = m.get("vm_config")
        if node is None:
            return None
        vm = self.mapping(node, "vm_config")
        if isolation is Isolation.EMBEDDED:
            written = "isolation => vm" if self.fmt is SpecFormat.ERLANG else "isolation: vm"
            raise self.error(
                m.where("vm_config"), f"vm_config is only used with {written}; this app is embedded"
            )
        self.unknown(vm, _VM_KEYS, "in vm_config")
        mem, sched, prefix = (
            vm.get("memory_limit"),
            vm.get("scheduler_limit"),
            vm.get("node_prefix"),
        )
        prefix_text = self.text(prefix, "vm_config.node_prefix") if prefix else None
        if (
            prefix is not None
            and prefix_text is not None
            and not NODE_PREFIX_RE.fullmatch(prefix_text)
        ):
            raise self.error(
                prefix.pos,
                f"vm_config.node_prefix: {prefix_text!r} may only hold letters, digits,"
                " '_', '-' and '.'",
            )
        args: list[str] = []
        args_node = vm.get("extra_args")
        if args_node is not None:
            if not isinstance(args_node.term, list) or (
                self.fmt is SpecFormat.ERLANG and _charlist(args_node.term)
            ):
                raise self.expected(
                    args_node,
                    "vm_config.extra_args",
                    "a list of strings",
                    hint='e.g. ["+P", "1000000"]',
                )
            args = [self.text(a, "vm_config.extra_args") for a in args_node.children]
        return VmConfig(
            self.integer(mem, "vm_config.memory_limit", 1, _MAX_MEMORY_MB, " (MB)")
            if mem
            else None,
            self.integer(sched, "vm_config.scheduler_limit", 1, 1024) if sched else None,
            prefix_text,
            tuple(args),
        )


def _charlist(term: list[Term]) -> str | None:
    """The text of a list of character codes, or None if ``term`` is not one."""
    if not all(
        isinstance(c, int) and 0 <= c <= 0x10FFFF and not 0xD800 <= c < 0xE000 for c in term
    ):
        return None
    return "".join(chr(c) for c in term)  # type: ignore[arg-type]


def spec_from_located(
    root: Located, fmt: SpecFormat, source: str, expected_name: str | None = None
) -> tuple[AppSpec | None, list[Problem]]:
    """Validate one spec tree: the spec (``None`` if any error) and every problem found.

    ``expected_name`` is the name of the app's directory; the spec's ``name`` must equal it.
    """
    r = _Reader(source, fmt)
    try:
        top = r.mapping(root, "spec")
    except _Invalid:
        return None, r.problems
    top.path = "spec"
    extra: dict[Atom, Term] = {}
    for key_name, (key, value) in top.entries.items():
        if key_name not in KNOWN_KEYS:
            r.warn(
                key.pos,
                f"unknown key {key_name!r} (kept, but bstore does not use it)",
                hint=f"known keys: {', '.join(KNOWN_KEYS)}",
            )
            extra[Atom(key_name)] = value.term

    def name() -> str:
        node = r.required(top, "name", "the OTP application name")
        text = r.name(node, "name")
        if expected_name is not None and text != expected_name:
            raise r.error(
                node.pos,
                f"name {text!r} does not match its directory {expected_name!r}",
                hint=f"rename the directory to {text!r} or set name to {expected_name!r}",
            )
        return text

    def version() -> str:
        node = r.required(top, "version", 'a string such as "1.0.0"')
        text = r.text(
            node,
            "version",
            hint='quote it: version: "1.0"' if fmt is not SpecFormat.ERLANG else None,
        )
        if not VERSION_RE.fullmatch(text):
            raise r.error(
                node.pos,
                f"version: {text!r} is not a usable version;"
                " expected letters, digits, '.', '+', '_' or '-'",
            )
        return text

    app_name = r.field(name)
    app_version = r.field(version)
    description_node = top.get("description")
    description = (
        r.field(lambda: r.text(description_node, "description")) if description_node else None
    )
    icon = r.field(lambda: r.icon(top, app_name or "")) if app_name else None
    src_spec = r.field(lambda: r.source_spec(top, app_version))
    env = r.field(lambda: r.env(top))
    health = r.field(lambda: r.health(top))
    deps = r.field(lambda: r.depends_on(top))
    isolation_node = top.get("isolation")
    isolation = (
        r.field(lambda: r.choice(isolation_node, "isolation", Isolation, "embedded or vm"))
        if isolation_node
        else Isolation.EMBEDDED
    )
    vm_config = r.field(lambda: r.vm_config(top, isolation))
    if errors_in(r.problems):
        return None, r.problems
    assert app_name and app_version and icon and src_spec and env is not None and deps and isolation
    try:
        spec = AppSpec(
            name=app_name,
            version=app_version,
            source=src_spec,
            icon=icon,
            description=description,
            env=env,
            health=health,
            depends_on=deps[0],
            isolation=isolation,
            vm_config=vm_config,
            extra=extra,
            origin=SpecOrigin(source=source, name_pos=top.where("name"), depends_on_pos=deps[1]),
        )
    except InvalidSpec as exc:  # a rule the model checks that the reader above missed
        r.error(root.pos, exc.message)
        return None, r.problems
    return spec, r.problems
