"""The whole path for real: specs in a git repo, app sources in other git repos (file://
URLs), built by the realiser with erlc, run in a real host node by the embedded
activator; upgrade, env change, a crashed app healed, and a health failure rolled back
and quarantined."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "builders"))
from gitrepos import GitRemote
from realise_helpers import commit_all
from recohelpers import Recorder, erlc_git_app
from recohelpers import git_spec_text as spec_text

from bstore.activators.agent_build import compile_agent
from bstore.activators.base import ActivatorContext
from bstore.activators.embedded import EmbeddedActivator
from bstore.activators.plan import AppStatus
from bstore.events import EventBus
from bstore.gitops.config import Config
from bstore.gitops.reconciler import Reconciler
from bstore.gitops.status import AppState, State, read_status

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("erl") is None or shutil.which("erlc") is None,
                       reason="needs Erlang/OTP"),
]


def status_gen(rec: Reconciler) -> int | None:
    return read_status(rec.gitops_dir).generation


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bsr", dir="/tmp"))  # socket paths stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def activator(root: Path, tmp_path: Path) -> Iterator[EmbeddedActivator]:
    ctx = ActivatorContext(root, "e2e", {"distribution": "off", "health_settle": "0.2"})
    act = EmbeddedActivator(ctx, agent_ebin=compile_agent(tmp_path / "agent"))
    yield act
    act.shutdown()


def test_reconcile_with_real_builds_and_the_embedded_activator(
        tmp_path: Path, root: Path, activator: EmbeddedActivator) -> None:
    hello = erlc_git_app(tmp_path / "src", "hello", "hi")
    other = erlc_git_app(tmp_path / "src", "other", "yo")
    specs = GitRemote(tmp_path / "specs")
    bus = EventBus()
    events = Recorder(bus)
    config = Config(repo_url=specs.url, profile="e2e", activator="embedded")
    rec = Reconciler(config, root, activator=activator, events=bus)

    # deploy two apps built from their git sources
    specs.commit({"apps/hello/app.yaml": spec_text("hello", "1.0.0", hello.as_uri()),
                  "apps/other/app.yaml": spec_text("other", "1.0.0", other.as_uri())})
    specs.push()
    r1 = rec.reconcile_once()
    assert r1.state is State.SYNCED, r1.to_json()
    state = activator.current_state()
    assert {n: (s.status, s.version) for n, s in state.items()} == {
        "hello": (AppStatus.RUNNING, "1.0.0"), "other": (AppStatus.RUNNING, "1.0.0")}
    assert len(r1.built) == 2
    assert events.of("bstore.build.stop")

    # upgrade hello (new source commit and version): only hello is built and restarted
    (hello / "src" / "hello.erl").write_text(
        (hello / "src" / "hello.erl").read_text().replace('"hi"', '"hello again"'))
    commit_all(hello, "v2")
    specs.commit({"apps/hello/app.yaml": spec_text("hello", "1.1.0", hello.as_uri())})
    specs.push()
    r2 = rec.reconcile_once()
    assert r2.state is State.SYNCED, r2.to_json()
    assert r2.activation is not None
    moved = {a.app: a.kind.value for a in r2.activation.actions if a.kind.value != "keep"}
    assert moved == {"hello": "restart"}
    assert activator.current_state()["hello"].version == "1.1.0"

    # reconfigure other's env: no build, no restart, the node sees the new value
    specs.commit({"apps/other/app.yaml": spec_text("other", "1.0.0", other.as_uri(),
                                                   extra="env: {mode: fast}\n")})
    specs.push()
    r_env = rec.reconcile_once()
    assert r_env.state is State.SYNCED, r_env.to_json()
    assert r_env.built == ()
    assert r_env.activation is not None
    assert {a.app: a.kind.value for a in r_env.activation.actions
            if a.kind.value != "keep"} == {"other": "reconfigure"}
    with activator.node.client() as client:
        assert client.get_env_key("other", "mode") == b"fast"

    # a crashed app (stopped behind bstore's back) is started again by the next pass
    with activator.node.client() as client:
        client.app_stop("other")
    assert activator.current_state()["other"].status is AppStatus.STOPPED
    r3 = rec.reconcile_once()
    assert r3.state is State.SYNCED, r3.to_json()
    assert activator.current_state()["other"].status is AppStatus.RUNNING

    # a version whose health check cannot pass: rolled back, quarantined
    bad = spec_text("hello", "1.2.0", hello.as_uri(),
                    extra="health: {type: tcp, port: 1, timeout: 1500}\n")
    specs.commit({"apps/hello/app.yaml": bad})
    specs.push()
    r4 = rec.reconcile_once()
    assert r4.quarantined and r4.state is State.DEGRADED, r4.to_json()
    assert r4.activation is not None and r4.activation.rolled_back_to == status_gen(rec)
    assert activator.current_state()["hello"].version == "1.1.0"
    assert activator.current_state()["hello"].status is AppStatus.RUNNING
    status = read_status(rec.gitops_dir)
    assert status.quarantine is not None and "quarantined" in (status.error or "")
    assert status.apps["hello"].version == "1.1.0"
    assert status.apps["hello"].status is AppState.RUNNING
    r5 = rec.reconcile_once()
    assert r5.skipped == "quarantined"

    # remove other (and put hello back to its healthy spec, or the tip fails again)
    specs.commit({"apps/other/app.yaml": None,
                  "apps/hello/app.yaml": spec_text("hello", "1.1.0", hello.as_uri())})
    specs.push()
    r6 = rec.reconcile_once()
    assert r6.state is State.SYNCED, r6.to_json()
    assert r6.activation is not None
    assert {a.app: a.kind.value for a in r6.activation.actions
            if a.kind.value != "keep"} == {"other": "stop"}
    assert "other" not in activator.current_state()
    with activator.node.client() as client:
        assert "other" not in {a.name for a in client.which_applications()}
    assert set(read_status(rec.gitops_dir).apps) == {"hello"}
