"""Realise app specs end to end with real git, rebar3, mix, make and erlc: every source
type and build system, no-op rebuilds (compiler runs counted by shims), a dependency
bump rebuilding exactly what it affects, lock files, determinism across store roots."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import realise_helpers as rh
import sample_apps
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from localhttp import LocalServer

from bstore.builders.realise import AppState, BuildReport, Realiser, log_for
from bstore.builders.sandbox import NO_ISOLATION
from bstore.builders.sources import Fetcher
from bstore.builders.toolchain import Toolchain
from bstore.specs.model import AppSpec, SourceSpec, SourceType
from bstore.store.local import LocalStore
from bstore.store.paths import StorePath

pytestmark = pytest.mark.integration

CHAIN_APP = {
    "rebar.config": "{erl_opts, [debug_info]}.\n{deps, [hexa_top]}.\n",
    "src/chainapp.app.src": (
        '{application, chainapp, [{description, "chain"}, {vsn, "0.0.0"},\n'
        "  {registered, []}, {applications, [kernel, stdlib, hexa_top]}]}.\n"
    ),
    "src/chainapp.erl": "-module(chainapp).\n-export([run/0]).\nrun() -> hexa_top:chain().\n",
}


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@dataclass
class World:
    """Everything the acceptance build needs, made once per module."""

    base: Path
    hex: rh.HexWorld
    specs: list[AppSpec]
    toolchain: Toolchain
    counter: Path

    def realiser(self, root: Path, client: httpx.Client) -> tuple[LocalStore, Realiser]:
        store = LocalStore.open(root)
        fetcher = Fetcher(store, client, hex_repos=self.hex.repos)
        return store, Realiser(fetcher, toolchain=self.toolchain, isolation=NO_ISOLATION,
                               timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory,
          hex_key: RSAPrivateKey) -> Iterator[World]:
    base = tmp_path_factory.mktemp("world")
    toolchain, counter = rh.counting_toolchain(base)
    with LocalServer() as server:
        hexw = rh.HexWorld(rh.hexpm_builder(hex_key, base), server)
        hexw.publish()
        repos = base / "repos"
        chain = rh.git_repo(write(repos / "chainapp", CHAIN_APP))
        mix = rh.git_repo(sample_apps.mix_app(repos))
        rh.git(mix, "tag", "v1.0.0")
        mk = rh.git_repo(sample_apps.erlang_mk_app(repos, extra_make="dep_greeter = hex 1.0.0"))
        mk_commit = rh.git(mk, "rev-parse", "HEAD")
        plain = rh.git_repo(sample_apps.erlc_app(repos))
        # A later commit on the branch: the pinned commit must still be what is built.
        (plain / "NEWS").write_text("later\n")
        plain_commit = rh.git(plain, "rev-parse", "HEAD~0")
        rh.commit_all(plain, "later")
        url, sha = rh.serve_release(server, "relapp", "2.0.0")
        specs = [
            rh.git_spec("chainapp", "0.1.0", chain, "main"),
            rh.git_spec("mixapp", "1.0.0", mix, "v1.0.0"),
            rh.git_spec("mkapp", "0.3.0", mk, mk_commit),
            rh.git_spec("plainapp", "0.0.1", plain, plain_commit),
            rh.spec("relapp", "2.0.0", SourceSpec(SourceType.RELEASE, url=url, sha256=sha)),
        ]
        yield World(base, hexw, specs, toolchain, counter)


def erl(paths: list[Path], expr: str) -> str:
    argv = ["erl", "-noshell"]
    for p in paths:
        argv += ["-pa", str(p)]
    argv += ["-eval", f'io:format("~p~n", [begin {expr} end]), halt().']
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def ebins(store: LocalStore, out: str) -> list[Path]:
    """The ebin dirs of ``out`` and everything it references."""
    closure = store.closure([store.parse_path(out)])
    return [p for sp in closure for p in store.real_path(sp).glob("lib/*/ebin")]


def outputs(store: LocalStore) -> set[StorePath]:
    return {sp for sp in store.valid_paths() if not sp.name.endswith("-source")}


def test_build_everything_noop_and_bump(world: World, tmp_path: Path) -> None:
    root = tmp_path / "root"
    with httpx.Client(trust_env=False) as client:
        store, realiser = world.realiser(root, client)
        with store:
            report = realiser.build(world.specs, jobs=2)
            assert report.ok, report.to_json()
            report.raise_for_failure()  # nothing to raise
            first_runs = rh.runs(world.counter)
            # Every build system really ran.
            assert {"rebar3", "mix", "make", "erlc"} <= set(first_runs)
            apps = report.apps
            assert {a.state for a in apps.values()} == {AppState.BUILT}
            # Every package is its own derivation; greeter is shared by mixapp and mkapp.
            assert sorted(report.built) == sorted([
                "chainapp-0.1.0", "exdep-0.2.0", "greeter-1.0.0", "hexa_leaf-1.1.0",
                "hexa_mid-1.1.0", "hexa_top-0.1.0", "mixapp-1.0.0", "mkapp-0.3.0",
                "plainapp-0.0.1", "relapp-2.0.0"])
            chain_out = apps["chainapp"].output
            assert chain_out is not None
            assert erl(ebins(store, chain_out), "chainapp:run()") == \
                "[hexa_top,hexa_mid,hexa_leaf,hexa_leaf]"
            mix_out = apps["mixapp"].output
            assert mix_out is not None
            assert (Path(mix_out) / "lib/mixapp-1.0.0/ebin/mixapp.app").is_file()
            mk_out = apps["mkapp"].output
            assert mk_out is not None
            assert "hello, make" in erl(ebins(store, mk_out), "mkapp:run()")
            plain_out = apps["plainapp"].output
            assert plain_out is not None
            assert erl(ebins(store, plain_out), "plainapp:answer()") == "{42,84}"
            rel_out = apps["relapp"].output
            assert rel_out is not None
            assert (Path(rel_out) / "relapp-2.0.0/releases/2.0.0/start_erl.data").is_file()
            # References: chainapp's closure holds the whole hex chain.
            closure_names = {sp.name for sp in store.closure([store.parse_path(chain_out)])}
            assert {"hexa_top-0.1.0", "hexa_mid-1.1.0", "hexa_leaf-1.1.0"} <= closure_names
            # The pinned resolution is reported.
            resolution = apps["chainapp"].resolution
            assert resolution is not None
            assert {(p["package"], p["version"]) for p in resolution} == {
                ("hexa_top", "0.1.0"), ("hexa_mid", "1.1.0"), ("hexa_leaf", "1.1.0")}
            # Derivation recorded beside the store, deriver and kept log.
            info = store.query_info(store.parse_path(chain_out))
            assert info.deriver == apps["chainapp"].derivation
            assert (root / "derivations" / f"{info.deriver}.json").is_file()
            assert "chainapp" in log_for(root, "chainapp").read_text()
            before = outputs(store)

        # No-op rebuild: a new process-like realiser, same root: zero compiler runs.
        rh.runs(world.counter)
        world.counter.write_text("")
        store, realiser = world.realiser(root, client)
        with store:
            again = realiser.build(world.specs, jobs=2)
            assert again.ok
            assert rh.runs(world.counter) == []
            assert realiser.builds == [] and again.built == ()
            assert {a.state for a in again.apps.values()} == {AppState.SKIPPED}
            assert {n: a.output for n, a in again.apps.items()} == \
                {n: a.output for n, a in apps.items()}
            assert realiser.fetcher.fetched == []  # every source came from the fetch cache
            assert outputs(store) == before

        # Publish hexa_leaf 1.1.1: only the chain and chainapp rebuild.
        world.hex.builder.add("hexa_leaf", "1.1.1")
        world.hex.publish()
        try:
            store, realiser = world.realiser(root, client)
            with store:
                bumped = realiser.build(world.specs, jobs=2)
                assert bumped.ok
                assert sorted(bumped.built) == ["chainapp-0.1.0", "hexa_leaf-1.1.1",
                                                "hexa_mid-1.1.0", "hexa_top-0.1.0"]
                assert bumped.apps["chainapp"].output != chain_out
                for name in ("mixapp", "mkapp", "plainapp", "relapp"):
                    assert bumped.apps[name].state is AppState.SKIPPED
                    assert bumped.apps[name].output == apps[name].output
                assert sorted(set(rh.runs(world.counter))) == ["rebar3"]
        finally:
            world.hex.builder.releases["hexa_leaf"] = [
                r for r in world.hex.builder.releases["hexa_leaf"] if r.version != "1.1.1"]
            world.hex.publish()


def build_two(world: World, tmp_path: Path, specs: list[AppSpec]) -> list[BuildReport]:
    reports = []
    with httpx.Client(trust_env=False) as client:
        for n in range(2):
            # The real toolchain in the real sandbox (not the counting shims).
            store = LocalStore.open(tmp_path / f"root{n}")
            realiser = Realiser(Fetcher(store, client, hex_repos=world.hex.repos), timeout=300)
            with store:
                report = realiser.build(specs)
                assert report.ok, report.to_json()
                reports.append(report)
    return reports


def test_same_derivation_same_mcid_in_fresh_roots(world: World, tmp_path: Path) -> None:
    specs = [s for s in world.specs if s.name in ("chainapp", "mixapp", "plainapp")]
    first, second = build_two(world, tmp_path, specs)
    for name in ("chainapp", "mixapp", "plainapp"):
        a, b = first.apps[name], second.apps[name]
        assert a.output is not None and b.output is not None
        mcids, drvs = [], []
        for n, (out, drv) in enumerate(((a.output, a.derivation), (b.output, b.derivation))):
            with LocalStore.open(tmp_path / f"root{n}") as store:
                mcids.append(store.query_info(store.parse_path(out)).mcid)
            recorded = json.loads((tmp_path / f"root{n}" / "derivations" / f"{drv}.json")
                                  .read_bytes())
            # Store paths name their store dir, so only the path fields may differ.
            recorded["source"].pop("path")
            recorded["dependencies"] = sorted(d.split("-", 1)[1] for d in recorded["dependencies"])
            drvs.append(recorded)
        assert drvs[0] == drvs[1], name
        assert mcids[0] == mcids[1], name


def test_rebar_lock_is_honoured(world: World, tmp_path: Path) -> None:
    project = write(tmp_path / "locked", CHAIN_APP)
    (project / "rebar.lock").write_text(
        '{"1.2.0",[{<<"hexa_leaf">>,{pkg,<<"hexa_leaf">>,<<"1.0.0">>},1},'
        '{<<"hexa_mid">>,{pkg,<<"hexa_mid">>,<<"1.0.0">>},1},'
        '{<<"hexa_top">>,{pkg,<<"hexa_top">>,<<"0.1.0">>},0}]}.\n')
    rh.git_repo(project)
    with httpx.Client(trust_env=False) as client:
        store, realiser = world.realiser(tmp_path / "root", client)
        with store:
            plan = realiser.plan([rh.git_spec("chainapp", "0.1.0", project, "main")])
    app = plan.apps["chainapp"]
    assert app.error is None and app.resolution is not None
    assert app.resolution.pins() == {"hexa_leaf": "1.0.0", "hexa_mid": "1.0.0",
                                     "hexa_top": "0.1.0"}
    assert app.lock_file is not None and app.lock_file.endswith("rebar.lock")
    labels = sorted(n.label for n in plan.nodes.values())
    assert labels == ["chainapp-0.1.0", "hexa_leaf-1.0.0", "hexa_mid-1.0.0", "hexa_top-0.1.0"]


def test_hex_app_spec_and_shared_dependency_nodes(world: World, tmp_path: Path) -> None:
    specs = [
        rh.spec("hexa_top", "0.1.0", SourceSpec(SourceType.HEX, ref="0.1.0")),
        world.specs[0],  # chainapp: the same hexa_top 0.1.0 with the same deps
    ]
    with httpx.Client(trust_env=False) as client:
        store, realiser = world.realiser(tmp_path / "root", client)
        with store:
            plan = realiser.plan(specs)
            report = realiser.realise(plan, jobs=2)
            assert report.ok, report.to_json()
            # The hex app's output is the package's own output, built once for both.
            assert report.built.count("hexa_top-0.1.0") == 1
            out = report.apps["hexa_top"].output
            assert out is not None and out.endswith("-hexa_top-0.1.0")
            assert (Path(out) / "lib/hexa_top-0.1.0/ebin/hexa_top.app").is_file()
    top = plan.apps["hexa_top"]
    assert top.key is not None and top.error is None
    # One node for hexa_top, used by both apps.
    assert [n.label for n in plan.nodes.values()].count("hexa_top-0.1.0") == 1
    chain_key = plan.apps["chainapp"].key
    assert chain_key is not None
    assert top.key in plan.nodes[chain_key].deps
