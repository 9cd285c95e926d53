"""The generation manifest value: round trip, hashing rules, strict parsing."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from genhelpers import fake_entry

from bstore.generations.manifest import (
    AppEntry,
    GenerationManifest,
    ManifestError,
    dependency_order,
    parse_manifest,
)
from bstore.specs import terms
from bstore.specs.terms.model import Atom, ImproperList


def _gen(*apps: Any, commit: str | None = None, created: datetime | None = None
         ) -> GenerationManifest:
    return GenerationManifest.of(list(apps), created=created, commit=commit)


RICH_ENV = {
    "port": 8080,
    "name": b"web",
    "charlist": [104, 105],
    "nested": {Atom("b"): (Atom("ok"), 1.5), Atom("a"): [1, 2, {3: b"\xff"}]},
    "improper": ImproperList((1,), Atom("tail")),
}


def test_round_trip_keeps_exact_terms() -> None:
    web = fake_entry("web", "1.2.0", env=RICH_ENV, depends_on=["db"])
    db = fake_entry("db", "3.0", vm=True)
    gen = _gen(web, db, commit="abc123", created=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    data = gen.to_bytes()
    back = parse_manifest(data, "m.json")
    assert back == gen
    assert back.commit == "abc123" and back.created == gen.created
    assert back.apps["web"].env[Atom("improper")] == ImproperList((1,), Atom("tail"))
    doc = json.loads(data)
    assert [a["name"] for a in doc["apps"]] == ["db", "web"]
    # The Erlang form is real Erlang source that reads back as the same map.
    erl = doc["apps"][1]["env_erlang"]
    assert terms.parse(erl + ".")[0] == dict(back.apps["web"].env)
    assert parse_manifest(back.to_bytes()).to_bytes() == data


def test_hash_ignores_metadata_and_env_order() -> None:
    a = _gen(fake_entry("web", env={"x": 1, "y": {Atom("p"): 1, Atom("q"): 2}}),
             commit="one", created=datetime(2020, 1, 1, tzinfo=UTC))
    b = _gen(fake_entry("web", env={"y": {Atom("q"): 2, Atom("p"): 1}, "x": 1}),
             commit="two", created=datetime(2021, 1, 1, tzinfo=UTC))
    assert a.content_hash() == b.content_hash()
    assert a.to_bytes() != b.to_bytes()  # metadata is still recorded
    c = _gen(fake_entry("web", env={"x": 2, "y": {Atom("p"): 1, Atom("q"): 2}}))
    assert c.content_hash() != a.content_hash()
    # an int and a float are different Erlang terms
    assert _gen(fake_entry("web", env={"x": 1.0})).content_hash() != \
        _gen(fake_entry("web", env={"x": 1})).content_hash()


def test_dependency_order_and_cycle() -> None:
    gen = _gen(fake_entry("web", depends_on=["api", "kernel"]),
               fake_entry("api", depends_on=["db"]), fake_entry("db"), fake_entry("zz"))
    order = dependency_order(gen)
    assert order.index("db") < order.index("api") < order.index("web")
    assert set(order) == {"web", "api", "db", "zz"}
    cyc = _gen(fake_entry("a", depends_on=["b"]), fake_entry("b", depends_on=["a"]))
    with pytest.raises(ManifestError, match="dependency cycle: a -> b -> a"):
        dependency_order(cyc)


def test_value_checks() -> None:
    web = fake_entry("web")
    assert isinstance(web, AppEntry)
    with pytest.raises(ManifestError, match="appears twice"):
        _gen(web, web)
    with pytest.raises(ManifestError, match="depends on itself"):
        fake_entry("web", depends_on=["web"])
    with pytest.raises(ManifestError, match="'Web' is not a valid OTP application name"):
        fake_entry("Web")


def _mutate(fn: Callable[[dict[str, Any]], None]) -> bytes:
    gen = _gen(fake_entry("web", env={"port": 1}, depends_on=["db"]), fake_entry("db"))
    doc = json.loads(gen.to_bytes())
    fn(doc)
    return json.dumps(doc).encode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        node: Any = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return apply


_DELETE = object()

HOSTILE = [
    (b"\xff\xfe", "is not valid JSON"),
    (b"[1, 2]", "top level: expected an object"),
    (b'{"schema": 1}', "missing key(s)"),
    (_mutate(_set("schema", "bstore-generation/99")), "is not 'bstore-generation/1'"),
    (_mutate(_set("extra", 1)), "unknown key(s) 'extra'"),
    (_mutate(_set("content_hash", "0" * 64)), "recorded '0000"),
    (_mutate(_set("apps.1.env_erlang", "#{port => 2}")), "env and env_erlang disagree"),
    (_mutate(_set("apps.1.env_erlang", "#{port => ")), "env does not parse"),
    (_mutate(_set("apps.1.env", {"$bogus": 1})), "unknown tag '$bogus'"),
    (_mutate(_set("apps.1.output", "../../etc/passwd")), "is not a store path base name"),
    (_mutate(_set("apps.1.version", "1.0/../x")), "is not usable in a path"),
    (_mutate(_set("apps.1.isolation", "container")), "'container' is not a valid Isolation"),
    (_mutate(_set("apps.1.depends_on", "db")), "expected a list of strings"),
    (_mutate(_set("apps.1.modules", {"web": "nothex"})), "is not blake3 hex"),
    (_mutate(_set("apps.1.closure", [])), "closure does not contain the output"),
    (_mutate(_set("apps.1.health", {"type": "tcp"})), "missing key(s)"),
    (_mutate(_set("apps.0.depends_on", ["web"])), "dependency cycle"),
    (_mutate(_set("apps.1.name", "aaa")), "not sorted by name"),
    (_mutate(_set("code_path", {"x-1": "../../etc"})), "is not '<store path>/lib/x-1'"),
    (_mutate(_set("meta.created", "yesterday")), "is not a UTC time"),
    (_mutate(_set("apps.1.mcid", None)), "expected a string"),
    (b'{"a": NaN}', "is not valid JSON"),
]


@pytest.mark.parametrize(("data", "message"), HOSTILE)
def test_hostile_manifest(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, "/gen/manifest.json")
    assert info.value.message.startswith("/gen/manifest.json: ")
    assert message in info.value.message
    assert info.value.hint and "rollback" in info.value.hint


def test_too_big_manifest() -> None:
    with pytest.raises(ManifestError, match="more than"):
        parse_manifest(b" " * (16 * 1024 * 1024 + 1), "big.json")
