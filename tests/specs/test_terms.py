"""Erlang-term parser and printer, pure Python (the real-erl checks are in
test_terms_erlang.py; they prove the tables below against file:consult/1)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from terms_cases import NEGATIVE, POSITIVE, TERMS

from bstore.errors import BstoreError
from bstore.specs.located import Located, Position
from bstore.specs.terms import (
    MAX_DEPTH,
    MAX_FILE_SIZE,
    Atom,
    ImproperList,
    Term,
    TermFormatError,
    TermReadError,
    TermSyntaxError,
    consult,
    consult_located,
    exactly_equal,
    format,
    parse,
    parse_located,
)

A = Atom


# -- literal forms ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"), [c[1:] for c in POSITIVE], ids=[c[0] for c in POSITIVE]
)
def test_positive_literal(source: str, expected: Term) -> None:
    (term,) = parse(source, "case.config")
    assert exactly_equal(term, expected), (term, expected)


@pytest.mark.parametrize(
    ("source", "fragment", "line", "column"),
    [c[1:5] for c in NEGATIVE],
    ids=[c[0] for c in NEGATIVE],
)
def test_negative_literal(source: str, fragment: str, line: int, column: int) -> None:
    with pytest.raises(TermSyntaxError) as info:
        parse(source, "apps/web/app.config")
    error = info.value
    assert fragment in error.message
    assert (error.line, error.column) == (line, column), error.message
    assert error.source == "apps/web/app.config"
    assert error.message.startswith(f"apps/web/app.config:{line}:{column}: ")
    assert isinstance(error, BstoreError)


def test_issue_example_message() -> None:
    text = "#{name => web,\n" + "\n" * 5 + "        port := 8080}.\n"
    with pytest.raises(TermSyntaxError) as info:
        parse(text, "apps/web/app.config")
    assert str(info.value) == "apps/web/app.config:7:14: expected '=>' or ',' in map, found ':='"


def test_several_terms_and_empty_input() -> None:
    assert parse("a. {b}.\n[c]. % done\n") == [A("a"), (A("b"),), [A("c")]]
    assert parse("") == []
    assert parse("  % only a comment\n") == []


def test_float_and_int_stay_distinct() -> None:
    (term,) = parse("{1, 1.0}.")
    assert exactly_equal(term, (1, 1.0))
    assert not exactly_equal(term, (1, 1))
    assert type(term[0]) is int
    assert type(term[1]) is float


# -- located terms ---------------------------------------------------------------------


def _pos(loc: Located) -> tuple[int, int]:
    return (loc.pos.line, loc.pos.column)


def test_located_positions_of_every_subterm() -> None:
    text = '#{name => web,\n  env => [{port, 8080}, "s" "t"],\n  vsn => -1}.'
    (root,) = parse_located(text, "x")
    assert root.term == {
        A("name"): A("web"),
        A("env"): [(A("port"), 8080), [115, 116]],
        A("vsn"): -1,
    }
    assert root.pos == Position(1, 1)
    assert [_pos(c) for c in root.children] == [(1, 3), (1, 11), (2, 3), (2, 10), (3, 3), (3, 10)]
    assert [c.term for c in root.children[::2]] == [A("name"), A("env"), A("vsn")]
    env = root.children[3]
    assert [_pos(c) for c in env.children] == [(2, 11), (2, 25)]
    assert env.children[1].children == ()  # a string is a leaf
    port = env.children[0]
    assert [_pos(c) for c in port.children] == [(2, 12), (2, 18)]


def test_located_lists_and_tails() -> None:
    (improper,) = parse_located("[a, b | c].", "x")
    assert improper.term == ImproperList((A("a"), A("b")), A("c"))
    assert [_pos(c) for c in improper.children] == [(1, 2), (1, 5), (1, 9)]
    (merged,) = parse_located("[a | [b, c]].", "x")
    assert merged.term == [A("a"), A("b"), A("c")]
    assert [_pos(c) for c in merged.children] == [(1, 2), (1, 7), (1, 10)]
    (paren,) = parse_located("{ (a) }.", "x")
    assert _pos(paren.children[0]) == (1, 4)


def test_located_matches_plain_parse() -> None:
    text = '[{kernel, [{a, <<"b">>}, {c, [1 | 2]}, {d, #{e => 1.5}}]}].\nok.'
    located = parse_located(text, "x")
    assert [loc.term for loc in located] == parse(text)


# -- files -----------------------------------------------------------------------------


def test_consult_file(tmp_path: Path) -> None:
    path = tmp_path / "app.config"
    path.write_text('%% spec\n#{name => web, version => "1.0"}.\n', encoding="utf-8")
    assert consult(path) == [{A("name"): A("web"), A("version"): list(b"1.0")}]
    (loc,) = consult_located(path)
    assert loc.pos == Position(2, 1)


def test_consult_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "app.config"
    path.write_text("[\n  {a, B}].\n", encoding="utf-8")
    with pytest.raises(TermSyntaxError) as info:
        consult(path)
    assert info.value.message == f"{path}:2:7: variable B is not allowed in a term"


def test_missing_file_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(TermReadError, match=r"cannot read .*nope\.config"):
        consult(tmp_path / "nope.config")


@pytest.mark.parametrize(
    ("data", "line", "column"),
    [
        (b"\xff.", 1, 1),
        (b'a.\n"abc\xc3(".', 2, 5),
        (b"% caf\xe9\nok.", 1, 6),
        (b"[1,\n 2, \xed\xa0\x80].", 2, 5),  # an encoded surrogate is not UTF-8
    ],
)
def test_invalid_utf8_is_positioned(tmp_path: Path, data: bytes, line: int, column: int) -> None:
    path = tmp_path / "bad.config"
    path.write_bytes(data)
    with pytest.raises(TermSyntaxError) as info:
        consult(path)
    assert "invalid UTF-8 byte" in info.value.message
    assert (info.value.line, info.value.column) == (line, column)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"%% coding: latin-1\n", [233]),
        (b"%% -*- coding: latin-1 -*-\n", [233]),
        (b"\n% coding=Latin-1\n", [233]),
        (b"ok. %% coding : latin-1\n", [233]),
    ],
)
def test_latin1_coding_comment(tmp_path: Path, header: bytes, expected: list[int]) -> None:
    path = tmp_path / "l1.config"
    path.write_bytes(header + b'"\xe9".\n')
    assert consult(path)[-1] == expected


@pytest.mark.parametrize(
    "header",
    [
        b"%% coding: latin1\n",  # epp wants the dash
        b"\n\n%% coding: latin-1\n",  # third line is too late
        b"coding: latin-1\n",  # not in a comment
        b"%% coding: utf-8\n",
    ],
)
def test_no_latin1_without_exact_comment(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "l1.config"
    path.write_bytes(header + b'"\xe9".\n')
    with pytest.raises(TermSyntaxError, match="invalid UTF-8 byte 0xE9"):
        consult(path)


# -- hostile input ---------------------------------------------------------------------


def test_deep_nesting_is_a_positioned_error() -> None:
    text = "[" * 100_000 + "]" * 100_000 + "."
    with pytest.raises(TermSyntaxError) as info:
        parse(text, "deep.config")
    assert f"nested deeper than {MAX_DEPTH}" in info.value.message
    assert (info.value.line, info.value.column) == (1, MAX_DEPTH + 1)


@pytest.mark.parametrize("opener", ["[", "{", "#{a => ", "(", "[1 | "])
def test_nesting_at_the_limit_parses(opener: str) -> None:
    closer = {"[": "]", "{": "}", "#{a => ": "}", "(": ")", "[1 | ": "]"}[opener]
    depth = MAX_DEPTH - 1
    text = opener * depth + "x" + closer * depth + "."
    (term,) = parse(text)
    (loc,) = parse_located(text)
    assert loc.term == term
    # and the printer handles it without recursion
    assert exactly_equal(parse(format(term) + ".")[0], term)
    with pytest.raises(TermSyntaxError, match="nested deeper"):
        parse(opener * (MAX_DEPTH + 1) + "x" + closer * (MAX_DEPTH + 1) + ".")


def test_deep_binaries_are_bounded() -> None:
    text = "<<" * 10_000 + ">>" * 10_000 + "."
    with pytest.raises(TermSyntaxError, match="binaries nested deeper"):
        parse(text)


def test_huge_file_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.config"
    with open(path, "wb") as handle:
        handle.truncate(1 << 30)  # 1 GiB, sparse: costs no disk
    with pytest.raises(TermSyntaxError) as info:
        consult(path)
    assert info.value.message == f"{path}:1:1: file is larger than {MAX_FILE_SIZE} bytes"


def test_file_at_the_cap_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.config"
    body = b"[" + b"a," * ((MAX_FILE_SIZE - 4) // 2) + b"a]."
    path.write_bytes(body + b" " * (MAX_FILE_SIZE - len(body)))
    (term,) = consult(path)
    assert isinstance(term, list)
    assert len(term) == (MAX_FILE_SIZE - 4) // 2 + 1


def test_million_atoms(tmp_path: Path) -> None:
    text = "[" + ",".join(f"a{i % 1000}" for i in range(1_000_000)) + "]."
    (term,) = parse(text)
    assert isinstance(term, list)
    assert len(term) == 1_000_000
    assert term[999] is term[1999]  # atoms are shared, memory stays bounded
    path = tmp_path / "atoms.config"
    path.write_text(text, encoding="ascii")
    with pytest.raises(TermSyntaxError, match="larger than"):
        consult(path)


def test_byte_order_mark_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bom.config"
    path.write_bytes(b"\xef\xbb\xbfok.\n")
    with pytest.raises(TermSyntaxError) as info:
        consult(path)
    assert info.value.message == f"{path}:1:1: byte order mark U+FEFF is not allowed"


def test_nul_and_control_characters_are_white_space() -> None:
    assert parse("\x00a\x01.\x02") == [A("a")]


# -- printer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "text"),
    [
        (A("ok"), "ok"),
        (A("hello world"), "'hello world'"),
        (A("Caps"), "'Caps'"),
        (A("_x"), "'_x'"),
        (A("node@host"), "node@host"),
        (A("end"), "'end'"),
        (A("maybe"), "'maybe'"),
        (A(""), "''"),
        (A("it's"), "'it\\'s'"),
        (A("école"), "école"),
        (A("日本"), "'日本'"),
        (A("a\nb"), "'a\\nb'"),
        (1.0e10, "10000000000.0"),
        (1.0e16, "1.0e16"),
        (1.5e-7, "1.5e-7"),
        (-0.0, "-0.0"),
        (0.1, "0.1"),
        (-5, "-5"),
        pytest.param(10**5000, "1" + "0" * 5000, id="int-5001-digits"),
        (b"", "<<>>"),
        (b"abc", '<<"abc">>'),
        (b'q"\\', '<<"q\\"\\\\">>'),
        ("é".encode(), '<<"é"/utf8>>'),
        (b"\xe9t\xe9", '<<"été">>'),
        (b"\x00\x01\xff", "<<0,1,255>>"),
        (b"a\nb", '<<"a\\nb">>'),
        ([], "[]"),
        ([104, 105], '"hi"'),
        ([104, 10], '"h\\n"'),
        ([0x65E5], '"日"'),
        ([1, 2], "[1,2]"),
        ([104, 0x110000], "[104,1114112]"),
        ([A("a"), [104]], '[a,"h"]'),
        ((), "{}"),
        ((A("a"), 1), "{a,1}"),
        (ImproperList((A("a"), A("b")), A("c")), "[a,b|c]"),
        ({}, "#{}"),
        ({A("k"): [1], b"x": {}}, '#{k => [1],<<"x">> => #{}}'),
    ],
)
def test_format_examples(term: Term, text: str) -> None:
    assert format(term) == text
    assert exactly_equal(parse(text + ".")[0], term)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (math.nan, "has no Erlang form"),
        (math.inf, "has no Erlang form"),
        (True, "bool"),
        ("text", "str"),
        (None, "NoneType"),
        ([1, "x"], "str"),
        (A("a" * 256), "longer than 255"),
        (ImproperList((), A("a")), "at least one element"),
    ],
)
def test_format_refuses_non_terms(value: object, fragment: str) -> None:
    with pytest.raises(TermFormatError, match=fragment):
        format(value)  # type: ignore[arg-type]


# -- property: parse(format(t)) == t ---------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(TERMS)
def test_format_parse_round_trip(term: Term) -> None:
    text = format(term)
    (back,) = parse(text + ".")
    assert exactly_equal(back, term), (term, text, back)
    (located,) = parse_located(text + ".\n", "gen")
    assert exactly_equal(located.term, term)


def test_located_can_be_imported_before_terms() -> None:
    # `located` imports `terms.model` and the parser needs `located`: neither import
    # order may fail, even without bstore.specs/__init__ choosing one.
    code = (
        "import sys, types, bstore\n"
        "pkg = types.ModuleType('bstore.specs')\n"
        "pkg.__path__ = [bstore.__path__[0] + '/specs']\n"
        "sys.modules['bstore.specs'] = pkg\n"
        "import bstore.specs.located\n"
        "from bstore.specs.terms import parse_located\n"
        "print(parse_located('{a}.', 'x')[0].pos)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1:1"
