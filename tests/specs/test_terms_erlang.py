"""Differential tests: our Erlang-term parser and printer against the real ``erl``.

Every check runs ``file:consult/1`` in the installed OTP and compares with ``=:=``:
our parse is handed to Erlang as External Term Format (independent of our printer) and
our printed text is consulted back. Each fixture starts ONE VM for all its files.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import pytest
from erlang_helpers import ERL, ConsultResult, ConsultTask, ErlangPort, consult_batch, to_etf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from terms_cases import NEGATIVE, POSITIVE, TERMS

from bstore.specs.terms import (
    Atom,
    Term,
    TermSyntaxError,
    consult,
    exactly_equal,
    format,
    parse,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(ERL is None, reason="needs erl (Erlang/OTP)"),
]

OTP_TERM_FILES = sorted(
    glob.glob("/usr/lib/erlang/lib/*/ebin/*.app") + glob.glob("/usr/lib/erlang/lib/*/ebin/*.appup")
)


def _write_ours(workdir: Path, name: str, terms: list[Term]) -> tuple[Path, Path]:
    """Our parse as ETF (for =:=) and as our printed text (for consult)."""
    etf = workdir / f"{name}.etf"
    etf.write_bytes(to_etf(terms))
    ours = workdir / f"{name}.ours"
    ours.write_text("".join(format(term) + ".\n" for term in terms), encoding="utf-8")
    return etf, ours


# -- table cases -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def positive_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ConsultResult]:
    workdir = tmp_path_factory.mktemp("positive")
    tasks = []
    for name, source, expected in POSITIVE:
        path = workdir / f"{name}.src"
        path.write_text(source, encoding="utf-8")
        etf = workdir / f"{name}.etf"
        etf.write_bytes(to_etf([expected]))
        ours = workdir / f"{name}.ours"
        ours.write_text(format(parse(source)[0]) + ".\n", encoding="utf-8")
        tasks.append(ConsultTask(path, etf, ours))
    return dict(zip([c[0] for c in POSITIVE], consult_batch(workdir, tasks), strict=True))


@pytest.mark.parametrize("name", [c[0] for c in POSITIVE])
def test_positive_case_matches_erl(name: str, positive_results: dict[str, ConsultResult]) -> None:
    result = positive_results[name]
    assert result.consulted, "erl refused it"
    assert result.etf_equal, "file:consult/1 returned a different term than the table says"
    assert result.ours_equal, "erl read our printed form back as a different term"


@pytest.fixture(scope="module")
def negative_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ConsultResult]:
    workdir = tmp_path_factory.mktemp("negative")
    tasks = []
    for name, source, *_ in NEGATIVE:
        path = workdir / f"{name}.src"
        path.write_text(source, encoding="utf-8")
        tasks.append(ConsultTask(path))
    return dict(zip([c[0] for c in NEGATIVE], consult_batch(workdir, tasks), strict=True))


@pytest.mark.parametrize(("name", "erl_accepts"), [(c[0], c[5]) for c in NEGATIVE])
def test_negative_case_matches_erl(
    name: str, erl_accepts: bool, negative_results: dict[str, ConsultResult]
) -> None:
    # erl_accepts marks the few forms OTP reads but our term model cannot hold
    # (funs, list/map keys, bitstrings, keys equal only in Python): refused on purpose.
    assert negative_results[name].consulted is erl_accepts


# -- files with encodings ------------------------------------------------------------------

ENCODED_FILES = [
    ("latin1-comment", b'%% coding: latin-1\n"\xe9".\n'),
    ("latin1-emacs", b"%% -*- coding: latin-1 -*-\n{'\xe9t\xe9', \"\xff\"}.\n"),
    ("latin1-second-line", b'\n% coding=Latin-1\n<<"\xe9">>.\n'),
    ("utf8-default", '{"é", \'日本\', <<"é"/utf8>>}.\n'.encode()),
    ("utf8-declared", '%% coding: utf-8\n"é".\n'.encode()),
    ("latin1-no-dash", b'%% coding: latin1\n"\xe9".\n'),
    ("latin1-third-line", b'\n\n%% coding: latin-1\n"\xe9".\n'),
    ("invalid-utf8", b'"\xe9".\n'),
    ("nbsp-utf8", "\u00a0ok.\n".encode()),
    ("crlf", b"{a,\r\n b}.\r\n"),
    ("utf8-bom", b"\xef\xbb\xbfok.\n"),
    ("nul-between-terms", b"a.\x00b.\n"),
]


def test_file_encodings_match_erl(tmp_path: Path) -> None:
    tasks, ours_ok = [], []
    for name, data in ENCODED_FILES:
        path = tmp_path / f"{name}.config"
        path.write_bytes(data)
        try:
            terms = consult(path)
        except TermSyntaxError:
            tasks.append(ConsultTask(path))
            ours_ok.append(False)
            continue
        etf, ours = _write_ours(tmp_path, name, terms)
        tasks.append(ConsultTask(path, etf, ours))
        ours_ok.append(True)
    results = consult_batch(tmp_path, tasks)
    for (name, _), ok, result in zip(ENCODED_FILES, ours_ok, results, strict=True):
        assert result.consulted is ok, name
        if ok:
            assert result.etf_equal and result.ours_equal, name


# -- every .app and .appup of the installed OTP ------------------------------------------


def test_otp_app_and_appup_files_match_consult(tmp_path: Path) -> None:
    assert len(OTP_TERM_FILES) > 20, "expected the OTP installation's .app/.appup files"
    tasks = []
    for index, name in enumerate(OTP_TERM_FILES):
        path = Path(name)
        etf, ours = _write_ours(tmp_path, f"{index}-{path.name}", consult(path))
        tasks.append(ConsultTask(path, etf, ours))
    results = consult_batch(tmp_path, tasks)
    mismatches = [
        name
        for name, result in zip(OTP_TERM_FILES, results, strict=True)
        if not (result.consulted and result.etf_equal and result.ours_equal)
    ]
    assert mismatches == []


# -- generated terms, both directions -------------------------------------------------------


@pytest.fixture(scope="module")
def erl_port() -> Iterator[ErlangPort]:
    port = ErlangPort()
    yield port
    port.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(TERMS)
def test_generated_terms_both_directions(erl_port: ErlangPort, term: Term) -> None:
    verdict, pretty, written = erl_port.exchange(term, format(term) + ".")
    # Printed by us, read by Erlang:
    assert verdict == "same", (term, format(term))
    # Printed by Erlang (~tp pretty, ~tw plain), read by us:
    for text in (pretty, written):
        (back,) = parse(text, "erl-output")
        assert exactly_equal(back, term), (term, text)


_ATOM_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FFFF, blacklist_categories=("Cs",)),
    max_size=30,
).filter(lambda t: "\ufffe" not in t and "\uffff" not in t)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ATOM_TEXT, min_size=1, max_size=5), st.binary(max_size=40))
def test_generated_atoms_strings_binaries(
    erl_port: ErlangPort, names: list[str], data: bytes
) -> None:
    term: Term = (
        [Atom(n) for n in names],
        [[ord(c) for c in n] for n in names],
        data,
        [n.encode("utf-8") for n in names],
    )
    verdict, pretty, written = erl_port.exchange(term, format(term) + ".")
    assert verdict == "same", (term, format(term))
    for text in (pretty, written):
        assert exactly_equal(parse(text)[0], term), text


# -- random token soup: we accept exactly what erl accepts ---------------------------------

FRAGMENTS = [
    *("a", "B", "_", "1", "2", "16#", "F", "f", "#", "{", "}", "[", "]", "(", ")", "<<", ">>"),
    *(",", "|", "||", "-", "+", "=>", ":=", ":", "/", ".", ". ", " ", "\n", '"', "'", "$"),
    *("\\", "x", "{1F}", "e", "0", "_0", "_", "utf8", "binary", "unit", "8", "%", "end", "fun"),
    *('"ab"', "'q'", "#{", "1.5", "$a", "little", "float", "\t", "^", "n", "7", "z", "-1"),
    *("<", ">", "=", "é", "Ω", "\u00a0", "*", "a@b", '""', "[]", "{}", "<<>>", "#{}", "1e3"),
    *("0.5e", ".0", "integer", "signed", "36#", "zz", ":16", "/utf16", "-big", ":3", "256"),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12))
def test_token_soup_accepted_exactly_when_erl_accepts(
    erl_port: ErlangPort, fragments: list[str]
) -> None:
    source = "".join(fragments) + "."
    try:
        terms = parse(source)
        ours = terms[0] if len(terms) == 1 else None
    except TermSyntaxError:
        ours = None
    assert erl_port.compare(source, ours) == "agree", source
