"""AppSpec values: self-validation, the JSON form (tagged terms) and the Erlang form."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bstore.specs import termjson, terms
from bstore.specs.model import (
    AppSpec,
    HealthSpec,
    HealthType,
    IconSpec,
    InvalidSpec,
    Isolation,
    SourceSpec,
    SourceType,
    VmConfig,
)
from bstore.specs.problems import SpecError
from bstore.specs.terms.model import Atom, ImproperList, Term, exactly_equal

_HEX = SourceSpec(SourceType.HEX, ref="1.0")


def _base(**changes: Any) -> AppSpec:
    fields: dict[str, Any] = {
        "name": "web",
        "version": "1.0",
        "source": _HEX,
        "icon": IconSpec.identicon("web"),
    }
    fields.update(changes)
    return AppSpec(**fields)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _base(name="Web"), "'Web' is not a valid OTP application name"),
        (lambda: _base(name="a" * 256), "is not a valid OTP application name"),
        (lambda: _base(version="1 0"), "version '1 0' is not usable in a path"),
        (lambda: _base(env={"k": 1}), "env keys must be atoms"),
        (lambda: _base(depends_on=("Bad",)), "depends_on ('Bad',) holds an invalid app name"),
        (lambda: _base(vm_config=VmConfig()), "vm_config is only used with isolation vm"),
        (lambda: _base(source=SourceSpec(SourceType.HEX)), "a hex source needs a ref"),
        (lambda: SourceSpec(SourceType.GIT), "a git source needs a url"),
        (
            lambda: SourceSpec(SourceType.GIT, url="-oProxy=x"),
            "must not be empty or start with '-'",
        ),
        (lambda: SourceSpec(SourceType.GIT, url="a b"), "contains whitespace or control"),
        (
            lambda: SourceSpec(SourceType.RELEASE, url="https://x", sha256="AB" * 32),
            "needs sha256 as 64 lowercase hex digits",
        ),
        (lambda: SourceSpec(SourceType.MESH, mcid="mcid1-x"), "a mesh source needs an mcid"),
        (
            lambda: HealthSpec(HealthType.TCP, port=0),
            "health port must be an integer from 1 to 65535",
        ),
        (lambda: HealthSpec(HealthType.HTTP, port=80, path="x"), "health path 'x' must start"),
        (lambda: HealthSpec(HealthType.CUSTOM), "a custom health check needs a module"),
        (
            lambda: HealthSpec(HealthType.TCP, port=1, interval=0),
            "health interval must be an integer from 1",
        ),
        (lambda: VmConfig(scheduler_limit=5000), "vm_config scheduler_limit must be an integer"),
        (lambda: VmConfig(node_prefix="a@b"), "node_prefix 'a@b' has characters"),
        (
            lambda: IconSpec.identicon("x").__class__(IconSpec.identicon("x").type, ""),
            "needs a value",
        ),
    ],
)
def test_invalid_values_cannot_be_built(build: Any, message: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        build()
    assert message in info.value.message


def _rich() -> AppSpec:
    return _base(
        description="Web front end",
        source=SourceSpec(SourceType.GIT, url="https://g/x.git", ref="main"),
        env={
            Atom("port"): 8080,
            Atom("name"): [104, 105],
            Atom("bin"): b"\xff\x00",
            Atom("ok"): Atom("true"),
            Atom("t"): (1, 2.5, Atom("x")),
            Atom("m"): {b"k": [], 1: Atom("null")},
            Atom("i"): ImproperList((1, 2), Atom("t")),
        },
        health=HealthSpec(HealthType.HTTP, port=80, path="/h", interval=10, timeout=5),
        depends_on=("db", "cache"),
        isolation=Isolation.VM,
        vm_config=VmConfig(512, 2, "bs_", ("+P", "1000")),
        extra={Atom("license"): b"MIT"},
    )


def test_json_round_trip() -> None:
    spec = _rich()
    data = json.loads(json.dumps(spec.to_json()))
    assert data["env"]["port"] == 8080
    assert data["env"]["name"] == {"$charlist": "hi"}
    assert data["env"]["bin"] == {"$base64": "/wA="}
    assert data["env"]["ok"] is True
    assert data["env"]["t"] == {"$tuple": [1, 2.5, {"$atom": "x"}]}
    assert data["isolation"] == "vm" and data["depends_on"] == ["db", "cache"]
    back = AppSpec.from_json(data)
    assert back == spec
    assert exactly_equal(dict(back.env), dict(spec.env))  # type: ignore[arg-type]


def test_env_keys_starting_with_dollar_use_the_map_form() -> None:
    data = _base(env={Atom("$odd"): 1, Atom("a"): 2}).to_json()
    assert data["env"] == {"$map": [[{"$atom": "$odd"}, 1], [{"$atom": "a"}, 2]]}
    assert AppSpec.from_json(data).env == {Atom("$odd"): 1, Atom("a"): 2}


def test_from_json_rejects_other_documents() -> None:
    with pytest.raises(InvalidSpec, match="not an AppSpec JSON document"):
        AppSpec.from_json({"name": "web"})


def test_env_is_copied() -> None:
    env: dict[Atom, Term] = {Atom("a"): 1}
    spec = _base(env=env)
    env[Atom("b")] = 2
    assert spec.env == {Atom("a"): 1}


def test_erlang_form_reads_back_with_our_parser() -> None:
    spec = _rich()
    (term,) = terms.parse(spec.to_erlang(), "show")
    assert exactly_equal(term, spec.to_term())


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("erl") is None, reason="needs erl (OTP)")
def test_erlang_form_is_read_by_file_consult(tmp_path: Path) -> None:
    spec = _rich()
    path = tmp_path / "spec.config"
    path.write_text(spec.to_erlang())
    out = tmp_path / "out.config"
    script = (
        f'{{ok, [T]}} = file:consult("{path}"), '
        f'ok = file:write_file("{out}", io_lib:format("~w.~n", [T])), halt().'
    )
    subprocess.run(["erl", "-noshell", "-eval", script], check=True, timeout=120)
    (term,) = terms.consult(out)
    assert exactly_equal(term, spec.to_term())


_atoms = st.text(st.characters(codec="utf-8"), max_size=8).map(Atom)
_scalars = st.one_of(
    _atoms,
    st.binary(max_size=8),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(min_value=0, max_value=0x10FFFF), max_size=5),
)


def _hashable(term: Term) -> bool:
    try:
        hash(term)
    except TypeError:
        return False
    return True


_terms = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.builds(
            lambda items, tail: ImproperList(tuple(items), tail),
            st.lists(inner, min_size=1, max_size=3),
            inner.filter(lambda t: not isinstance(t, list)),
        ),
        st.dictionaries(inner.filter(_hashable), inner, max_size=3),
        st.dictionaries(_atoms, inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_terms)
def test_tagged_json_round_trips_every_term(term: Term) -> None:
    text = json.dumps(termjson.encode(term))
    assert exactly_equal(termjson.decode(json.loads(text)), term)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"$atom": "a" * 256}, "atom is 256 characters; at most 255"),
        ({"$what": 1}, "unknown tag '$what'"),
        ({"$charlist": 5}, "$charlist expects a string, found 5"),
        ({"$map": [[1]]}, "$map expects [key, value] pairs"),
        ({"$map": [[[1], 2]]}, "a map key here cannot be a list or a map"),
        ({"$improper": [1]}, "$improper expects at least one element"),
        ({"$tuple": 1, "x": 2}, "must be the only key"),
    ],
)
def test_tagged_json_errors(value: Any, message: str) -> None:
    with pytest.raises(SpecError) as info:
        termjson.decode(value)
    assert message in info.value.problem.message


@pytest.mark.parametrize("bad", [math.nan, math.inf, True, "text"])
def test_encode_refuses_non_terms(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        termjson.encode(bad)


@pytest.mark.parametrize(("a", "b", "same"), [
    ([104, 105], [104, 105], True),
    ([104, 105], [104, 105.0], False),
    ([1.0], [1], False),
    ([], [], True),
    ([1, [2]], [1, [2.0]], False),
    ([1, [2]], [1, [2]], True),
    ((1, 2), (1, 2), True),
    ((1, 2.0), (1, 2), False),
    ([Atom("a"), 1], [Atom("a"), 1], True),
    ([1, 2], [1, 3], False),
    ([1], [1, 1], False),
    ([ImproperList((1,), 2)], [ImproperList((1,), 2.0)], False),
])
def test_exactly_equal_lists(a: Term, b: Term, same: bool) -> None:
    # Lists take a fast path (== first, then integer-only lists); =:= must stay exact.
    assert exactly_equal(a, b) is same and exactly_equal(b, a) is same
