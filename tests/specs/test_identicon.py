"""Identicons: byte-compatible with an independent Erlang implementation of the algorithm."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bstore.specs import identicon

# The algorithm as the issue states it, written independently in Erlang and run by the
# real `escript`, so a drift in our Python (rounding, bit order, formatting) shows up.
_ESCRIPT = r"""#!/usr/bin/env escript
%%! -noinput
main([In, Out]) ->
    {ok, Data} = file:read_file(In),
    Lines = binary:split(Data, <<"\n">>, [global, trim]),
    Uris = [begin
                [SizeB, NameB64] = binary:split(Line, <<" ">>),
                Svg = icon(base64:decode(NameB64), binary_to_integer(SizeB)),
                [<<"data:image/svg+xml;base64,">>, base64:encode(Svg), <<"\n">>]
            end || Line <- Lines],
    ok = file:write_file(Out, Uris).

i(N) -> integer_to_binary(N).

icon(Name, Size) ->
    <<B0, B1, B2, Grid:8/binary, _/binary>> = erlang:md5(Name),
    H = B0 * 360 div 256,
    S = 50 + B1 * 30 div 256,
    L = 40 + B2 * 20 div 256,
    <<Bits:15/bitstring, _/bitstring>> = Grid,
    Rows = rows([B =:= 1 || <<B:1>> <= Bits]),
    Cell = Size div 5,
    Img = Cell * 5,
    M = Cell div 8,
    Side = Cell - 2 * M,
    Fg = ["hsl(", i(H), ", ", i(S), "%, ", i(L), "%)"],
    Bg = ["hsl(", i(H), ", ", i(S div 2), "%, ", i(min(95, L + 40)), "%)"],
    Rects = [["<rect x=\"", i(X * Cell + M), "\" y=\"", i(Y * Cell + M), "\" width=\"",
              i(Side), "\" height=\"", i(Side), "\" fill=\"", Fg, "\" rx=\"", i(M), "\"/>"]
             || {Y, Row} <- lists:zip(lists:seq(0, 4), Rows),
                {X, true} <- lists:zip(lists:seq(0, 4), Row)],
    iolist_to_binary(["<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"", i(Img),
                      "\" height=\"", i(Img), "\" viewBox=\"0 0 ", i(Img), " ", i(Img), "\">",
                      "<rect width=\"100%\" height=\"100%\" fill=\"", Bg, "\" rx=\"",
                      i(Cell div 4), "\"/>", Rects, "</svg>"]).

rows([A, B, C | T]) -> [[A, B, C, B, A] | rows(T)];
rows([]) -> [].
"""

_NAMES = [
    "demo_uptime",
    "my_web_app",
    "a",
    "",
    "bstore",
    "cowboy",
    "ranch",
    "x" * 255,
    "héllo",
    "日本語アプリ",
    "emoji_🚀_app",
    "Ünïcödé",
    "app with spaces",
    "tab\tname",
    *[f"app_{i}" for i in range(200)],
]
_SIZES = [64, 1, 5, 8, 16, 31, 40, 100, 128, 257]


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("escript") is None, reason="needs escript (OTP)")
def test_identicons_match_an_erlang_implementation(tmp_path: Path) -> None:
    cases = [(name, _SIZES[i % len(_SIZES)]) for i, name in enumerate(_NAMES)]
    cases += [("demo_uptime", size) for size in _SIZES]
    script = tmp_path / "identicon.escript"
    script.write_text(_ESCRIPT)
    inp = tmp_path / "names.txt"
    inp.write_text(
        "".join(f"{size} {base64.b64encode(n.encode()).decode()}\n" for n, size in cases)
    )
    out = tmp_path / "uris.txt"
    subprocess.run(["escript", str(script), str(inp), str(out)], check=True, timeout=120)
    expected = out.read_text().splitlines()
    assert len(expected) == len(cases)
    for (name, size), uri in zip(cases, expected, strict=True):
        assert identicon.data_uri(name, size) == uri, (name, size)
        assert identicon.svg(name, size).encode() == base64.b64decode(uri.split(",", 1)[1])


@pytest.mark.parametrize("name", ["demo_uptime", "my_web_app", "日本語", ""])
def test_identicon_structure(name: str) -> None:
    text = identicon.svg(name)
    assert "\n" not in text
    root = ET.fromstring(text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("width") == root.get("height") == "60"  # 5 * (64 div 5)
    rects = list(root)
    background, cells = rects[0], rects[1:]
    assert background.get("width") == "100%" and background.get("rx") == "3"
    assert len(cells) <= 25
    coords = {(int(r.get("x", "-1")), int(r.get("y", "-1"))) for r in cells}
    for x, y in coords:
        assert (x - 1) % 12 == 0 and (y - 1) % 12 == 0  # cell 12, inset by 12 div 8 = 1
        column = (x - 1) // 12
        assert ((4 - column) * 12 + 1, y) in coords  # mirrored about the centre column
    if cells:
        assert r_size(cells) == {"10"}
    fills = {r.get("fill") for r in cells}
    assert len(fills) <= 1
    assert all(re.fullmatch(r"hsl\(\d+, \d+%, \d+%\)", f or "") for f in fills)


def r_size(cells: list[ET.Element]) -> set[str | None]:
    return {r.get("width") for r in cells} | {r.get("height") for r in cells}


def test_identicon_is_deterministic_and_name_sensitive() -> None:
    assert identicon.svg("a") == identicon.svg("a")
    assert identicon.svg("a") != identicon.svg("b")
    assert identicon.data_uri("a").startswith("data:image/svg+xml;base64,")


@pytest.mark.parametrize("size", [0, -1, True, 2.5])
def test_identicon_rejects_bad_size(size: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        identicon.svg("a", size)  # type: ignore[arg-type]
