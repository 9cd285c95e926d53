"""Realise under failure: hostile sources and downloads, builds that fail or are killed,
``keep_going``. Each case: a clear error naming the culprit, and nothing registered."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import realise_helpers as rh
import sample_apps
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from hexrepo import HexRepoBuilder, default_chain
from localhttp import LocalServer

from bstore.builders.download import DownloadPolicy
from bstore.builders.hex.repos import HexRepo, Repos
from bstore.builders.realise import (
    AppState,
    BuildReport,
    DerivationFailed,
    RealiseError,
    Realiser,
    log_for,
)
from bstore.builders.sources import Fetcher
from bstore.specs.model import AppSpec, SourceSpec, SourceType
from bstore.store.gc import collect_garbage
from bstore.store.local import LocalStore

pytestmark = pytest.mark.integration

#: Quick to give up: the stall and truncation cases must fail in seconds.
FAST_POLICY = DownloadPolicy(connect_timeout=2, read_timeout=1, retries=1, backoff=0.05,
                             rate_window=2)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


def realiser(root: Path, client: httpx.Client, *, timeout: float = 120,
             cancel: threading.Event | None = None) -> Realiser:
    store = LocalStore.open(root)
    fetcher = Fetcher(store, client, policy=FAST_POLICY)
    return Realiser(fetcher, timeout=timeout, cancel=cancel)


def run(root: Path, specs: list[AppSpec], *, jobs: int = 1,
        keep_going: bool = False) -> tuple[Realiser, BuildReport]:
    with httpx.Client(trust_env=False) as client:
        r = realiser(root, client)
        with r.store:
            report = r.build(specs, jobs=jobs, keep_going=keep_going)
    return r, report


def valid(root: Path) -> list[str]:
    with LocalStore.open(root) as store:
        return [str(p) for p in store.valid_paths()]


def tmp_entries(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


def release(server: LocalServer, behaviour: str, wrong_sha: bool = False) -> AppSpec:
    url, sha = rh.serve_release(server, "relapp", "1.0.0", behaviour=behaviour)
    if wrong_sha:
        sha = "0" * 64
    return rh.spec("relapp", "1.0.0", SourceSpec(SourceType.RELEASE, url=url, sha256=sha))


@pytest.mark.parametrize(("behaviour", "wrong_sha", "expected"), [
    ("ok", True, "expected 0000000000000000"),
    ("stall", False, "stalled"),
    ("truncate", False, "truncated"),
])
def test_bad_release_downloads(server: LocalServer, tmp_path: Path, behaviour: str,
                               wrong_sha: bool, expected: str) -> None:
    root = tmp_path / "root"
    _, report = run(root, [release(server, behaviour, wrong_sha)])
    app = report.apps["relapp"]
    assert app.state is AppState.FAILED
    assert expected in (app.error or "")
    assert "/releases/relapp-1.0.0.tar.gz" in (app.error or "")
    assert valid(root) == []
    assert tmp_entries(root) == []


@pytest.mark.parametrize(("url_suffix", "ref", "expected"), [
    (";touch${IFS}PWNED", "main", "cannot fetch"),
    ("$(touch${IFS}PWNED)", "main", "cannot fetch"),
    ("", "main;touch${IFS}PWNED", "no branch or tag named 'main;touch${IFS}PWNED'"),
    ("", "`touch${IFS}PWNED`", "`touch${IFS}PWNED`"),
    ("", "$(touch${IFS}PWNED)", "$(touch${IFS}PWNED)"),
])
def test_git_shell_metacharacters(tmp_path: Path, url_suffix: str, ref: str,
                                  expected: str) -> None:
    repo = rh.git_repo(sample_apps.erlc_app(tmp_path / "repos"))
    url = repo.as_uri() + url_suffix
    spec = rh.spec("plainapp", "1.0.0", SourceSpec(SourceType.GIT, ref=ref, url=url))
    root = tmp_path / "root"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        _, report = run(root, [spec])
    finally:
        os.chdir(cwd)
    app = report.apps["plainapp"]
    assert app.state is AppState.FAILED
    assert expected in (app.error or "")
    assert not list(tmp_path.rglob("PWNED"))  # no shell ever saw the text
    assert valid(root) == []


def test_mesh_source_has_no_peers(tmp_path: Path) -> None:
    spec = rh.spec("meshapp", "1.0.0",
                   SourceSpec(SourceType.MESH, mcid="mcid1-manifest-blake3-" + "a" * 64))
    _, report = run(tmp_path / "root", [spec])
    app = report.apps["meshapp"]
    assert app.state is AppState.FAILED
    assert "no mesh peers configured" in (app.error or "")
    assert valid(tmp_path / "root") == []


def broken_app(root: Path) -> Path:
    project = sample_apps.erlc_app(root, "brokenapp")
    (project / "src/brokenapp_util.erl").write_text("-module(brokenapp_util).\nnot erlang(\n")
    return rh.git_repo(project)


def test_keep_going_builds_independent_apps(tmp_path: Path) -> None:
    good = rh.git_repo(sample_apps.erlc_app(tmp_path / "repos"))
    bad = broken_app(tmp_path / "repos")
    specs = [rh.git_spec("brokenapp", "1.0.0", bad, "main"),
             rh.git_spec("plainapp", "1.0.0", good, "main")]
    root = tmp_path / "root"
    _, report = run(root, specs, jobs=1, keep_going=True)
    apps = report.apps
    assert apps["plainapp"].state is AppState.BUILT
    assert apps["brokenapp"].state is AppState.FAILED
    error = apps["brokenapp"].error or ""
    assert "brokenapp-1.0.0" in error and apps["brokenapp"].derivation in error
    assert "brokenapp_util.erl" in error  # the tail of the log, with the compiler error
    assert "brokenapp_util.erl" in log_for(root, "brokenapp").read_text()
    assert not report.ok
    with pytest.raises(DerivationFailed) as caught:
        report.raise_for_failure()
    assert caught.value.node.label == "brokenapp-1.0.0"
    assert "syntax error" in caught.value.log_tail
    assert caught.value.log_path == log_for(root, caught.value.node.key)
    names = [p.split("-", 1)[1] for p in valid(root)]
    assert "plainapp-1.0.0" in names and "brokenapp-1.0.0" not in names


def test_without_keep_going_nothing_starts_after_a_failure(tmp_path: Path) -> None:
    good = rh.git_repo(sample_apps.erlc_app(tmp_path / "repos"))
    bad = broken_app(tmp_path / "repos")
    # brokenapp sorts first in the scheduler's order, so it runs (and fails) first.
    specs = [rh.git_spec("brokenapp", "1.0.0", bad, "main"),
             rh.git_spec("plainapp", "1.0.0", good, "main")]
    _, report = run(tmp_path / "root", specs, jobs=1, keep_going=False)
    apps = report.apps
    assert apps["brokenapp"].state is AppState.FAILED
    assert apps["plainapp"].state in (AppState.NOT_STARTED, AppState.BUILT)
    assert not report.ok


def slow_app(root: Path) -> Path:
    project = sample_apps.erlc_app(root, "slowapp")
    (project / "Makefile").write_text(
        "PROJECT = slowapp\napp:: wait\nwait:\n\techo started-waiting\n\tsleep 120\n"
        "include erlang.mk\n")
    (project / "erlang.mk").write_text(sample_apps.ERLANG_MK_SUBSET)
    return rh.git_repo(project)


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_build_killed_midway_registers_nothing(tmp_path: Path, how: str) -> None:
    repo = slow_app(tmp_path / "repos")
    root = tmp_path / "root"
    cancel = threading.Event()
    with httpx.Client(trust_env=False) as client:
        r = realiser(root, client, timeout=5 if how == "timeout" else 300, cancel=cancel)
        if how == "cancel":
            def cancel_when_started() -> None:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    logs = list((root / "logs").glob("*.log"))
                    if logs and "started-waiting" in logs[0].read_text(errors="replace"):
                        cancel.set()
                        return
                    time.sleep(0.05)
            threading.Thread(target=cancel_when_started, daemon=True).start()
        with r.store:
            before = [str(p) for p in r.store.valid_paths()]
            report = r.build([rh.git_spec("slowapp", "1.0.0", repo, "main")])
            after = [str(p) for p in r.store.valid_paths()]
            assert tmp_entries(root) == []  # staging and work dirs are gone
    app = report.apps["slowapp"]
    assert app.state is AppState.FAILED
    assert ("timed out" in (app.error or "") or "cancel" in (app.error or ""))
    # Only the fetched source became valid; no output was registered.
    assert [p for p in after if p not in before and not p.endswith("-source")] == []
    log = log_for(root, "slowapp").read_text()
    assert "bstore: building slowapp-1.0.0" in log
    if how == "cancel":  # cancelled once the build was seen running
        assert "started-waiting" in log


@pytest.mark.parametrize("keep_going", [True, False])
def test_an_app_that_cannot_be_planned(tmp_path: Path, keep_going: bool) -> None:
    good = rh.git_repo(sample_apps.erlc_app(tmp_path / "repos"))
    specs = [rh.spec("meshapp", "1.0.0",
                     SourceSpec(SourceType.MESH, mcid="mcid1-manifest-blake3-" + "c" * 64)),
             rh.git_spec("plainapp", "1.0.0", good, "main")]
    _, report = run(tmp_path / "root", specs, keep_going=keep_going)
    assert report.apps["meshapp"].state is AppState.FAILED
    assert "no mesh peers configured" in (report.apps["meshapp"].error or "")
    expected = AppState.BUILT if keep_going else AppState.NOT_STARTED
    assert report.apps["plainapp"].state is expected


def test_unsupported_git_dependency_fails_the_app(tmp_path: Path) -> None:
    project = sample_apps.erlc_app(tmp_path / "repos", "gitdep")
    (project / "rebar.config").write_text(
        '{deps, [{evil, {git, "https://example.invalid/evil.git", {branch, "main"}}}]}.\n')
    repo = rh.git_repo(project)
    _, report = run(tmp_path / "root", [rh.git_spec("gitdep", "1.0.0", repo, "main")])
    app = report.apps["gitdep"]
    assert app.state is AppState.FAILED
    assert "gitdep source/rebar.config: dependency" in (app.error or "")
    assert "is not a Hex package" in (app.error or "")


def test_gc_during_a_build_keeps_its_inputs(tmp_path: Path) -> None:
    repo = slow_app(tmp_path / "repos")
    root = tmp_path / "root"
    cancel = threading.Event()
    with httpx.Client(trust_env=False) as client:
        r = realiser(root, client, cancel=cancel)
        with r.store:
            plan = r.plan([rh.git_spec("slowapp", "1.0.0", repo, "main")])
            key = plan.apps["slowapp"].key
            assert key is not None
            source = plan.nodes[key].source
            reports = []
            worker = threading.Thread(target=lambda: reports.append(r.realise(plan)))
            worker.start()
            deadline = time.monotonic() + 120
            log = root / "logs" / f"{key}.log"
            while time.monotonic() < deadline and not (
                    log.exists() and "started-waiting" in log.read_text(errors="replace")):
                time.sleep(0.05)
            # Another store handle (as `bstore store gc` would be) collects garbage now:
            # the source is no GC root, only this build's temporary root keeps it.
            with LocalStore.open(root) as other:
                result = collect_garbage(other)
                assert source not in result.deleted
                assert other.is_valid(source)
            cancel.set()
            worker.join(60)
    assert reports and reports[0].apps["slowapp"].state is AppState.FAILED
    # Once the realiser is closed, nothing holds the source any more.
    with LocalStore.open(root) as store:
        assert source in collect_garbage(store).deleted


def test_a_failed_dependency_fails_its_dependents(
        tmp_path: Path, hex_key: RSAPrivateKey, local_server: LocalServer) -> None:
    builder = HexRepoBuilder(hex_key, name="hexpm")
    builder.add("badpkg", "1.0.0", files={
        "src/badpkg.erl": b"-module(badpkg).\nbroken(\n",
        "src/badpkg.app.src": b'{application, badpkg, [{vsn, "1.0.0"}, {modules, []},'
                              b" {applications, [kernel, stdlib]}]}.\n",
        "rebar.config": b"{deps, []}.\n",
    })
    builder.serve(local_server)
    repos = Repos([HexRepo("hexpm", local_server.base_url, builder.public_key_pem)])
    user = sample_apps.erlc_app(tmp_path / "repos", "userapp")
    (user / "rebar.config").write_text('{deps, [{badpkg, "1.0.0"}]}.\n')
    other = rh.git_repo(sample_apps.erlc_app(tmp_path / "repos"))
    specs = [rh.git_spec("userapp", "1.0.0", rh.git_repo(user), "main"),
             rh.git_spec("plainapp", "1.0.0", other, "main")]
    with httpx.Client(trust_env=False) as client, LocalStore.open(tmp_path / "root") as store:
        report = Realiser(Fetcher(store, client, hex_repos=repos)).build(specs, keep_going=True)
    assert report.failed == ("badpkg-1.0.0",)
    user_result = report.apps["userapp"]
    assert user_result.state is AppState.DEPENDENCY_FAILED
    assert user_result.error == "userapp-1.0.0 not built: dependency badpkg-1.0.0 failed"
    assert report.apps["plainapp"].state is AppState.BUILT
    with pytest.raises(RealiseError) as caught:
        report.raise_for_failure()
    assert caught.value.message == ("app 'userapp' has no output: userapp-1.0.0 not built:"
                                    " dependency badpkg-1.0.0 failed")


def test_a_bad_hex_tarball_fails_the_app_once(
        tmp_path: Path, hex_key: RSAPrivateKey, local_server: LocalServer) -> None:
    builder = default_chain(HexRepoBuilder(hex_key, name="hexpm"))
    builder.serve(local_server)
    route = local_server.routes["/tarballs/hexa_leaf-1.1.0.tar"]
    route.behaviour = "truncate"
    repos = Repos([HexRepo("hexpm", local_server.base_url, builder.public_key_pem)])
    user = sample_apps.erlc_app(tmp_path / "repos", "userapp")
    (user / "rebar.config").write_text("{deps, [hexa_top]}.\n")
    spec = rh.git_spec("userapp", "1.0.0", rh.git_repo(user), "main")
    with httpx.Client(trust_env=False) as client, LocalStore.open(tmp_path / "root") as store:
        fetcher = Fetcher(store, client, hex_repos=repos, policy=FAST_POLICY)
        # jobs=2: the packages are fetched in parallel first; the failure is kept, not
        # fetched a second time when the graph is built.
        plan = Realiser(fetcher).plan([spec], jobs=2)
        names = sorted(p.name for p in store.valid_paths())
    error = plan.apps["userapp"].error
    assert error is not None
    assert "hexa_leaf-1.1.0.tar" in error.message and "truncated" in error.message
    assert route.hits == FAST_POLICY.retries + 1
    assert "hexa_leaf-1.1.0-source" not in names
