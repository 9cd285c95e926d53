"""The spec schema: one table row per rule and per error, asserting message and position."""

from __future__ import annotations

from pathlib import Path

import pytest

from bstore.specs import identicon
from bstore.specs.loader import SpecResult, load_spec, load_spec_file
from bstore.specs.model import (
    AppSpec,
    HealthType,
    IconType,
    Isolation,
    SourceType,
)
from bstore.specs.problems import Severity, SpecError
from bstore.specs.terms.model import Atom, ImproperList

_FILE = {"erl": "app.config", "yaml": "app.yaml", "json": "app.json"}


def _load(tmp_path: Path, fmt: str, text: str, app: str = "web") -> SpecResult:
    app_dir = tmp_path / app
    app_dir.mkdir()
    path = app_dir / _FILE[fmt]
    path.write_text(text, encoding="utf-8")
    return load_spec_file(path, source=f"{app}/{path.name}", expected_name=app)


def _ok(tmp_path: Path, fmt: str, text: str, app: str = "web") -> AppSpec:
    result = _load(tmp_path, fmt, text, app)
    assert result.errors == [], [str(p) for p in result.errors]
    assert result.spec is not None
    return result.spec


# (format, spec text, line, column, message fragment). The first error must match.
ERRORS = [
    # name
    ("erl", '#{version => <<"1">>}.', 1, 1, "spec: missing required key 'name'"),
    (
        "erl",
        "#{name => 'Web', version => \"1\"}.",
        1,
        11,
        "name: 'Web' is not a valid OTP application name",
    ),
    ("yaml", "name: 9lives\nversion: '1'\n", 1, 7, "'9lives' is not a valid OTP application name"),
    (
        "erl",
        '#{name => api, version => "1"}.',
        1,
        11,
        "name 'api' does not match its directory 'web'",
    ),
    (
        "json",
        '{"name": "api", "version": "1"}',
        1,
        10,
        "name 'api' does not match its directory 'web'",
    ),
    ("erl", '#{name => {web}, version => "1"}.', 1, 11, "name: expected a string"),
    # version
    ("yaml", "name: web\n", 1, 1, "spec: missing required key 'version'"),
    ("yaml", "name: web\nversion: 1.0\n", 2, 10, "version: expected a string, found float 1.0"),
    (
        "erl",
        "#{name => web, version => '1.0'}.",
        1,
        27,
        'version: expected a string (<<"...">> or "..."), found \'1.0\'',
    ),
    (
        "json",
        '{"name": "web", "version": "1.0 beta"}',
        1,
        28,
        "version: '1.0 beta' is not a usable version",
    ),
    ("json", '{"name": "web", "version": "../x"}', 1, 28, "'../x' is not a usable version"),
    # description
    (
        "yaml",
        "name: web\nversion: '1'\ndescription: [a]\n",
        3,
        14,
        "description: expected a string, found a list",
    ),
    # icon
    (
        "yaml",
        "name: web\nversion: '1'\nicon: {type: gif}\n",
        3,
        14,
        "icon.type: expected url, base64 or identicon, found string 'gif'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nicon: {type: url}\n",
        3,
        7,
        "icon: missing required key 'value'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nicon: {type: base64, value: '***'}\n",
        3,
        29,
        "icon.value: expected base64 data",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nicon: logo.png\n",
        3,
        7,
        "icon: expected a mapping, found string 'logo.png'",
    ),
    # source
    (
        "erl",
        '#{name => web, version => "1", source => #{type => svn}}.',
        1,
        52,
        "source.type: expected hex, git, release or mesh, found svn",
    ),
    (
        "erl",
        '#{name => web, version => "1", source => #{ref => "x"}}.',
        1,
        42,
        "source: missing required key 'type'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nsource: {type: git}\n",
        3,
        9,
        "source: missing required key 'url'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nsource: {type: git, url: '--upload-pack=x'}\n",
        3,
        26,
        "must be non-empty, without whitespace, and not start with '-'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nsource: {type: hex, ref: '-x'}\n",
        3,
        26,
        "source.ref: '-x' must be non-empty",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nsource: {type: release, url: 'https://h/x.tgz'}\n",
        3,
        9,
        "source: missing required key 'sha256'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\n"
        "source: {type: release, url: 'https://h/x.tgz', sha256: abc123}\n",
        3,
        57,
        "source.sha256: 'abc123' is 6 hex digits; expected 64",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\n"
        "source: {type: release, url: 'https://h/x.tgz', sha256: 'QUJD'}\n",
        3,
        57,
        "decodes to 3 bytes; a SHA-256 is 32",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\n"
        "source: {type: release, url: 'https://h/x.tgz', sha256: 'not*b64'}\n",
        3,
        57,
        "is neither hex nor base64",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\n"
        f"source: {{type: release, url: 'ftp://h/x', sha256: {'a' * 64}}}\n",
        3,
        30,
        "source.url: expected an http://, https:// or file:// URL",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nsource: {type: mesh}\n",
        3,
        9,
        "source: missing required key 'mcid'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\n"
        "source: {type: mesh, mcid: mcid1-manifest-blake3-5d41402abc4b2a76b9719d911017c592}\n",
        3,
        28,
        "source.mcid: expected mcid1-manifest-blake3-<64 lowercase hex digits>",
    ),
    # env
    (
        "yaml",
        "name: web\nversion: '1'\nenv: [1, 2]\n",
        3,
        6,
        "env: expected a mapping, found a list",
    ),
    (
        "erl",
        '#{name => web, version => "1", env => #{<<"k">> => 1}}.',
        1,
        41,
        'env: expected an atom key, found <<"k">>',
    ),
    (
        "erl",
        '#{name => web, version => "1", env => [{a, 1}, b]}.',
        1,
        48,
        "env: expected a {Key, Value} pair in the proplist, found b",
    ),
    (
        "erl",
        '#{name => web, version => "1", env => [{a, 1}, {a, 2}]}.',
        1,
        49,
        "env: duplicate key 'a' (first at 1:41)",
    ),
    (
        "erl",
        '#{name => web, version => "1", env => #{a => 1, a => 2}}.',
        1,
        49,
        "env: duplicate key 'a' (first at 1:41)",
    ),
    ("yaml", "name: web\nversion: '1'\nenv:\n  k: {$foo: 1}\n", 4, 7, "unknown tag '$foo'"),
    (
        "yaml",
        "name: web\nversion: '1'\nenv:\n  k: {$atom: 5}\n",
        4,
        14,
        "$atom expects a string, found 5",
    ),
    (
        "json",
        '{"name": "web", "version": "1", "env": {"k": {"$atom": "a", "x": 1}}}',
        1,
        47,
        "a tagged value '$atom' must be the only key",
    ),
    (
        "json",
        '{"name": "web", "version": "1", "env": {"k": {"$tuple": "a"}}}',
        1,
        57,
        "$tuple expects a list",
    ),
    (
        "json",
        '{"name": "web", "version": "1", "env": {"k": {"$improper": [1, [2]]}}}',
        1,
        60,
        "$improper expects at least one element and a tail that is not a list",
    ),
    (
        "json",
        '{"name": "web", "version": "1", "env": {"k": {"$map": [[1, 2], [1, 3]]}}}',
        1,
        64,
        "duplicate key 1 in $map",
    ),
    (
        "json",
        '{"name": "web", "version": "1", "env": {"k": {"$base64": "@@"}}}',
        1,
        58,
        "$base64 value '@@' is not base64",
    ),
    # health
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: grpc, port: 1}\n",
        3,
        16,
        "health.type: expected http, tcp or custom, found string 'grpc'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {port: 1}\n",
        3,
        9,
        "health: missing required key 'type'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: tcp}\n",
        3,
        9,
        "health: missing required key 'port'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: tcp, port: 0}\n",
        3,
        27,
        "health.port: 0 is out of range; expected 1 to 65535",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: tcp, port: 65536}\n",
        3,
        27,
        "health.port: 65536 is out of range",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: tcp, port: '80'}\n",
        3,
        27,
        "health.port: expected an integer, found string '80'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: http, port: 80}\n",
        3,
        9,
        "health: missing required key 'path'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: http, port: 80, path: health}\n",
        3,
        38,
        "health.path: expected a URL path starting with '/'",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: custom}\n",
        3,
        9,
        "health: missing required key 'module'",
    ),
    (
        "erl",
        '#{name => web, version => "1", health => #{type => custom, module => 42}}.',
        1,
        70,
        "health.module: expected a string",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: tcp, port: 1, interval: 0}\n",
        3,
        40,
        "health.interval: 0 is out of range; expected 1 to 86400000 (milliseconds)",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: tcp, port: 1, timeout: 5s}\n",
        3,
        39,
        "health.timeout: expected an integer (milliseconds), found string '5s'",
    ),
    # depends_on
    (
        "yaml",
        "name: web\nversion: '1'\ndepends_on: db\n",
        3,
        13,
        "depends_on: expected a list of app names, found string 'db'",
    ),
    (
        "erl",
        '#{name => web, version => "1", depends_on => "db"}.',
        1,
        46,
        'depends_on: expected a list of app names, found the string "db"',
    ),
    (
        "yaml",
        "name: web\nversion: '1'\ndepends_on: [db, Bad-Name]\n",
        3,
        18,
        "depends_on: 'Bad-Name' is not a valid OTP application name",
    ),
    # isolation
    (
        "yaml",
        "name: web\nversion: '1'\nisolation: container\n",
        3,
        12,
        "isolation: expected embedded or vm, found string 'container'",
    ),
    (
        "erl",
        '#{name => web, version => "1", isolation => 1}.',
        1,
        45,
        "isolation: expected embedded or vm, found integer 1",
    ),
    # vm_config
    (
        "yaml",
        "name: web\nversion: '1'\nvm_config: {memory_limit: 5}\n",
        3,
        1,
        "vm_config is only used with isolation: vm; this app is embedded",
    ),
    (
        "erl",
        '#{name => web, version => "1", vm_config => #{}}.',
        1,
        32,
        "vm_config is only used with isolation => vm",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nisolation: vm\nvm_config: {memory_limit: 0}\n",
        4,
        27,
        "vm_config.memory_limit: 0 is out of range; expected 1 to 1048576 (MB)",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nisolation: vm\nvm_config: {scheduler_limit: 2000}\n",
        4,
        30,
        "vm_config.scheduler_limit: 2000 is out of range; expected 1 to 1024",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nisolation: vm\nvm_config: {node_prefix: 'a b'}\n",
        4,
        26,
        "vm_config.node_prefix: 'a b' may only hold letters",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nisolation: vm\nvm_config: {extra_args: '+P 1'}\n",
        4,
        25,
        "vm_config.extra_args: expected a list of strings",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nisolation: vm\nvm_config: {extra_args: ['+P', 1]}\n",
        4,
        32,
        "vm_config.extra_args: expected a string, found integer 1",
    ),
    (
        "erl",
        '#{name => web, version => "1", isolation => vm, vm_config => #{extra_args => "+P"}}.',
        1,
        78,
        'vm_config.extra_args: expected a list of strings, found the string "+P"',
    ),
    # the whole file
    ("yaml", "- name\n- web\n", 1, 1, "spec: expected a mapping, found a list"),
    ("json", '"web"', 1, 1, "spec: expected a mapping, found string 'web'"),
    (
        "erl",
        "{name, web}.",
        1,
        1,
        "spec: expected a map #{...} or a proplist [{Key, Value}], found a tuple",
    ),
    (
        "erl",
        '#{name => web, version => "1"}.\n#{}.',
        2,
        1,
        "expected one map or proplist, found a second term",
    ),
    ("erl", "%% nothing here\n", 1, 1, "expected one map or proplist ending in '.', found no term"),
    (
        "erl",
        '[{name, web}, {name, web}, {version, "1"}].',
        1,
        16,
        "spec: duplicate key 'name' (first at 1:3)",
    ),
    ("erl", '#{1 => web, version => "1"}.', 1, 3, "spec: expected an atom key, found integer 1"),
    (
        "erl",
        '#{"name" => web, version => "1"}.',
        1,
        3,
        "map key [110, 97, 109, 101] is a list or map",
    ),
    ("erl", '#{name => web,\n  version := "1"}.', 2, 11, "expected '=>' or ',' in map, found ':='"),
    (
        "json",
        '{"name": "web",\n "version": "1",}',
        2,
        17,
        "expected a string key in object, found '}'",
    ),
    ("yaml", "name: web\nversion: [1\n", 3, 1, "YAML syntax"),
]


@pytest.mark.parametrize(("fmt", "text", "line", "column", "message"), ERRORS)
def test_spec_errors(
    tmp_path: Path, fmt: str, text: str, line: int, column: int, message: str
) -> None:
    result = _load(tmp_path, fmt, text)
    assert result.spec is None
    first = result.errors[0]
    assert message in first.message, str(first)
    assert first.pos is not None and (first.pos.line, first.pos.column) == (line, column), str(
        first
    )
    assert first.source == f"web/{_FILE[fmt]}"
    assert str(first).startswith(f"web/{_FILE[fmt]}:{line}:{column}: error: ")


# (format, spec text, line, column, warning fragment) for specs that are valid with a warning.
WARNINGS = [
    (
        "yaml",
        "name: web\nversion: '1'\nlicense: MIT\n",
        3,
        1,
        "unknown key 'license' (kept, but bstore does not use it)",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nsource: {type: hex, url: 'https://x'}\n",
        3,
        21,
        "source: key 'url' is not used by hex sources (ignored)",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nhealth: {type: tcp, port: 1, path: /x}\n",
        3,
        30,
        "health: key 'path' is not used by tcp health checks",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nicon: {type: identicon, value: x}\n",
        3,
        25,
        "icon.value is not used with type identicon",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\ndepends_on: [db, db]\n",
        3,
        18,
        "depends_on: 'db' is listed twice",
    ),
    (
        "yaml",
        "name: web\nversion: '1'\nisolation: vm\nvm_config: {cpus: 2}\n",
        4,
        13,
        "vm_config: key 'cpus' is not used in vm_config",
    ),
    (
        "erl",
        '#{name => web, version => "1", icon => #{type => url, value => "u", size => 3}}.',
        1,
        69,
        "icon: key 'size' is not used in icon",
    ),
]


@pytest.mark.parametrize(("fmt", "text", "line", "column", "message"), WARNINGS)
def test_spec_warnings(
    tmp_path: Path, fmt: str, text: str, line: int, column: int, message: str
) -> None:
    result = _load(tmp_path, fmt, text)
    assert result.spec is not None and result.errors == []
    warnings = [p for p in result.problems if p.severity is Severity.WARNING]
    assert len(warnings) == 1, [str(w) for w in warnings]
    assert message in warnings[0].message
    assert warnings[0].pos is not None
    assert (warnings[0].pos.line, warnings[0].pos.column) == (line, column)


def test_unknown_keys_are_kept(tmp_path: Path) -> None:
    spec = _ok(tmp_path, "erl", '#{name => web, version => "1", license => <<"MIT">>, x => [a]}.')
    assert spec.extra == {Atom("license"): b"MIT", Atom("x"): [Atom("a")]}


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    spec = _ok(tmp_path, "yaml", "name: web\nversion: '1.2.3'\nhealth: {type: tcp, port: 9}\n")
    assert spec.source.type is SourceType.HEX and spec.source.ref == "1.2.3"
    assert spec.source.repo is None
    assert spec.icon.type is IconType.IDENTICON
    assert spec.icon.value == identicon.data_uri("web")
    assert spec.icon.mime_type == "image/svg+xml"
    assert spec.isolation is Isolation.EMBEDDED and spec.vm_config is None
    assert spec.health is not None
    assert (spec.health.interval, spec.health.timeout) == (30000, 5000)
    assert spec.env == {} and spec.depends_on == () and spec.description is None


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("erl", '#{name => web, version => <<"2.0">>}.'),
        ("erl", '[{name, web}, {version, "2.0"}].'),
        ("erl", '[{name, <<"web">>}, {version, "2.0"}, {description, undefined}].\n'),
        ("yaml", "name: web\nversion: '2.0'\ndescription: null\nhealth: ~\n"),
        ("json", '{"name": "web", "version": "2.0", "icon": null}'),
    ],
)
def test_every_format_and_shape_gives_the_same_spec(tmp_path: Path, fmt: str, text: str) -> None:
    spec = _ok(tmp_path, fmt, text)
    assert spec.name == "web" and spec.version == "2.0"
    assert spec == AppSpec(name="web", version="2.0", source=spec.source, icon=spec.icon)


def test_source_variants(tmp_path: Path) -> None:
    sha_hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    cases = {
        "a": (
            "source: {type: hex, repo: hexpm_mine, ref: '9.9'}",
            ("hex", "9.9", "hexpm_mine", None, None, None),
        ),
        "b": (
            "source: {type: git, url: 'https://g/x.git', ref: main}",
            ("git", "main", None, "https://g/x.git", None, None),
        ),
        "c": (
            "source: {type: git, url: 'git@github.com:o/r.git'}",
            ("git", None, None, "git@github.com:o/r.git", None, None),
        ),
        "d": (
            f"source: {{type: release, url: 'https://h/x.tgz', sha256: {sha_hex.upper()}}}",
            ("release", None, None, "https://h/x.tgz", sha_hex, None),
        ),
        "e": (
            "source: {type: release, url: 'file:///x.tgz',"
            " sha256: '47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='}",
            ("release", None, None, "file:///x.tgz", sha_hex, None),
        ),
        "f": (
            f"source: {{type: mesh, mcid: mcid1-manifest-blake3-{'0f' * 32}}}",
            ("mesh", None, None, None, None, f"mcid1-manifest-blake3-{'0f' * 32}"),
        ),
    }
    for app, (line, expected) in cases.items():
        spec = _ok(tmp_path, "yaml", f"name: {app}\nversion: '1'\n{line}\n", app=app)
        s = spec.source
        assert (s.type.value, s.ref, s.repo, s.url, s.sha256, s.mcid) == expected


def test_health_variants(tmp_path: Path) -> None:
    spec = _ok(
        tmp_path,
        "erl",
        '#{name => web, version => "1", health => #{type => http, port => 8080,'
        ' path => <<"/health">>, interval => 1000, timeout => 200}}.',
    )
    assert spec.health is not None
    assert (spec.health.type, spec.health.port, spec.health.path) == (
        HealthType.HTTP,
        8080,
        "/health",
    )
    assert (spec.health.interval, spec.health.timeout) == (1000, 200)
    other = _ok(
        tmp_path,
        "yaml",
        "name: db\nversion: '1'\nhealth: {type: custom, module: db_health}\n",
        app="db",
    )
    assert (
        other.health is not None
        and other.health.module == "db_health"
        and other.health.port is None
    )


def test_icons(tmp_path: Path) -> None:
    url = _ok(
        tmp_path,
        "yaml",
        "name: a\nversion: '1'\nicon: {type: url, value: 'https://x/i.png'}\n",
        app="a",
    )
    assert (url.icon.type, url.icon.value, url.icon.mime_type) == (
        IconType.URL,
        "https://x/i.png",
        None,
    )
    b64 = _ok(
        tmp_path,
        "yaml",
        "name: b\nversion: '1'\nicon: {type: base64, value: 'iVBORw0KGgo='}\n",
        app="b",
    )
    assert (b64.icon.type, b64.icon.mime_type) == (IconType.BASE64, "image/png")


def test_env_keeps_exact_erlang_terms(tmp_path: Path) -> None:
    spec = _ok(
        tmp_path,
        "erl",
        '#{name => web, version => "1", env => [{s, "abc"}, {b, <<"abc">>}, {a, abc},'
        ' {t, {1, 2.5}}, {i, [a | b]}, {m, #{<<"k">> => [1]}}, {e, []}]}.',
    )
    assert spec.env == {
        Atom("s"): [97, 98, 99],
        Atom("b"): b"abc",
        Atom("a"): Atom("abc"),
        Atom("t"): (1, 2.5),
        Atom("i"): ImproperList((Atom("a"),), Atom("b")),
        Atom("m"): {b"k": [1]},
        Atom("e"): [],
    }


def test_yaml_and_json_env_conventions(tmp_path: Path) -> None:
    yaml_spec = _ok(
        tmp_path,
        "yaml",
        "name: web\nversion: '1'\nenv:\n  port: 8080\n  host: localhost\n  debug: true\n"
        "  off: null\n  mode: {$atom: prod}\n  path: {$charlist: /tmp}\n  raw: {$base64: AAE=}\n"
        "  pair: {$tuple: [a, 1]}\n  nested: {deep: [1, 2.5]}\n  on: yes\n"
        "  anymap: {$map: [[1, one], [{$atom: k}, v]]}\n  imp: {$improper: [1, {$atom: t}]}\n",
    )
    assert yaml_spec.env == {
        Atom("port"): 8080,
        Atom("host"): b"localhost",
        Atom("debug"): Atom("true"),
        Atom("off"): Atom("null"),
        Atom("mode"): Atom("prod"),
        Atom("path"): [47, 116, 109, 112],
        Atom("raw"): b"\x00\x01",
        Atom("pair"): (b"a", 1),
        Atom("nested"): {Atom("deep"): [1, 2.5]},
        Atom("on"): b"yes",  # YAML 1.2: `yes` is a string, not a boolean
        Atom("anymap"): {1: b"one", Atom("k"): b"v"},
        Atom("imp"): ImproperList((1,), Atom("t")),
    }
    json_spec = _ok(
        tmp_path,
        "json",
        '{"name": "db", "version": "1", "depends_on": ["web"],'
        ' "env": {"n": 1.0, "t": true, "s": "x", "a": {"$atom": "x"}}}',
        app="db",
    )
    assert json_spec.depends_on == ("web",)
    assert json_spec.env == {
        Atom("n"): 1.0,
        Atom("t"): Atom("true"),
        Atom("s"): b"x",
        Atom("a"): Atom("x"),
    }
    assert isinstance(json_spec.env[Atom("n")], float)


def test_isolation_vm_with_config(tmp_path: Path) -> None:
    spec = _ok(
        tmp_path,
        "erl",
        '#{name => web, version => "1", isolation => <<"vm">>, vm_config => #{memory_limit => 512,'
        ' scheduler_limit => 2, node_prefix => "bs_", extra_args => ["+P", <<"100">>]}}.',
    )
    assert spec.isolation is Isolation.VM and spec.vm_config is not None
    assert spec.vm_config.memory_limit == 512 and spec.vm_config.scheduler_limit == 2
    assert spec.vm_config.node_prefix == "bs_" and spec.vm_config.extra_args == ("+P", "100")


def test_depends_on_entries_become_names_with_positions(tmp_path: Path) -> None:
    spec = _ok(tmp_path, "yaml", "name: web\nversion: '1'\ndepends_on:\n  - db\n  - cache\n")
    assert spec.depends_on == ("db", "cache")
    assert spec.origin is not None
    assert [str(p) for p in spec.origin.depends_on_pos] == ["4:5", "5:5"]


def test_load_spec_raises_the_first_error(tmp_path: Path) -> None:
    (tmp_path / "web").mkdir()
    path = tmp_path / "web" / "app.yaml"
    path.write_text("name: web\nversion: 1\n")
    with pytest.raises(SpecError, match=r"app.yaml:2:10: version: expected a string") as info:
        load_spec(path, expected_name="web")
    assert info.value.hint == 'quote it: version: "1.0"'
