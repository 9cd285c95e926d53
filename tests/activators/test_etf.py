"""External Term Format: our codec against the real ``erl``, and hostile binaries."""

from __future__ import annotations

import enum
import gc
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bstore.activators.etf import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_TERMS,
    EtfDecodeError,
    EtfEncodeError,
    decode,
    encode,
    format_term,
)
from bstore.activators.vmterms import BitString, Fun, Pid, Port, Reference, VmTerm
from bstore.specs.terms.model import Atom, ImproperList, exactly_equal

needs_erl = pytest.mark.skipif(shutil.which("escript") is None, reason="needs Erlang/OTP")

# The Erlang side of the checks. `roundtrip`: reads the expected terms as Erlang source
# (file:consult), decodes our frames with binary_to_term(B, [safe]) and compares with
# =:=, then writes term_to_binary of every expected term in four encodings for us to
# decode. `vmvalues`: sends pids, refs, ports, funs and bitstrings with their ~p form,
# reads them back from us and says whether they are =:= the originals.
ESCRIPT = r"""
-mode(compile).
main(["roundtrip", Src, Ours, Out]) ->
    {ok, Terms} = file:consult(Src),
    {ok, OursBin} = file:read_file(Ours),
    Frames = frames(OursBin),
    length(Frames) =:= length(Terms) orelse halt(3),
    Checks = lists:zipwith(fun(T, B) ->
                               try binary_to_term(B, [safe]) of D -> D =:= T
                               catch _:_ -> false end
                           end, Terms, Frames),
    Encs = [term_to_binary(T, Opts) || T <- Terms,
            Opts <- [[], [{minor_version, 0}], [{minor_version, 2}], [compressed]]],
    ok = file:write_file(Out, [frame(term_to_binary(Checks)) | [frame(E) || E <- Encs]]);
main(["vmvalues"]) ->
    Values = [self(), make_ref(), hd(erlang:ports()), fun() -> ok end, fun lists:map/2,
              <<1:3>>, <<5, 1:1>>, spawn(fun() -> ok end)],
    Printed = [iolist_to_binary(io_lib:format("~p", [V])) || V <- Values],
    io:format("~s~n", [binary:encode_hex(term_to_binary({Values, Printed}))]),
    Line = io:get_line(""),
    Back = binary_to_term(binary:decode_hex(iolist_to_binary(string:trim(Line))), [safe]),
    io:format("~p~n", [Back =:= Values]).

frames(<<>>) -> [];
frames(<<N:32, B:N/binary, Rest/binary>>) -> [B | frames(Rest)].
frame(B) -> [<<(byte_size(B)):32>>, B].
"""


@pytest.fixture(scope="module")
def escript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("etf") / "etf_check.escript"
    path.write_text("#!/usr/bin/env escript\n" + ESCRIPT, encoding="utf-8")
    return path


def _frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


def erl_roundtrip(escript: Path, workdir: Path, terms: list[VmTerm]) -> None:
    """Check every term both ways against erl in one run; fail naming the term."""
    src = workdir / "terms.txt"
    src.write_text("".join(format_term(t, limit=10**9) + ".\n" for t in terms), encoding="utf-8")
    ours = workdir / "ours.bin"
    ours.write_bytes(b"".join(struct.pack(">I", len(b)) + b for b in map(encode, terms)))
    out = workdir / "theirs.bin"
    proc = subprocess.run(
        ["escript", str(escript), "roundtrip", str(src), str(ours), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    frames = _frames(out.read_bytes())
    checks = decode(frames[0])
    assert isinstance(checks, list) and len(checks) == len(terms)
    for term, ok in zip(terms, checks, strict=True):
        assert ok == Atom("true"), f"erl decoded our encoding of {format_term(term)} differently"
    encodings = frames[1:]
    assert len(encodings) == 4 * len(terms)
    for i, blob in enumerate(encodings):
        term = terms[i // 4]
        got = decode(blob)
        assert exactly_equal(got, term), f"{format_term(got)} != {format_term(term)} (enc {i % 4})"  # type: ignore[arg-type]


EVERY_TYPE: list[VmTerm] = [
    Atom("ok"),
    Atom("with space"),
    Atom("quote'and\\back"),
    Atom("λ_unicode_日本"),
    Atom("x" * 255),
    Atom(""),
    Atom("true"),
    b"",
    b"binary",
    bytes(range(256)),
    0,
    255,
    256,
    -1,
    2**31 - 1,
    -(2**31),
    2**31,
    -(2**31) - 1,
    2**64,
    -(2**200),
    2 ** (8 * 300),
    0.0,
    1.5,
    -2.25e-300,
    1.7976931348623157e308,
    5e-324,
    (),
    (1, Atom("a"), b"c"),
    tuple(range(300)),
    [],
    [1, 2, 3],
    list(range(256)),
    [256, -1],
    list(range(70000)),
    [[], [[]], [Atom("a"), (1,)]],
    ImproperList((1,), Atom("tail")),
    ImproperList((Atom("a"), b"b"), 3.5),
    {},
    {Atom("k"): 1, b"bin": [1, 2], 7: {Atom("nested"): ()}},
    {(1, 2): Atom("tuplekey")},
]


@needs_erl
def test_every_type_round_trips_through_erl(escript: Path, tmp_path: Path) -> None:
    erl_roundtrip(escript, tmp_path, EVERY_TYPE)


def _atoms() -> st.SearchStrategy[Atom]:
    chars = st.sampled_from("abcxyzABC_@ 019'\\éλ日")
    return st.text(chars, max_size=12).map(Atom)


def _leaves() -> st.SearchStrategy[VmTerm]:
    floats = st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: not (f == 0.0 and str(f).startswith("-"))
    )
    return st.one_of(
        _atoms(),
        st.binary(max_size=20),
        st.integers(min_value=-(2**100), max_value=2**100),
        st.integers(min_value=0, max_value=300),
        floats,
    )


def _terms() -> st.SearchStrategy[VmTerm]:
    keys: st.SearchStrategy[VmTerm] = st.one_of(_atoms(), st.binary(max_size=5), st.integers())
    return st.recursive(
        _leaves(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.lists(inner, max_size=5).map(tuple),
            st.dictionaries(keys, inner, max_size=4),
            st.builds(
                lambda items, tail: ImproperList(tuple(items), tail),
                st.lists(inner, min_size=1, max_size=3),
                _leaves(),
            ),
        ),
        max_leaves=12,
    )


@needs_erl
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(terms=st.lists(_terms(), min_size=1, max_size=40))
def test_random_terms_round_trip_through_erl(
    escript: Path, tmp_path: Path, terms: list[VmTerm]
) -> None:
    erl_roundtrip(escript, tmp_path, terms)


@given(term=_terms())
def test_random_terms_round_trip_in_python(term: VmTerm) -> None:
    assert exactly_equal(decode(encode(term)), term)  # type: ignore[arg-type]


@needs_erl
def test_vm_values_decode_print_and_go_back_unchanged(escript: Path) -> None:
    proc = subprocess.Popen(
        ["escript", str(escript), "vmvalues"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    blob = bytes.fromhex(proc.stdout.readline().strip())
    reply = decode(blob)
    assert isinstance(reply, tuple) and len(reply) == 2
    values, printed = reply
    assert isinstance(values, list) and isinstance(printed, list)
    kinds = [type(v) for v in values]
    assert kinds == [Pid, Reference, Port, Fun, Fun, BitString, BitString, Pid]
    assert [str(v) for v in values] == [p.decode() for p in printed if isinstance(p, bytes)]
    assert str(values[4]) == "fun lists:map/2"
    proc.stdin.write(encode(values).hex() + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "true"
    assert proc.wait(timeout=30) == 0


def test_golden_encodings() -> None:
    assert encode(Atom("ok")) == bytes([131, 119, 2]) + b"ok"
    assert encode([1, 2]) == bytes([131, 107, 0, 2, 1, 2])
    assert encode(-1) == bytes([131, 98, 255, 255, 255, 255])
    assert encode(2**32) == bytes([131, 110, 5, 0, 0, 0, 0, 0, 1])
    assert encode({}) == bytes([131, 116, 0, 0, 0, 0])
    assert encode(ImproperList((1,), 2)) == bytes([131, 108, 0, 0, 0, 1, 97, 1, 97, 2])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "True has no Erlang counterpart"),
        (None, "None has no Erlang counterpart"),
        ("text", "str value 'text' has no Erlang counterpart"),
        (float("nan"), "float nan cannot be represented"),
        (float("inf"), "float inf cannot be represented"),
        (Atom("a" * 256), "has 256 characters; Erlang allows 255"),
        (ImproperList((), 1), "has no items before its tail"),
        (ImproperList((1,), [2]), "has a list tail"),
        ([1, {1, 2}], "set value"),
    ],
)
def test_unencodable_values(value: object, message: str) -> None:
    with pytest.raises(EtfEncodeError) as info:
        encode(value)
    assert message in str(info.value)


def _deep(levels: int) -> bytes:
    return bytes([131]) + bytes([104, 1]) * levels + bytes([106])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty binary"),
        (bytes([130, 106]), "byte 0 is 130, expected ETF version byte 131"),
        (bytes([131]), "truncated: need 1 bytes, 0 left at byte 1"),
        (bytes([131, 97]), "truncated: need 1 bytes, 0 left at byte 2"),
        (bytes([131, 109, 0, 0, 0, 9, 1]), "truncated: need 9 bytes, 1 left"),
        (bytes([131, 106, 106]), "1 trailing bytes after the term at byte 2"),
        (bytes([131, 82, 0]), "unknown or unsupported term tag 82 at byte 1"),
        (bytes([131, 255]), "unknown or unsupported term tag 255"),
        (bytes([131, 117, 0]), "unknown or unsupported term tag 117"),
        (bytes([131, 108, 255, 255, 255, 255, 106]), "list of 4294967296 elements is longer"),
        (bytes([131, 116, 255, 255, 255, 255]), "map of 4294967295 elements is longer"),
        (bytes([131, 105, 127, 255, 255, 255]), "tuple of 2147483647 elements is longer"),
        (bytes([131, 107, 255, 255, 1]), "string of 65535 elements is longer"),
        (bytes([131, 111, 255, 255, 255, 255, 0]), "truncated: need 4294967295 bytes"),
        (bytes([131, 108, 0, 0, 0, 0, 106]), "LIST_EXT with no elements"),
        (bytes([131, 110, 1, 2, 1]), "bignum sign byte 2 is not 0 or 1"),
        (bytes([131, 70]) + struct.pack(">d", float("inf")), "float inf is not a finite"),
        (bytes([131, 70]) + b"\x7f\xf8" + bytes(6), "float nan is not a finite"),
        (bytes([131, 118, 0, 2, 0xC3, 0x28]), "atom is not valid UTF-8 at byte 1"),
        (bytes([131, 100, 1, 0]) + b"a" * 256, "atom of 256 characters (limit 255)"),
        (
            bytes([131, 116, 0, 0, 0, 2, 97, 1, 106, 97, 1, 106]),
            "duplicate map key 1 at byte 9",
        ),
        (
            bytes([131, 116, 0, 0, 0, 2, 97, 1, 106, 70]) + struct.pack(">d", 1.0) + bytes([106]),
            "duplicate map key 1.0",
        ),
        (
            bytes([131, 116, 0, 0, 0, 1, 107, 0, 1, 65, 106]),
            "map key of type list cannot be represented in Python at byte 6",
        ),
        (bytes([131, 90, 0, 9, 119, 1, 97]), "reference with 9 words (expected 1..5)"),
        (bytes([131, 77, 0, 0, 0, 1, 9, 255]), "bit binary of 1 bytes with 9 bits"),
        (bytes([131, 77, 0, 0, 0, 1, 3, 0xFF]), "non-zero padding bits"),
        (bytes([131, 88, 97, 1]), "expected an atom, found int"),
        (bytes([131, 112, 0, 0, 0, 200, 0]), "fun claims 200 bytes"),
        (_deep(300), "term nested deeper than the limit of 200"),
        (bytes([131, 80, 0, 0, 0, 10]) + zlib.compress(b"\x6a"), "does not inflate to exactly"),
        (bytes([131, 80, 255, 255, 255, 255]) + zlib.compress(b"x"), "over the limit"),
        (bytes([131, 80, 0, 0, 0, 1]) + b"garbage", "corrupt compressed term"),
        (bytes([131, 80, 0, 0, 0, 1]) + zlib.compress(b"\x6a") + b"x", "does not inflate"),
        # Every header the decoder reads inline, cut short.
        (bytes([131, 119]), "truncated: need 1 bytes, 0 left at byte 2"),
        (bytes([131, 119, 2, 0xC3]), "truncated: need 2 bytes, 1 left at byte 3"),
        (bytes([131, 119, 2, 0xC3, 0x28]), "atom is not valid UTF-8 at byte 1"),
        (bytes([131, 109, 0, 0]), "truncated: need 4 bytes, 2 left at byte 2"),
        (bytes([131, 98, 0, 0]), "truncated: need 4 bytes, 2 left at byte 2"),
        (bytes([131, 70, 0, 0]), "truncated: need 8 bytes, 2 left at byte 2"),
        (bytes([131, 107, 0]), "truncated: need 2 bytes, 1 left at byte 2"),
        (bytes([131, 104]), "truncated: need 1 bytes, 0 left at byte 2"),
        (
            bytes([131, 104, 3, 97]),
            "tuple of 3 elements is longer than the remaining input at byte 3",
        ),
        (bytes([131, 108, 0, 0, 0, 2, 97, 1]), "list of 3 elements is longer than the remaining"),
        (bytes([131, 104, 2, 97, 1]), "truncated: need 1 bytes, 0 left at byte 5"),
        # A duplicate inside a nested map is named where that key began, and the outer map
        # is checked after its inner one is complete.
        (
            bytes([131, 116, 0, 0, 0, 1, 119, 1, 97, 116, 0, 0, 0, 2, 97, 1, 106, 97, 1, 106]),
            "duplicate map key 1 at byte 17",
        ),
        (
            bytes([131, 116, 0, 0, 0, 2, 119, 1, 97, 116, 0, 0, 0, 0, 119, 1, 97, 106]),
            "duplicate map key Atom(name='a') at byte 14",
        ),
    ],
)
def test_hostile_binaries_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(EtfDecodeError) as info:
        decode(data, source="test frame")
    assert message in str(info.value)
    assert str(info.value).startswith("test frame: ")


def test_limits_are_configurable() -> None:
    with pytest.raises(EtfDecodeError, match="exceed the limit of 10"):
        decode(encode(b"x" * 20), max_size=10)
    # A small input may stand for many terms ([[],[],...]): capped separately.
    many_nils = encode([[]] * 1000)
    with pytest.raises(EtfDecodeError, match="term count limit"):
        decode(many_nils, max_terms=100)
    assert decode(many_nils) == [[]] * 1000
    assert decode(_deep(300), max_depth=400) is not None


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        # max_terms counts every term where it is reached: a container's own count is
        # checked against what is left when its header is read ...
        (
            bytes([131, 104, 2, 104, 2, 97, 1, 97, 2, 97, 3]),
            {"max_terms": 3},
            "tuple of 2 elements exceeds the term count limit at byte 5",
        ),
        (bytes([131, 107, 0, 3, 1, 2, 3]), {"max_terms": 3}, "string of 3 elements exceeds"),
        # ... and a later sibling fails where it starts.
        (
            bytes([131, 104, 2, 104, 1, 97, 1, 97, 2]),
            {"max_terms": 3},
            "too many terms (limit reached) at byte 7",
        ),
        (bytes([131, 106]), {"max_terms": 0}, "too many terms (limit reached) at byte 1"),
        # Depth is that of the first item too deep, named where it starts; an empty
        # container has none.
        (
            bytes([131, 104, 1, 104, 1, 106]),
            {"max_depth": 1},
            "nested deeper than the limit of 1 at byte 5",
        ),
        (bytes([131, 116, 0, 0, 0, 1, 106, 106]), {"max_depth": 0}, "limit of 0 at byte 6"),
        (bytes([131, 106]), {"max_depth": -1}, "nested deeper than the limit of -1 at byte 1"),
    ],
)
def test_limits_name_the_term_that_crosses_them(
    data: bytes, limits: dict[str, int], message: str
) -> None:
    with pytest.raises(EtfDecodeError) as info:
        decode(
            data,
            max_terms=limits.get("max_terms", DEFAULT_MAX_TERMS),
            max_depth=limits.get("max_depth", DEFAULT_MAX_DEPTH),
        )
    assert message in str(info.value)


def test_empty_containers_need_no_depth() -> None:
    assert decode(bytes([131, 104, 0]), max_depth=0) == ()
    assert decode(bytes([131, 116, 0, 0, 0, 0]), max_depth=0) == {}


def test_depth_is_bounded_only_by_max_depth() -> None:
    # The decoder keeps its own stack: nesting far past Python's recursion limit is a
    # matter of max_depth alone.
    levels = 50_000
    term = decode(_deep(levels), max_depth=levels)
    for _ in range(levels):
        assert isinstance(term, tuple) and len(term) == 1
        term = term[0]
    assert term == []
    with pytest.raises(EtfDecodeError, match=f"limit of {levels - 1} at byte {2 * levels + 1}"):
        decode(_deep(levels), max_depth=levels - 1)


def test_atoms_shared_between_decodes_keep_their_encoding() -> None:
    # The same bytes are a different atom in UTF-8 and in Latin-1: decoding one must not
    # hand out the other.
    raw = "é".encode()
    assert decode(bytes([131, 119, 2]) + raw) == Atom("é")
    assert decode(bytes([131, 115, 2]) + raw) == Atom("Ã©")
    assert decode(bytes([131, 100, 0, 2]) + raw) == Atom("Ã©")
    assert decode(bytes([131, 118, 0, 2]) + raw) == Atom("é")
    # An atom that failed its checks is not remembered as good.
    too_long = "é" * 256
    with pytest.raises(EtfDecodeError, match="atom of 256 characters"):
        decode(bytes([131, 118]) + struct.pack(">H", 512) + too_long.encode())
    with pytest.raises(EtfDecodeError, match="atom of 256 characters"):
        decode(bytes([131, 118]) + struct.pack(">H", 512) + too_long.encode())


class _Op(enum.IntEnum):
    PING = 1


class _Pair(NamedTuple):
    left: VmTerm
    right: VmTerm


def test_subclasses_encode_as_their_base_type() -> None:
    assert encode([_Op.PING, 300]) == encode([1, 300])
    assert encode(_Pair(Atom("a"), b"b")) == encode((Atom("a"), b"b"))
    assert decode(encode([_Op.PING])) == [1]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((1, True), "True has no Erlang counterpart"),
        ([1, False], "False has no Erlang counterpart"),
        ({Atom("k"): None}, "None has no Erlang counterpart"),
        ((Atom("ok"), float("nan")), "float nan cannot be represented"),
        (Atom("\udc80"), "atom '\\udc80' is not valid Unicode"),
        ([Atom("x" * 300)], "has 300 characters; Erlang allows 255"),
    ],
)
def test_unencodable_values_inside_containers(value: object, message: str) -> None:
    with pytest.raises(EtfEncodeError) as info:
        encode(value)
    assert message in str(info.value)


def test_encoding_depth_is_bounded_only_by_its_limit() -> None:
    # The encoder keeps its own stack: 2000 levels encode, past Python's recursion limit.
    term: VmTerm = []
    for _ in range(2000):
        term = [term]
    back = decode(encode(term), max_depth=2000)
    for _ in range(2000):
        assert isinstance(back, list) and len(back) == 1
        back = back[0]
    assert back == []
    with pytest.raises(EtfEncodeError, match="nested deeper than 2000 levels"):
        encode((term,))


def _big_term_blob() -> bytes:
    blob = encode([(Atom("a"), [n], {n: b"x"}) for n in range(10_000)])
    assert len(blob) > 64 * 1024
    return blob


@pytest.mark.parametrize("enabled", [True, False])
def test_decoding_leaves_the_collector_alone(enabled: bool) -> None:
    blob = _big_term_blob()
    was = gc.isenabled()
    try:
        if enabled:
            gc.enable()
        else:
            gc.disable()
        assert decode(blob)[9_999] == (Atom("a"), [9_999], {9_999: b"x"})  # type: ignore[index]
        assert gc.isenabled() is enabled
        with pytest.raises(EtfDecodeError, match="truncated"):
            decode(blob[:-1])
        assert gc.isenabled() is enabled
    finally:
        if was:
            gc.enable()
        else:
            gc.disable()





def test_compressed_and_old_encodings_are_read() -> None:
    payload = encode(list(range(300)))[1:]
    blob = bytes([131, 80]) + struct.pack(">I", len(payload)) + zlib.compress(payload)
    assert decode(blob) == list(range(300))
    assert decode(bytes([131, 115, 2]) + b"ok") == Atom("ok")
    assert decode(bytes([131, 99]) + b"1.5".ljust(31, b"\0")) == 1.5
    assert decode(bytes([131, 108, 0, 0, 0, 1, 97, 1, 108, 0, 0, 0, 1, 97, 2, 106])) == [1, 2]


def test_format_term_is_erlang_text() -> None:
    text = format_term([Atom("a b"), b'q"', 1e16, ImproperList((1,), Atom("t")), {1: ()}])
    assert text == '[\'a b\',<<"q\\"">>,1.0e+16,[1|t],#{1=>{}}]'
    assert format_term(list(range(1000)), limit=20).endswith("...")


@settings(max_examples=300)
@given(term=_terms(), data=st.data())
def test_mutated_binaries_decode_or_raise_etf_errors_only(
    term: VmTerm, data: st.DataObject
) -> None:
    blob = bytearray(encode(term))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
        blob[at] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=1, max_value=len(blob)))
    try:
        decode(bytes(blob[:cut]), max_size=1 << 20)
    except EtfDecodeError as exc:
        assert str(exc).startswith("ETF: ")
