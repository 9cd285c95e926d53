"""Hex versions and requirements, checked against the real Elixir ``Version`` module."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bstore.builders.hex.errors import VersionError
from bstore.builders.hex.versions import Requirement, Version

VERSIONS = [
    "0.9.0",
    "0.9.0-a",
    "1.0.0-0",
    "1.0.0-a",
    "1.0.0-a.1",
    "1.0.0-a.b",
    "1.0.0-b",
    "1.0.0-1",
    "1.0.0-rc.2",
    "1.0.0-rc.10",
    "1.0.0",
    "1.0.0+build.7",
    "1.0.1-a",
    "1.0.1",
    "1.1.0-a",
    "1.1.0",
    "1.2.3",
    "1.10.0",
    "2.0.0-rc.1",
    "2.0.0",
    "2.1.0",
    "3.0.0-0",
    "10.0.0",
]

REQUIREMENTS = [
    "1.0.0",
    "== 1.0.0",
    "== 1.0.0-a",
    "!= 1.0.0",
    "> 1.0.0",
    ">= 1.0.0",
    ">=1.0.0",
    ">= 1.0.0-0",
    ">= 1.0.0-b",
    "< 1.0.0",
    "<= 1.0.0",
    "< 2.0.0",
    "~> 1.0",
    "~> 1.0.0",
    "~> 1.0.0-a",
    "~> 1.1",
    "~> 1.0-rc.1",
    "~> 2.0",
    "~> 0.9",
    "~>1.0",
    ">= 1.0.0 and < 2.0.0",
    "~> 1.0 or ~> 2.0",
    "~> 1.0 or ~> 2.0 and != 2.0.0",
    "< 1.0.0 or > 2.0.0 and < 3.0.0",
    "== 1.0.0+other",
]

INVALID_REQUIREMENTS = [
    "",
    "   ",
    "1.0",
    ">= 1.0",
    "~> 1",
    "~> 1.0.0.0",
    ">== 1.0.0",
    "=> 1.0.0",
    "1.0.0 1.0.0",
    "> 1.0.0 and",
    "or 1.0.0",
    "> 1.0.0or < 2.0.0",
    "1.0.0-a.01",
    "1.0.0-a..b",
    "01.0.0",
    "1.0.0-00",
    "~> 1.0 and and 1.0.0",
    "~>",
    "v1.0.0",
    "1.0.0-",
    "1.0.0+",
    "1.0.0 || 2.0.0",
]

VALID_REQUIREMENT_SPELLINGS = ["~> 1.0.0-0", "~> 1.0+build", "1.0.0+01", "  ~> 1.0  and  < 2.0.0 "]


def test_ordering_follows_semver() -> None:
    ordered = [
        "1.0.0-0",
        "1.0.0-1",
        "1.0.0-a",
        "1.0.0-a.1",
        "1.0.0-a.b",
        "1.0.0-b",
        "1.0.0-rc.2",
        "1.0.0-rc.10",
        "1.0.0",
        "1.0.1-a",
        "1.0.1",
        "1.2.3",
        "1.10.0",
        "2.0.0",
    ]
    parsed = [Version.parse(v) for v in ordered]
    assert sorted(reversed(parsed)) == parsed
    assert Version.parse("1.0.0+a") == Version.parse("1.0.0+b")
    assert str(Version.parse("1.0.0-rc.1+b.2")) == "1.0.0-rc.1+b.2"


@pytest.mark.parametrize(
    "text", ["1.0", "1", "01.0.0", "1.0.0-01", "1.0.0-", "1.0.0+", " 1.0.0", "1.0.0.0", "a.b.c"]
)
def test_invalid_versions(text: str) -> None:
    with pytest.raises(VersionError) as info:
        Version.parse(text)
    assert repr(text) in info.value.message


@pytest.mark.parametrize("text", INVALID_REQUIREMENTS)
def test_invalid_requirements_name_the_text(text: str) -> None:
    with pytest.raises(VersionError) as info:
        Requirement.parse(text)
    assert f"invalid requirement {text!r}" in info.value.message


def _elixir_matrix() -> dict[str, object]:
    """Ask the real Elixir for every (version, requirement, allow_pre) answer at once."""
    # Elixir 1.14 ships no JSON decoder: the inputs go in as an Elixir literal.
    terms = (
        "{"
        + "["
        + ",".join(f'<<"{v}">>' for v in VERSIONS)
        + "],["
        + ",".join(f'<<"{r}">>' for r in REQUIREMENTS + VALID_REQUIREMENT_SPELLINGS)
        + "],["
        + ",".join(f'<<"{r}">>' for r in INVALID_REQUIREMENTS)
        + "]}"
    )
    code = f"""
    {{vs, rs, bad}} = {terms.replace("<<", "").replace(">>", "")}
    matches =
      for r <- rs, v <- vs,
        do: [Version.match?(v, r), Version.match?(v, r, allow_pre: false)]
    invalid = for r <- bad, do: Version.parse_requirement(r) == :error
    valid = for r <- rs, do: Version.parse_requirement(r) != :error
    result = %{{matches: matches, invalid: invalid, valid: valid}}
    IO.puts("RESULT " <> inspect(result, limit: :infinity))
    """
    proc = subprocess.run(
        ["elixir", "-e", code], capture_output=True, text=True, timeout=120, check=True
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    body = line[len("RESULT ") :]
    # Elixir's inspect of this map is JSON once keys are quoted.
    for key in ("matches", "invalid", "valid"):
        body = body.replace(f"{key}: ", f'"{key}": ')
    body = body.replace("%{", "{")
    result: dict[str, object] = json.loads(body)
    return result


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("elixir") is None, reason="elixir is not installed")
def test_matching_agrees_with_elixir() -> None:
    answers = _elixir_matrix()
    pairs = list(itertools.product(REQUIREMENTS + VALID_REQUIREMENT_SPELLINGS, VERSIONS))
    matches = answers["matches"]
    assert isinstance(matches, list)
    assert len(matches) == len(pairs)
    disagreements = []
    for (req_text, ver_text), (with_pre, without_pre) in zip(pairs, matches, strict=True):
        req = Requirement.parse(req_text)
        ver = Version.parse(ver_text)
        ours = (req.matches(ver), req.matches(ver, allow_pre=False))
        if ours != (with_pre, without_pre):
            disagreements.append((req_text, ver_text, ours, (with_pre, without_pre)))
    assert disagreements == []
    assert answers["invalid"] == [True] * len(INVALID_REQUIREMENTS)
    assert answers["valid"] == [True] * len(REQUIREMENTS + VALID_REQUIREMENT_SPELLINGS)


@pytest.mark.parametrize(
    ("req", "text"),
    [("~> 1.2", "~> 1.2"), ("~>1.2.3-rc.1", "~> 1.2.3-rc.1"), (">=1.0.0", ">= 1.0.0")],
)
def test_clause_rendering(req: str, text: str) -> None:
    parsed = Requirement.parse(req)
    assert " and ".join(str(c) for c in parsed.groups[0]) == text
    assert str(parsed) == req


def test_tilde_bounds() -> None:
    two = Requirement.parse("~> 2.1").groups[0][0]
    three = Requirement.parse("~> 2.1.3").groups[0][0]
    assert two.upper() == Version(3, 0, 0, (0,))
    assert three.upper() == Version(2, 2, 0, (0,))
    assert Requirement.parse("~> 2.1.3-dev").mentions_pre
    assert not Requirement.parse("~> 2.1.3").mentions_pre


_ident = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(str),
    st.from_regex(r"[A-Za-z-][0-9A-Za-z-]{0,5}", fullmatch=True),
)
_versions = st.builds(
    lambda a, b, c, pre, build: (
        f"{a}.{b}.{c}"
        + ("-" + ".".join(pre) if pre else "")
        + ("+" + ".".join(build) if build else "")
    ),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.lists(_ident, max_size=3),
    st.lists(_ident, max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(_versions, _versions)
def test_versions_round_trip_and_order_totally(a: str, b: str) -> None:
    va, vb = Version.parse(a), Version.parse(b)
    assert str(va) == a
    assert Version.parse(str(va)) == va
    assert (va < vb) + (va == vb) + (va > vb) == 1
    assert Requirement.parse(f"== {a}").matches(va)
    assert Requirement.parse(f">= {a}").matches(vb) == (vb >= va)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_random_requirements_parse_or_fail_cleanly(text: str) -> None:
    with contextlib.suppress(VersionError):
        Requirement.parse(text)
