"""Generation switch with 1 of 50 embedded apps changed, and its rollback: bstore's
embedded activator on a real host node vs the same stop + start done directly in one
``erl`` shell.

Input: 50 small OTP apps (``a01`` … ``a50``, each a supervisor, a stateful gen_server and
a TCP helper module; compiled with ``erlc``), all running. Generation 1 has every app at
1.0.0; generation 2 changes ``a07`` to 2.0.0 (new code).

bstore side (wall time of the whole command-level call, VM already running):
``switch_to_number(profile, 2, hook=activation_hook(...))`` — profile lock, journal,
link rename, plan against what runs (exactly one ``restart``, asserted from the plan's
outcomes), stop ``a07``, code path, load the new modules, start, health confirmation,
records and GC roots — then ``rollback(profile, hook=...)`` back to generation 1.
Health confirmation ``health_settle`` is 0 here (a policy wait, not overhead: the
default 0.3 s re-probe to catch crash loops adds exactly that); the first round's
``commit_generation`` (which also writes the generation) is printed too.

Peer: one ``erl -noshell`` VM with the same 50 apps started; in it, timed with
``erlang:monotonic_time``: ``application:stop``, ``unload``, ``code:del_path`` of the
old ``ebin``, ``add_patha`` of the new, purge + load of the modules whose code changed
(what bstore loads too), ``application:load``, ``set_env``, ``application:start`` — and
the same back. The two take turns round by round (the peer VM stays up and does one
round per line on its stdin), so a slow spell of the shared machine hits both.

Printed: medians and the ratio bstore/erl for the switch (target <= 2) and the rollback
wall time (target <= 1 s plus the app's own start, i.e. the peer's time).

Run: ``.venv/bin/pytest benchmarks/test_bench_activate.py -p no:xdist --benchmark-only -s``
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "activators"))

from acthelpers import AppCompiler, AppDef, generation, short_root

from bstore.activators.agent_build import compile_agent
from bstore.activators.base import ActivatorContext, ApplyResult, activation_hook
from bstore.activators.embedded import EmbeddedActivator
from bstore.activators.plan import Action, ActionKind
from bstore.generations.manifest import GenerationManifest
from bstore.generations.profiles import Profile
from bstore.generations.switch import commit_generation, rollback, switch_to_number
from bstore.store.local import LocalStore

APPS = 50
CHANGED = "a07"
ROUNDS = 21
TARGET = 2.0

pytestmark = pytest.mark.skipif(shutil.which("erl") is None, reason="needs Erlang/OTP")


class Counting(EmbeddedActivator):
    """Remembers the plan and result of the last apply."""

    def __init__(self, context: ActivatorContext, agent_ebin: Path) -> None:
        super().__init__(context, agent_ebin=agent_ebin)
        self.last: tuple[list[Action], ApplyResult] | None = None
        #: Wall time of each apply (the activator's own part of a switch).
        self.applies: list[float] = []

    def apply(self, actions: Sequence[Action]) -> ApplyResult:
        start = time.perf_counter()
        result = super().apply(actions)
        self.applies.append(time.perf_counter() - start)
        self.last = (list(actions), result)
        return result

    def check_one_restart(self) -> None:
        assert self.last is not None
        actions, result = self.last
        assert result.ok, result.to_json()
        kinds = [a.kind for a in actions]
        assert len(kinds) == APPS
        assert kinds.count(ActionKind.RESTART) == 1 and kinds.count(ActionKind.KEEP) == APPS - 1
        restarted = [o.action.app for o in result.outcomes
                     if o.action.kind is ActionKind.RESTART]
        assert restarted == [CHANGED]


PEER = r"""
Apps = [list_to_atom(A) || A <- string:tokens(os:getenv("BENCH_APPS"), ",")],
Changed = list_to_atom(os:getenv("BENCH_CHANGED")),
Old = os:getenv("BENCH_OLD"), New = os:getenv("BENCH_NEW"), Dir = os:getenv("BENCH_DIR"),
[begin ok = application:load(A), ok = application:set_env(A, dir, Dir),
       ok = application:start(A) end || A <- Apps],
Mods = [list_to_atom(M) || M <- string:tokens(os:getenv("BENCH_MODS"), ",")],
Move = fun(From, To) ->
    T0 = erlang:monotonic_time(microsecond),
    ok = application:stop(Changed),
    ok = application:unload(Changed),
    true = code:del_path(From),
    true = code:add_patha(To),
    [begin code:purge(M), {module, M} = code:load_abs(filename:join(To, atom_to_list(M)))
     end || M <- Mods],
    ok = application:load(Changed),
    ok = application:set_env(Changed, dir, Dir),
    ok = application:start(Changed),
    erlang:monotonic_time(microsecond) - T0
end,
io:format("READY~n"),
Loop = fun Loop() ->
    case io:get_line("") of
        "round\n" ->
            S = Move(Old, New),
            B = Move(New, Old),
            io:format("BENCH ~p ~p~n", [S, B]),
            Loop();
        _ ->
            halt()
    end
end,
Loop().
"""


class ErlShellPeer:
    """One ``erl`` VM with the same 50 apps started, doing the same stop + start of the
    changed app each time it is asked (a line on its stdin): its rounds alternate with
    bstore's, so both see the machine in the same state."""

    def __init__(self, ebins: list[Path], old: Path, new: Path, mods: list[str],
                 work: Path) -> None:
        argv = ["erl", "-noshell"]
        for d in ebins:
            argv += ["-pa", str(d)]
        env = {**os.environ, "BENCH_APPS": ",".join(f"a{i:02d}" for i in range(1, APPS + 1)),
               "BENCH_CHANGED": CHANGED, "BENCH_OLD": str(old), "BENCH_NEW": str(new),
               "BENCH_DIR": str(work), "BENCH_MODS": ",".join(mods)}
        self.proc = subprocess.Popen([*argv, "-eval", PEER], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._line() == "READY"

    def _line(self) -> str:
        """The next line the peer script prints (the apps may log lines of their own)."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the erl peer exited ({self.proc.wait(5)})"
            if line.startswith(("READY", "BENCH ")):
                return line.strip()

    def round(self) -> tuple[float, float]:
        """One switch and one switch back: their times in seconds (timed inside the VM)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        tag, switch, back = self._line().split()
        assert tag == "BENCH"
        return int(switch) / 1e6, int(back) / 1e6

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_switch_one_of_fifty_vs_erl_shell(benchmark: Any, tmp_path: Path) -> None:
    root = short_root()
    compiler = AppCompiler(tmp_path / "apps")
    work = tmp_path / "obs"
    work.mkdir()
    names = [f"a{i:02d}" for i in range(1, APPS + 1)]
    # erlc once per app, two at a time (the machine has two cores).
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: compiler.ebin(n, "1.0.0", 1), names))
    compiler.ebin(CHANGED, "2.0.0", 2)
    agent = compile_agent(tmp_path / "agent")
    options = {"distribution": "off", "health_settle": "0", "health_timeout": "10"}
    act = Counting(ActivatorContext(root, "default", options), agent)
    try:
        with LocalStore.open(root) as store:
            profile = Profile(store, "default")
            hook = activation_hook(store, act)
            g1 = generation(store, compiler, work, [AppDef(n) for n in names])
            g2 = generation(store, compiler, work, [
                AppDef(n, "2.0.0", variant=2) if n == CHANGED else AppDef(n) for n in names])
            start = time.perf_counter()
            commit_generation(profile, g1, hook=hook)
            boot = time.perf_counter() - start
            start = time.perf_counter()
            commit_generation(profile, g2, hook=hook)
            first = time.perf_counter() - start
            act.check_one_restart()
            start = time.perf_counter()
            rollback(profile, hook=hook)
            act.check_one_restart()
            first_back = time.perf_counter() - start

            # The peer loads what bstore loads: the modules whose code changed.
            mods = [m for m, h in g2.apps[CHANGED].modules.items()
                    if g1.apps[CHANGED].modules.get(m) != h]
            assert mods == [f"{CHANGED}_srv"], mods

            def ebin(manifest: GenerationManifest, app: str) -> Path:
                entry = manifest.apps[app]
                return store.store_dir / str(entry.output) / "lib" / entry.lib_name / "ebin"

            peer_work = tmp_path / "peer-obs"
            peer_work.mkdir()
            peer = ErlShellPeer([ebin(g1, n) for n in names], ebin(g1, CHANGED),
                                ebin(g2, CHANGED), mods, peer_work)
            switch: list[float] = []
            back: list[float] = []
            peer_switch: list[float] = []
            peer_back: list[float] = []

            def one_round() -> None:
                t0 = time.perf_counter()
                switch_to_number(profile, 2, hook=hook, operation="activate")
                t1 = time.perf_counter()
                act.check_one_restart()
                t2 = time.perf_counter()
                rollback(profile, hook=hook)
                t3 = time.perf_counter()
                act.check_one_restart()
                switch.append(t1 - t0)
                back.append(t3 - t2)

            try:
                act.applies = []
                # bstore and erl take turns, round by round: a machine that slows down
                # for a while (it is shared) slows both.
                for _ in range(ROUNDS):
                    one_round()
                    peer_s, peer_b = peer.round()
                    peer_switch.append(peer_s)
                    peer_back.append(peer_b)
                applies = list(act.applies)
            finally:
                peer.close()
            benchmark.pedantic(one_round, rounds=3, iterations=1)
    finally:
        act.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    ms = 1000.0
    s_med, p_med = statistics.median(switch), statistics.median(peer_switch)
    b_med, pb_med = statistics.median(back), statistics.median(peer_back)
    print(
        f"\n[activate] {APPS} embedded apps, 1 changed ({CHANGED} 1.0.0 -> 2.0.0), "
        f"{ROUNDS} rounds, exactly 1 restart each (asserted):\n"
        f"  switch:   bstore median {s_med * ms:.1f} ms / best {min(switch) * ms:.1f} ms | "
        f"erl shell median {p_med * ms:.2f} ms / best {min(peer_switch) * ms:.2f} ms | "
        f"ratio median {s_med / p_med:.1f}, best {min(switch) / min(peer_switch):.1f} "
        f"(target <= {TARGET})\n"
        f"  rollback: bstore median {b_med * ms:.1f} ms / max {max(back) * ms:.1f} ms | "
        f"app's own stop+start (erl) median {pb_med * ms:.2f} ms "
        f"(target <= 1000 ms + that)\n"
        f"  of which the activator's apply (stop, code, start, health): median "
        f"{statistics.median(applies) * ms:.1f} ms, ratio to erl "
        f"{statistics.median(applies) / statistics.median(peer_switch + peer_back):.1f}; "
        f"the rest is the journaled profile switch and reading the manifests\n"
        f"  first commit_generation of the change (writes the generation): "
        f"{first * ms:.1f} ms; first rollback {first_back * ms:.1f} ms; "
        f"boot of generation 1 (node + {APPS} apps): {boot * ms:.0f} ms"
    )
