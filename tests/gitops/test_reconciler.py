"""Reconcile passes against real git repos (file:// upstreams), a real store and the
dry-run activator: every action type, bad input from the repo, drift healing, health
failure with rollback and quarantine, the lock, and manual operations."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from recohelpers import World, app_files, kinds, spec_yaml

from bstore.generations.generation import load_generation
from bstore.generations.profiles import Profile
from bstore.gitops.config import ConfigError, load_config
from bstore.gitops.desired import DesiredStateError, check_apps_dir
from bstore.gitops.reconciler import QUARANTINE_FILE, ReconcileBusy, ReconcileError
from bstore.gitops.status import AppState, State, read_status
from bstore.specs.model import AppSpec, IconSpec, SourceSpec, SourceType
from bstore.store.local import LocalStore


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def _generation(world: World) -> tuple[int | None, object]:
    with LocalStore.open(world.root) as store:
        current = Profile(store, "p").current()
        if current is None:
            return None, None
        return current.number, load_generation(store, current.store_path)


def test_deploy_upgrade_reconfigure_remove_end_to_end(world: World) -> None:
    c1 = world.push(app_files(web=spec_yaml("web", env={"port": 8080}),
                              db=spec_yaml("db"), api=spec_yaml("api", depends_on=["db"])))
    r1 = world.reconciler.reconcile_once()
    assert r1.state is State.SYNCED, r1.to_json()
    assert r1.commit == c1 and r1.activation is not None
    assert sorted(kinds(r1.activation.actions)) == [("start", "api"), ("start", "db"),
                                                    ("start", "web")]
    order = [a.app for a in r1.activation.actions]
    assert order.index("db") < order.index("api")
    assert world.versions() == {"web": "1.0.0", "db": "1.0.0", "api": "1.0.0"}
    number, manifest = _generation(world)
    assert number == 1 and manifest.commit == c1  # type: ignore[attr-defined]
    assert [e.metadata["app"] for e in world.recorder.of("bstore.deploy.stop")] == \
        ["db", "api", "web"]

    # upgrade: only web is built and restarted
    world.builder.built.clear()
    world.push(app_files(web=spec_yaml("web", "1.1.0", env={"port": 8080})))
    r2 = world.reconciler.reconcile_once()
    assert r2.state is State.SYNCED
    assert world.builder.built == ["web-1.1.0"]
    assert kinds(r2.activation.actions) == [("restart", "web")]  # type: ignore[union-attr]
    up = world.recorder.of("bstore.upgrade.start")
    assert [(e.metadata["from_version"], e.metadata["to_version"]) for e in up] == \
        [("1.0.0", "1.1.0")]

    # reconfigure env: nothing is built, no restart
    world.builder.built.clear()
    world.push(app_files(web=spec_yaml("web", "1.1.0", env={"port": 9090})))
    r3 = world.reconciler.reconcile_once()
    assert world.builder.built == []
    assert kinds(r3.activation.actions) == [("reconfigure", "web")]  # type: ignore[union-attr]
    assert world.recorder.of("bstore.reconfigure.stop")[-1].metadata["result"] == "ok"

    # remove: api goes, the others stay
    world.push(app_files(api=None))
    r4 = world.reconciler.reconcile_once()
    assert kinds(r4.activation.actions) == [("stop", "api")]  # type: ignore[union-attr]
    assert set(world.versions()) == {"web", "db"}
    status = read_status(world.reconciler.gitops_dir)
    assert status.state is State.SYNCED and status.app_count == 2
    assert status.healthy_count == 2 and status.generation == 4
    assert status.apps["web"].version == "1.1.0"
    assert status.apps["web"].store_path is not None
    assert status.apps["web"].store_path.endswith("-web-1.1.0")
    assert "bstore.remove.stop" in world.recorder.names()


def test_a_pass_without_a_new_commit_parses_and_builds_nothing(world: World) -> None:
    world.push(app_files(**{f"a{i}": spec_yaml(f"a{i}") for i in range(5)}))
    world.reconciler.reconcile_once()
    parsed = world.reconciler._memo.specs.parsed
    built = list(world.builder.built)
    for _ in range(2):
        r = world.reconciler.reconcile_once()
        assert r.skipped == "no change" and r.state is State.SYNCED
    assert world.reconciler._memo.specs.parsed == parsed == 5
    assert world.builder.built == built
    assert _generation(world)[0] == 1
    # one changed spec: only that directory is parsed again, only that app built
    world.push(app_files(a3=spec_yaml("a3", "2.0.0")))
    world.builder.built.clear()
    world.reconciler.reconcile_once()
    assert world.reconciler._memo.specs.parsed == 6
    assert world.builder.built == ["a3-2.0.0"]


def test_force_push_is_followed_when_history_rewrite_is_allowed(tmp_path: Path) -> None:
    world = World(tmp_path, allow_history_rewrite=True)
    world.push(app_files(web=spec_yaml("web", "1.0.0")))
    world.reconciler.reconcile_once()
    world.remote.git("commit", "-q", "--amend", "-m", "rewritten", "--allow-empty")
    world.remote.write(app_files(web=spec_yaml("web", "3.0.0")))
    world.remote.git("add", "-A")
    world.remote.git("commit", "-q", "--amend", "-m", "rewritten")
    world.remote.push(force=True)
    r = world.reconciler.reconcile_once()
    assert r.state is State.SYNCED, r.error
    assert r.commit == world.remote.head()
    assert world.versions() == {"web": "3.0.0"}


def test_tip_not_descending_from_the_applied_commit_is_refused(world: World) -> None:
    world.push(app_files(web=spec_yaml("web", "1.0.0")))
    world.reconciler.reconcile_once()
    world.remote.git("checkout", "-q", "--orphan", "other")
    world.remote.git("rm", "-rfq", ".")
    world.remote.commit(app_files(web=spec_yaml("web", "0.1.0")), "old state")
    world.remote.git("push", "-q", "--force", "origin", "other:main")
    r = world.reconciler.reconcile_once()
    assert r.state is State.ERROR
    assert "does not descend from the last applied commit" in (r.error or "")
    assert world.versions() == {"web": "1.0.0"}
    assert _generation(world)[0] == 1
    status = read_status(world.reconciler.gitops_dir)
    assert status.state is State.ERROR and "does not descend" in (status.error or "")
    assert status.apps["web"].version == "1.0.0"  # the apps are still shown


def test_unsigned_tip_is_refused_under_the_signing_policy(tmp_path: Path) -> None:
    signers = tmp_path / "allowed_signers"
    signers.write_text('ops@example.org namespaces="git" ssh-ed25519 '
                       "AAAAC3NzaC1lZDI1NTE5AAAAIBmWq3nR0Wb3cNfnvZfJ1tC8I8m6T6c4mCqQ6k0Z2y9a\n")
    world = World(tmp_path, require_signed_commits=True, allowed_signers=signers)
    world.push(app_files(web=spec_yaml("web")))
    r = world.reconciler.reconcile_once()
    assert r.state is State.ERROR
    assert "refusing commit" in (r.error or "") and "sign" in (r.error or "")
    assert world.versions() == {}
    assert _generation(world)[0] is None
    assert "bstore.reconcile.error" in world.recorder.names()


def test_unreachable_remote_reports_error_and_leaves_apps_running(world: World) -> None:
    world.push(app_files(web=spec_yaml("web")))
    world.reconciler.reconcile_once()
    shutil.rmtree(world.remote.upstream)
    r = world.reconciler.reconcile_once()
    assert r.state is State.ERROR
    assert "cannot sync" in (r.error or "") and "keeping the checkout" in (r.error or "")
    assert world.versions() == {"web": "1.0.0"}
    status = read_status(world.reconciler.gitops_dir)
    assert status.state is State.ERROR and status.apps["web"].status is AppState.RUNNING
    error = world.recorder.of("bstore.reconcile.error")
    assert error and "cannot sync" in error[-1].metadata["error"]


def test_bad_spec_fails_only_that_app(world: World) -> None:
    world.push(app_files(good=spec_yaml("good"), other=spec_yaml("other", "1.0.0"),
                         broken="name: broken\nversion: [\n"))
    r = world.reconciler.reconcile_once()
    assert r.state is State.DEGRADED
    assert set(world.versions()) == {"good", "other"}
    status = read_status(world.reconciler.gitops_dir)
    assert status.apps["broken"].status is AppState.FAILED
    # named by its path in the repository, not where the checkout lives
    assert (status.apps["broken"].last_error or "").startswith("apps/broken/app.yaml:")
    # an app that ran keeps its previous version when its spec breaks
    world.push(app_files(other="name: other\nversion: '2.0.0'\nisolation: sideways\n",
                         good=spec_yaml("good", "1.1.0")))
    r2 = world.reconciler.reconcile_once()
    assert r2.state is State.DEGRADED
    assert world.versions() == {"good": "1.1.0", "other": "1.0.0"}
    _, manifest = _generation(world)
    assert manifest.apps["other"].version == "1.0.0"  # type: ignore[attr-defined]
    status = read_status(world.reconciler.gitops_dir)
    assert status.apps["other"].version == "1.0.0"
    assert "isolation" in (status.apps["other"].last_error or "")


def test_cycle_in_depends_on_fails_the_cycle_only(world: World) -> None:
    world.push(app_files(a=spec_yaml("a", depends_on=["b"]), b=spec_yaml("b", depends_on=["a"]),
                         c=spec_yaml("c")))
    r = world.reconciler.reconcile_once()
    assert r.state is State.DEGRADED
    assert set(world.versions()) == {"c"}
    status = read_status(world.reconciler.gitops_dir)
    for name in ("a", "b"):
        error = status.apps[name].last_error or ""
        assert "dependency cycle" in error and error.startswith(f"apps/{name}/app.yaml")


def test_symlink_escaping_the_checkout_is_rejected(world: World) -> None:
    world.push(app_files(web=spec_yaml("web")))
    world.reconciler.reconcile_once()
    world.remote.symlink("apps/evil/app.yaml", "/etc/passwd")
    world.remote.push()
    r = world.reconciler.reconcile_once()
    assert r.state is State.ERROR
    assert "evil/app.yaml" in (r.error or "")
    assert world.versions() == {"web": "1.0.0"}


@pytest.mark.parametrize("name, expected", [
    (b"..", "'..'"),
    (b"../escape", "escape"),
    (b"/abs", "abs"),
    (b"apps/../../x", "apps/../../x"),
])
def test_tree_entry_path_tricks_are_refused(world: World, name: bytes, expected: str) -> None:
    world.push(app_files(web=spec_yaml("web")))
    world.reconciler.reconcile_once()
    world.remote.commit_raw_tree([(0o100644, name, b"name: x\nversion: '1'\n")], "tricks")
    r = world.reconciler.reconcile_once()
    assert r.state is State.ERROR, r.to_json()
    assert r.error and expected in r.error
    assert world.versions() == {"web": "1.0.0"}


@pytest.mark.parametrize("apps_dir, message", [
    ("../outside", "relative path inside the repository"),
    ("/etc", "relative path inside the repository"),
    ("apps/../..", "relative path inside the repository"),
    ("apps\0x", "NUL"),
])
def test_apps_dir_path_tricks_are_refused(tmp_path: Path, apps_dir: str, message: str) -> None:
    # The configuration refuses them before anything runs ...
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"repo_url": (tmp_path / "r.git").as_uri(),
                                       "apps_dir": apps_dir})
    assert "apps_dir" in info.value.message
    # ... and the desired-state reader refuses them again (defence in depth).
    with pytest.raises(DesiredStateError) as again:
        check_apps_dir(apps_dir)
    assert message in again.value.message and repr(apps_dir) in again.value.message


def test_crashed_app_is_healed_on_the_next_pass(world: World) -> None:
    world.push(app_files(web=spec_yaml("web"), db=spec_yaml("db")))
    world.reconciler.reconcile_once()
    world.activator.crash("db")
    r = world.reconciler.reconcile_once()
    assert r.activation is not None
    # the activation plan starts the crashed app again (drift), nothing else moves
    assert kinds(r.activation.actions) == [("start", "db")]
    assert r.plan is not None and r.plan.by_name["db"].kind.value == "heal"
    assert any("drift" in why for why in r.plan.by_name["db"].reasons)
    assert world.versions() == {"web": "1.0.0", "db": "1.0.0"}
    assert r.state is State.SYNCED and _generation(world)[0] == 1


def test_health_failure_rolls_back_and_quarantines_until_the_tip_changes(world: World) -> None:
    world.push(app_files(web=spec_yaml("web", health_timeout=300), db=spec_yaml("db")))
    world.reconciler.reconcile_once()
    world.activator.unhealthy.add("web")
    bad = world.push(app_files(web=spec_yaml("web", "2.0.0", health_timeout=300)))
    r = world.reconciler.reconcile_once()
    assert r.state is State.DEGRADED and r.quarantined
    assert r.activation is not None and r.activation.rolled_back_to == 1
    assert "web" in r.activation.failed and "HTTP 500" in r.activation.failed["web"]
    assert world.versions() == {"web": "1.0.0", "db": "1.0.0"}
    assert _generation(world)[0] == 1
    q = json.loads((world.reconciler.gitops_dir / QUARANTINE_FILE).read_text())
    assert q["commit"] == bad and "not healthy in time" in q["reason"]
    assert world.recorder.of("bstore.rollback.stop")
    status = read_status(world.reconciler.gitops_dir)
    assert status.state is State.DEGRADED and "quarantined" in (status.error or "")
    assert status.quarantine is not None and status.quarantine["commit"] == bad
    # same tip: not retried
    world.builder.built.clear()
    world.recorder.clear()
    r2 = world.reconciler.reconcile_once()
    assert r2.skipped == "quarantined" and world.builder.built == []
    assert not world.recorder.of("bstore.upgrade.start")
    # a new tip is tried (and here succeeds), clearing the quarantine
    world.activator.unhealthy.clear()
    world.push(app_files(web=spec_yaml("web", "2.0.1", health_timeout=300)))
    r3 = world.reconciler.reconcile_once()
    assert r3.state is State.SYNCED and not r3.quarantined
    assert not (world.reconciler.gitops_dir / QUARANTINE_FILE).exists()
    assert world.versions()["web"] == "2.0.1"


def test_failed_build_keeps_the_previous_entry(world: World) -> None:
    world.push(app_files(web=spec_yaml("web"), db=spec_yaml("db")))
    world.reconciler.reconcile_once()
    world.builder.fail.add("web")
    world.push(app_files(web=spec_yaml("web", "2.0.0"), db=spec_yaml("db", "1.1.0")))
    r = world.reconciler.reconcile_once()
    assert r.state is State.DEGRADED
    assert world.versions() == {"web": "1.0.0", "db": "1.1.0"}
    status = read_status(world.reconciler.gitops_dir)
    assert "compile error in web" in (status.apps["web"].last_error or "")


def test_manual_reconcile_during_a_timed_one_waits_or_is_refused(world: World) -> None:
    world.push(app_files(web=spec_yaml("web")))
    gate = threading.Event()
    world.builder.gate = gate
    results: dict[str, object] = {}

    def timed() -> None:
        results["timed"] = world.reconciler.reconcile_once(trigger="timer")

    t = threading.Thread(target=timed)
    t.start()
    assert world.builder.entered.wait(30)
    other = world.make()  # a second reconciler (like the CLI) in the same process
    with pytest.raises(ReconcileBusy, match="reconcile already running for profile 'p'"):
        other.reconcile_once(wait=False)

    def manual() -> None:
        results["manual"] = other.reconcile_once()

    m = threading.Thread(target=manual)
    m.start()
    m.join(0.3)
    assert m.is_alive()  # waiting for the lock, not running alongside
    gate.set()
    t.join(60)
    m.join(60)
    assert results["timed"].state is State.SYNCED  # type: ignore[attr-defined]
    assert results["manual"].skipped == "no change"  # type: ignore[attr-defined]
    assert _generation(world)[0] == 1


def test_deploy_then_reconcile_reverts_it(world: World) -> None:
    world.push(app_files(web=spec_yaml("web", "1.0.0")))
    world.reconciler.reconcile_once()
    manual = AppSpec(name="web", version="9.9.9", source=SourceSpec(SourceType.HEX, ref="9.9.9"),
                     icon=IconSpec.identicon("web"))
    result = world.reconciler.deploy(manual)
    assert result.ok and world.versions() == {"web": "9.9.9"}
    status = read_status(world.reconciler.gitops_dir)
    assert "the next reconcile reverts it" in (status.apps["web"].note or "")
    assert world.recorder.of("bstore.deploy.stop")[-1].metadata["manual"] is True
    r = world.reconciler.reconcile_once()
    assert r.state is State.SYNCED and world.versions() == {"web": "1.0.0"}
    status = read_status(world.reconciler.gitops_dir)
    assert "reverted by reconcile" in (status.apps["web"].note or "")
    assert any("reverted to the repository" in n for n in status.notes)


def test_manual_upgrade_and_remove(world: World) -> None:
    world.push(app_files(web=spec_yaml("web", "1.0.0"), db=spec_yaml("db")))
    world.reconciler.reconcile_once()
    up = world.reconciler.upgrade("web", "1.2.0")
    assert up.ok and world.versions()["web"] == "1.2.0"
    assert world.builder.built[-1] == "web-1.2.0"
    _, manifest = _generation(world)
    assert manifest.apps["web"].source.ref == "1.2.0"  # type: ignore[attr-defined]
    gone = world.reconciler.remove("db")
    assert gone.ok and set(world.versions()) == {"web"}
    with pytest.raises(ReconcileError, match="app 'nope' is not deployed in profile 'p'"):
        world.reconciler.remove("nope")
    with pytest.raises(ReconcileError, match="app 'nope' is not deployed"):
        world.reconciler.upgrade("nope", "1.0")
    r = world.reconciler.reconcile_once()
    assert world.versions() == {"web": "1.0.0", "db": "1.0.0"} and r.state is State.SYNCED


def test_plan_shows_actions_without_applying(world: World) -> None:
    world.push(app_files(web=spec_yaml("web"), db=spec_yaml("db")))
    world.reconciler.reconcile_once()
    world.push(app_files(web=spec_yaml("web", "2.0.0"), db=spec_yaml("db", env={"k": 1}),
                         new=spec_yaml("new")))
    plan = world.reconciler.plan()
    by = plan.by_name
    assert (by["web"].kind.value, by["db"].kind.value, by["new"].kind.value) == \
        ("upgrade", "reconfigure", "deploy")
    assert plan.to_build == ["new", "web"] or sorted(plan.to_build) == ["new", "web"]
    assert world.versions() == {"web": "1.0.0", "db": "1.0.0"}
    assert "would restart: " in plan.render()


def test_status_shows_upgrading_and_starting_during_activation(world: World) -> None:
    world.push(app_files(web=spec_yaml("web")))
    world.reconciler.reconcile_once()
    seen = []
    world.activator.during_apply = lambda: seen.append(read_status(world.reconciler.gitops_dir))
    world.push(app_files(web=spec_yaml("web", "2.0.0"), new=spec_yaml("new")))
    world.reconciler.reconcile_once()
    during = seen[0]
    assert during.apps["web"].status is AppState.UPGRADING
    assert during.apps["web"].note == "upgrading to 2.0.0"
    assert during.apps["new"].status is AppState.STARTING
    after = read_status(world.reconciler.gitops_dir)
    assert after.apps["web"].status is AppState.RUNNING and after.apps["web"].note is None


def test_first_generation_failing_is_quarantined_then_a_fix_applies(world: World) -> None:
    world.activator.unhealthy.add("web")
    bad = world.push(app_files(web=spec_yaml("web", health_timeout=200)))
    r = world.reconciler.reconcile_once()
    assert r.quarantined and r.state is State.DEGRADED
    assert world.versions() == {}  # the rollback stopped what the attempt started
    q = json.loads((world.reconciler.gitops_dir / QUARANTINE_FILE).read_text())
    assert q["commit"] == bad and q["rolled_back_to"] is None
    world.activator.unhealthy.clear()
    world.push(app_files(web=spec_yaml("web", "1.0.1", health_timeout=200)))
    r2 = world.reconciler.reconcile_once()
    assert r2.state is State.SYNCED, r2.to_json()
    assert world.versions() == {"web": "1.0.1"}


def test_a_pass_emits_the_seed_telemetry_in_order(world: World) -> None:
    world.push(app_files(web=spec_yaml("web", health_timeout=500)))
    world.reconciler.reconcile_once(trigger="timer")
    names = world.recorder.names()
    expected = ["bstore.reconcile.start", "bstore.git.clone_start", "bstore.git.clone_stop",
                "bstore.git.pull", "bstore.build.start", "bstore.build.stop",
                "bstore.deploy.start", "bstore.health.check", "bstore.deploy.stop",
                "bstore.reconcile.stop"]
    assert [n for n in names if n in expected] == expected
    stop = world.recorder.of("bstore.reconcile.stop")[0]
    assert stop.metadata["status"] == "synced" and stop.metadata["trigger"] == "timer"
    assert stop.measurements["duration"] > 0
    check = world.recorder.of("bstore.health.check")[0]
    assert check.metadata["app"] == "web" and check.metadata["result"] == "healthy"


def test_an_os_error_mid_pass_is_reported_not_raised(world: World) -> None:
    import errno

    world.push(app_files(web=spec_yaml("web")))
    world.reconciler.reconcile_once()

    def full(_store: object) -> object:
        def build(_specs: object) -> object:
            raise OSError(errno.ENOSPC, "No space left on device", "/state/store")
        return build

    broken = world.make()
    broken._builder = full  # type: ignore[assignment]
    world.push(app_files(web=spec_yaml("web", "2.0.0")))
    r = broken.reconcile_once()
    assert r.state is State.ERROR
    assert "No space left on device (/state/store)" in (r.error or "")
    assert world.versions() == {"web": "1.0.0"}
    assert world.recorder.of("bstore.reconcile.error")
