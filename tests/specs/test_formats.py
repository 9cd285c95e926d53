"""Spec file readers: positions, the YAML/JSON mapping, and hostile input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bstore.specs import formats
from bstore.specs.json_reader import parse_json
from bstore.specs.loader import load_spec_file
from bstore.specs.located import Located
from bstore.specs.problems import SpecError
from bstore.specs.terms.model import Atom
from bstore.specs.yaml_reader import parse_yaml


def _error(call: object, *args: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def test_yaml_positions_and_mapping() -> None:
    root = parse_yaml("name: web\nlist:\n  - 1\n  - 'two'\n  - 3.5\nflag: true\n", "f.yaml")
    assert root.term == {
        Atom("name"): b"web",
        Atom("list"): [1, b"two", 3.5],
        Atom("flag"): Atom("true"),
    }
    keys = root.children[0::2]
    assert [(k.term, str(k.pos)) for k in keys] == [
        (Atom("name"), "1:1"),
        (Atom("list"), "2:1"),
        (Atom("flag"), "6:1"),
    ]
    items = root.children[3].children
    assert [str(i.pos) for i in items] == ["3:5", "4:5", "5:5"]


def test_json_positions_and_mapping() -> None:
    root = parse_json('{\n  "a": [1, 2.0, "x"],\n  "b": {"c": null, "d": false}\n}', "f.json")
    assert root.term == {
        Atom("a"): [1, 2.0, b"x"],
        Atom("b"): {Atom("c"): Atom("null"), Atom("d"): Atom("false")},
    }
    assert [str(c.pos) for c in root.children] == ["2:3", "2:8", "3:3", "3:8"]
    assert [str(c.pos) for c in root.children[1].children] == ["2:9", "2:12", "2:17"]
    assert isinstance(root.children[1].children[1].term, float)


def test_yaml_uses_the_1_2_core_schema() -> None:
    root = parse_yaml(
        "a: yes\nb: on\nc: 010\nd: 0o10\ne: 0x1f\nf: 1_000\ng: 2001-12-14\nh: True\ni: ~\n"
        "j: -1.5e3\nk: !!str 12\nl: !!binary AAE=\n",
        "f.yaml",
    )
    assert root.term == {
        Atom("a"): b"yes",
        Atom("b"): b"on",
        Atom("c"): 10,
        Atom("d"): 8,
        Atom("e"): 31,
        Atom("f"): b"1_000",
        Atom("g"): b"2001-12-14",
        Atom("h"): Atom("true"),
        Atom("i"): Atom("null"),
        Atom("j"): -1500.0,
        Atom("k"): b"12",
        Atom("l"): b"\x00\x01",
    }


def test_yaml_aliases_within_bounds_are_expanded() -> None:
    root = parse_yaml("base: &b {x: 1}\ncopy: *b\n", "f.yaml")
    assert root.term == {Atom("base"): {Atom("x"): 1}, Atom("copy"): {Atom("x"): 1}}


def test_a_bom_is_ignored() -> None:
    assert formats.decode_utf8(b"\xef\xbb\xbfname: web\n", "f.yaml") == "name: web\n"


_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)
_DEEP_ALIAS = "x: &a0 [1]\n" + "".join(
    f"y{i}: &a{i + 1} {'[' * 49}*a{i}{']' * 49}\n" for i in range(5)
)

# (reader, text, line, column, message fragment)
HOSTILE = [
    ("yaml", _BOMB, 7, 4, "YAML aliases expand to more than 1000000 values (first alias at 2:8)"),
    ("yaml", _DEEP_ALIAS, 4, 56, "YAML aliases nest deeper than 100 levels"),
    ("yaml", "a: &x [*x]\n", 1, 8, "YAML alias refers to a node that contains it"),
    ("yaml", "a: " + "[" * 500 + "]" * 500 + "\n", 1, 103, "nesting deeper than 100 levels"),
    (
        "yaml",
        "!!python/object/apply:os.system ['touch pwned']\n",
        1,
        1,
        "YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed",
    ),
    (
        "yaml",
        "a: !!python/object:builtins.dict {}\n",
        1,
        4,
        "YAML tag 'tag:yaml.org,2002:python/object:builtins.dict' is not allowed",
    ),
    ("yaml", "a: !!python/name:os.system\n", 1, 4, "python/name:os.system' is not allowed"),
    ("yaml", "a: !ruby/object:Gem {}\n", 1, 4, "YAML tag '!ruby/object:Gem' is not allowed"),
    ("yaml", "a: !!set {x}\n", 1, 4, "YAML tag 'tag:yaml.org,2002:set' is not allowed"),
    ("yaml", "a: !!timestamp 2001-12-14\n", 1, 4, "tag:yaml.org,2002:timestamp' is not allowed"),
    ("yaml", "!!python/str k: v\n", 1, 1, "YAML tag 'tag:yaml.org,2002:python/str' is not allowed"),
    ("yaml", "a: 1\nb: 2\na: 3\n", 3, 1, "duplicate key 'a' (first at 1:1)"),
    ("yaml", "env:\n  x: 1\n  'x': 2\n", 3, 3, "duplicate key 'x' (first at 2:3)"),
    ("yaml", "<<: {a: 1}\n", 1, 1, "YAML merge keys (<<) are not supported"),
    ("yaml", "? [a, b]\n: 1\n", 1, 3, "expected a plain key (a string), found a collection"),
    ("yaml", "a: .inf\n", 1, 4, ".inf is not an Erlang number"),
    ("yaml", "a: !!int " + "9" * 5000 + "\n", 1, 4, "is not a valid int (or is out of range)"),
    ("yaml", "a: 1e400\n", 1, 4, "'1e400' is not a valid float (or is out of range)"),
    (
        "yaml",
        "a: b\n---\nc: d\n",
        2,
        1,
        "expected a single document in the stream but found another",
    ),
    ("yaml", "", 1, 1, "expected a mapping, found an empty document"),
    ("yaml", "a: *nope\n", 1, 4, "found undefined alias 'nope'"),
    ("yaml", "k" * 256 + ": 1\n", 1, 1, "is 256 characters; atoms hold at most 255"),
    ("json", '{"a": 1, "a": 2}', 1, 10, "duplicate key 'a' (first at 1:2)"),
    ("json", '{"env": {"x": 1, "y": {}, "x": 2}}', 1, 27, "duplicate key 'x' (first at 1:10)"),
    ("json", "[" * 500 + "]" * 500, 1, 101, "nesting deeper than 100 levels"),
    ("json", '{"a": NaN}', 1, 7, "expected a JSON value, found 'N'"),
    ("json", '{"a": Infinity}', 1, 7, "expected a JSON value, found 'I'"),
    ("json", '{"a": 1e400}', 1, 7, "number 1e400 is out of float range"),
    ("json", '{"a": ' + "1" * 5000 + "}", 1, 7, "is too long"),
    ("json", '{"a": "\\ud800"}', 1, 7, "string holds a lone surrogate"),
    ("json", '{"a": "x\ny"}', 1, 9, "bad JSON string: Invalid control character"),
    ("json", '{"a": 1} {"b": 2}', 1, 10, "expected end of file after the JSON value, found '{'"),
    ("json", "{'a': 1}", 1, 2, 'expected a string key in object, found "\'"'),
    ("json", '{"a": 01}', 1, 8, "expected ',' or '}' in object, found '1'"),
    ("json", '{"' + "k" * 300 + '": 1}', 1, 2, "is 300 characters; atoms hold at most 255"),
    ("json", "", 1, 1, "expected a JSON value, found end of file"),
]


@pytest.mark.parametrize(("reader", "text", "line", "column", "message"), HOSTILE)
def test_hostile_text(reader: str, text: str, line: int, column: int, message: str) -> None:
    parse = parse_yaml if reader == "yaml" else parse_json
    error = _error(parse, text, "f.txt")
    assert message in error.problem.message, str(error)
    assert error.problem.pos is not None
    assert (error.problem.pos.line, error.problem.pos.column) == (line, column), str(error)
    assert str(error).startswith(f"f.txt:{line}:{column}: ")


def test_python_tags_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _error(parse_yaml, "!!python/object/apply:os.system ['touch pwned']\n", "f.yaml")
    _error(parse_yaml, "a: !!python/object/apply:os.system ['touch pwned']\n", "f.yaml")
    assert not (tmp_path / "pwned").exists()


def _spec_dir(tmp_path: Path, name: str) -> Path:
    app = tmp_path / "web"
    app.mkdir(exist_ok=True)
    return app / name


@pytest.fixture(scope="session")
def gib_sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 GiB sparse file (no disk blocks), made once per session."""
    path = tmp_path_factory.mktemp("big") / "huge"
    with open(path, "wb") as handle:
        handle.truncate(1 << 30)
    return path


@pytest.mark.parametrize("name", ["app.config", "app.yaml", "app.json"])
def test_a_1_gib_file_is_refused_before_reading(
    tmp_path: Path, gib_sparse: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _spec_dir(tmp_path, name)
    path.symlink_to(gib_sparse)

    def no_read(*_args: object) -> bytes:
        raise AssertionError("read a byte of an oversized spec")

    monkeypatch.setattr("bstore.specs.formats.os.read", no_read)
    result = load_spec_file(path, source="web/" + name, expected_name="web")
    assert result.spec is None
    (problem,) = result.problems
    assert problem.message == ("spec file is 1073741824 bytes; the limit is 1048576 (1 MiB)"), str(
        problem
    )
    assert str(problem).startswith(f"web/{name}: error: ")


def test_limit_is_inclusive(tmp_path: Path) -> None:
    head = "name: web\nversion: '1'\n# "
    path = _spec_dir(tmp_path, "app.yaml")
    path.write_text(head + "x" * (formats.MAX_SPEC_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == formats.MAX_SPEC_BYTES
    assert load_spec_file(path, expected_name="web").spec is not None
    with open(path, "a") as handle:
        handle.write("x")
    result = load_spec_file(path, expected_name="web")
    assert "spec file is 1048577 bytes" in result.problems[0].message


@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = _spec_dir(tmp_path, "app.yaml")
    os.mkfifo(path)
    result = load_spec_file(path, source="web/app.yaml")
    assert [str(p) for p in result.problems] == ["web/app.yaml: error: not a regular file"]


@pytest.mark.parametrize(
    ("name", "data", "line", "column", "message"),
    [
        ("app.yaml", b"name: web\nversion: '1\xff'\n", 2, 12, "invalid UTF-8: byte 0xff"),
        ("app.json", b'{"name": "w\xc3\xa9b\xc3"}', 1, 14, "invalid UTF-8: byte 0xc3"),
        (
            "app.config",
            b'#{name => web,\n  version => "\xe2\x82"}.',
            2,
            15,
            "invalid UTF-8 byte 0xE2",
        ),
    ],
)
def test_invalid_utf8_is_a_positioned_error(
    tmp_path: Path, name: str, data: bytes, line: int, column: int, message: str
) -> None:
    path = _spec_dir(tmp_path, name)
    path.write_bytes(data)
    result = load_spec_file(path, source="web/" + name)
    (problem,) = result.problems
    assert message in problem.message
    assert problem.pos is not None and (problem.pos.line, problem.pos.column) == (line, column)


def test_deep_erlang_nesting_is_a_positioned_error(tmp_path: Path) -> None:
    path = _spec_dir(tmp_path, "app.config")
    path.write_text(
        '#{name => web, version => "1", env => #{x => ' + "[" * 5000 + "]" * 5000 + "}}."
    )
    result = load_spec_file(path, source="web/app.config")
    (problem,) = result.problems
    assert problem.pos is not None and problem.pos.line == 1
    assert "deep" in problem.message or "nest" in problem.message, str(problem)


def test_missing_file_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    result = load_spec_file(tmp_path / "nope.yaml", source="nope.yaml")
    assert [str(p) for p in result.problems] == [
        "nope.yaml: error: cannot open spec file: No such file or directory"
    ]


def test_format_of() -> None:
    assert formats.format_of(Path("a/app.yml")) is formats.SpecFormat.YAML
    assert formats.format_of(Path("a/config.json")) is formats.SpecFormat.JSON
    assert formats.format_of(Path("a/config")) is formats.SpecFormat.ERLANG
    assert formats.format_of(Path("a/app.config")) is formats.SpecFormat.ERLANG


def test_located_children_pair_keys_and_values() -> None:
    root = parse_json('{"k": [1, {"$atom": "x"}]}', "f.json")
    key, value = root.children
    assert isinstance(key, Located) and key.term == Atom("k")
    assert value.term == [1, {Atom("$atom"): b"x"}]


def test_the_pure_python_parser_gives_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without libyaml, PyYAML's own parser feeds the same composer: same values, same errors.
    import yaml

    from bstore.specs import yaml_reader

    text = "name: web\nlist:\n  - 1\n  - 'two'\nbase: &b {x: [1, ~]}\ncopy: *b\n"
    fast = parse_yaml(text, "f.yaml")
    monkeypatch.setattr(yaml_reader, "_Parser", yaml.SafeLoader)
    slow = parse_yaml(text, "f.yaml")
    assert slow == fast
    for reader, bad, line, column, message in HOSTILE:
        if reader == "yaml":
            error = _error(parse_yaml, bad, "f.txt")
            assert message in error.problem.message
            assert error.problem.pos is not None
            assert (error.problem.pos.line, error.problem.pos.column) == (line, column)
