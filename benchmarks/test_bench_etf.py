"""External Term Format codec: bstore's pure-Python encode/decode vs the BEAM's own BIFs.

Input: one term shaped like an agent reply for a big node — 20 000 tuples
``{Atom, Int, Binary, Float, [1,2,3], #{k => v}}`` (about 1 MiB of ETF). bstore side:
:func:`bstore.activators.etf.decode` (bounded, strict) and :func:`encode`. Peer:
``binary_to_term(B, [safe])`` and ``term_to_binary(T)`` inside ``erl`` on the same bytes,
timed there with ``timer:tc`` (no process start counted). Medians of 5 rounds; the
ratios bstore/erl are printed. This is C against Python, so the ratio is informative,
not a target: replies the agent sends are far smaller than this input.

Run: ``.venv/bin/pytest benchmarks/test_bench_etf.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bstore.activators.etf import decode, encode
from bstore.activators.vmterms import VmTerm
from bstore.specs.terms.model import Atom
from peers import median_seconds

ROUNDS = 5

pytestmark = pytest.mark.skipif(shutil.which("escript") is None, reason="needs Erlang/OTP")

PEER = r"""
main([File]) ->
    {ok, B} = file:read_file(File),
    T = binary_to_term(B),
    Dec = [element(1, timer:tc(fun() -> binary_to_term(B, [safe]) end)) || _ <- lists:seq(1, 5)],
    Enc = [element(1, timer:tc(fun() -> term_to_binary(T) end)) || _ <- lists:seq(1, 5)],
    io:format("~p ~p~n", [lists:nth(3, lists:sort(Dec)), lists:nth(3, lists:sort(Enc))]).
"""


def _term() -> VmTerm:
    return [
        (Atom(f"key_{n % 50}"), n * 7919, b"payload-%d" % n, n * 1.5, [1, 2, 3], {Atom("k"): n})
        for n in range(20_000)
    ]


def test_etf_codec_vs_erlang_bifs(benchmark: Any, tmp_path: Path) -> None:
    term = _term()
    blob = encode(term)
    assert decode(blob) == term
    (tmp_path / "term.bin").write_bytes(blob)
    script = tmp_path / "peer.escript"
    script.write_text("#!/usr/bin/env escript\n" + PEER)
    out = subprocess.run(
        ["escript", str(script), str(tmp_path / "term.bin")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    erl_decode, erl_encode = int(out[0]) / 1e6, int(out[1]) / 1e6

    ours_decode = median_seconds(lambda: decode(blob), ROUNDS)
    ours_encode = median_seconds(lambda: encode(term), ROUNDS)
    benchmark.pedantic(lambda: decode(blob), rounds=3, iterations=1)

    print(
        f"\n[etf] {len(blob) / 1024:.0f} KiB term: decode bstore {ours_decode * 1000:.1f} ms "
        f"vs erl binary_to_term/2 {erl_decode * 1000:.1f} ms (ratio "
        f"{ours_decode / erl_decode:.1f}); encode bstore {ours_encode * 1000:.1f} ms vs "
        f"erl term_to_binary/1 {erl_encode * 1000:.1f} ms (ratio {ours_encode / erl_encode:.1f})"
    )
