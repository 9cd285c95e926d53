"""Parsing 1,000 Erlang-term app specs: bstore's ``consult`` vs ``file:consult/1``.

The peer is one already-started ``erl`` that times its own consult loop with
``timer:tc`` (VM start excluded); both sides run the loop several times and the best
round counts. The ratio bstore/erl is printed (target <= 1.0, must be <= 3).

Run: ``.venv/bin/pytest benchmarks/test_bench_terms.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bstore.specs.terms import consult

ERL = shutil.which("erl")
FILES = 1000
ROUNDS = 5

_WORDS = ["alpha", "beta", "gamma", "delta", "web", "api", "cache", "pool", "log", "db"]


def _spec(rng: random.Random, index: int) -> str:
    """One realistic app.config: a map with env, nested lists, strings and binaries."""
    name = f"{rng.choice(_WORDS)}_{index}"
    deps = ", ".join(
        f"{rng.choice(_WORDS)}_{rng.randrange(FILES)}" for _ in range(rng.randrange(4))
    )
    env_entries = []
    for key in rng.sample(_WORDS, rng.randint(4, 8)):
        value = rng.choice(
            [
                f"{rng.randrange(1, 65536)}",
                f'"{rng.choice(_WORDS)}.example.org"',
                f'<<"{rng.choice(_WORDS)}-{rng.randrange(1000)}">>',
                f"[{{pool_size, {rng.randrange(100)}}}, {{timeout, 16#{rng.randrange(4096):X}}},"
                f' {{hosts, ["a.local", "b.local"]}}]',
                f"{rng.random() * 100:.3f}",
                "#{enabled => true, mode => 'read-only', retries => [1, 2, 4, 8]}",
                f"{{{rng.choice(_WORDS)}, $x, -{rng.randrange(50)}}}",
            ]
        )
        env_entries.append(f"        {key} => {value}")
    env = ",\n".join(env_entries)
    return (
        f"%% spec for {name}\n"
        f"#{{name => {name},\n"
        f'  version => "{rng.randrange(10)}.{rng.randrange(10)}.{rng.randrange(100)}",\n'
        f'  description => <<"The {name} service (generated)">>,\n'
        f'  source => #{{type => git, url => <<"https://git.example.org/{name}.git">>,\n'
        f'              ref => "v1.{rng.randrange(100)}"}},\n'
        f"  env => #{{\n{env}\n  }},\n"
        f"  health => #{{type => http, port => {rng.randrange(1024, 65535)},"
        f' path => "/health", interval => 30_000}},\n'
        f"  depends_on => [{deps}],\n"
        f"  isolation => {rng.choice(['embedded', 'vm'])}\n"
        f"}}.\n"
    )


@pytest.fixture(scope="session")
def spec_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("specs")
    rng = random.Random(1234)
    paths = []
    for index in range(FILES):
        path = root / f"app{index:04d}.config"
        path.write_text(_spec(rng, index), encoding="utf-8")
        paths.append(path)
    return paths


_ERL_LOOP = r"""
[ListFile, Rounds] = init:get_plain_arguments(),
{ok, Files} = file:consult(ListFile),
Times = [element(1, timer:tc(fun() -> [{ok, _} = file:consult(F) || F <- Files] end))
         || _ <- lists:seq(1, list_to_integer(Rounds))],
io:format("~w~n", [lists:min(Times)]),
halt().
"""


def _erl_best_seconds(paths: list[Path], workdir: Path) -> float:
    assert ERL is not None
    listing = workdir / "files.eterm"
    listing.write_text("".join(f'"{p}".\n' for p in paths), encoding="ascii")
    out = subprocess.run(
        [ERL, "-noshell", "-noinput", "-eval", _ERL_LOOP, "-extra", str(listing), str(ROUNDS)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    return int(out.strip()) / 1e6


@pytest.mark.skipif(ERL is None, reason="needs erl (Erlang/OTP)")
def test_bench_consult_1000_specs(benchmark: Any, spec_files: list[Path], tmp_path: Path) -> None:
    def ours() -> int:
        return sum(len(consult(path)) for path in spec_files)

    assert benchmark.pedantic(ours, rounds=ROUNDS, iterations=1, warmup_rounds=1) == FILES
    ours_best = float(benchmark.stats.stats.min)
    erl_best = _erl_best_seconds(spec_files, tmp_path)
    size = sum(p.stat().st_size for p in spec_files)
    ratio = ours_best / erl_best
    print(
        f"\nconsult {FILES} specs ({size / 1024:.0f} KiB): bstore {ours_best * 1000:.1f} ms,"
        f" erl file:consult/1 {erl_best * 1000:.1f} ms, ratio bstore/erl {ratio:.2f}"
        " (target <= 1.0, must be <= 3)"
    )
    benchmark.extra_info["erl_seconds"] = erl_best
    benchmark.extra_info["ratio"] = ratio
