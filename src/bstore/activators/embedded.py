"""The ``embedded`` activator: a profile's apps in one long-lived host BEAM node.

The host node (:class:`~bstore.activators.hostnode.HostNode`, one per profile under
``<root>/nodes/<profile>/``) is controlled through its agent. :meth:`boot` starts it from
the profile's current generation (code path = the generation's lib dirs, apps started in
dependency order), which is also what brings it back after a crash or a reboot
(:meth:`EmbeddedActivator.supervise_once`). :meth:`apply` carries out a plan's actions
(:mod:`bstore.activators.nodeops`): apps with ``isolation => vm`` are handed to a
:class:`~bstore.activators.vm.VmActivator` sharing the same state root, cookie and
cluster, so this one activator runs a whole generation.

``apps.sqlite`` next to the node's record lists the apps bstore started in it (so OTP
and library applications are never mistaken for strays; :mod:`bstore.activators.records`);
the same apps' outputs are GC roots (``gcroots/nodes/<profile>/host/<app>``,
:mod:`bstore.activators.gcroots`) until they leave the node or the node stops, so
``generations delete`` + GC never removes code a running node may still load. Options
(``ActivatorContext``):

=================  ===============================================================
``distribution``   ``on`` (default): the host node is ``bstore_<profile>@127.0.0.1``,
                   distribution on loopback, so guest VMs can join; ``off``: none
``node_name``      the host node's name instead of the default
``cookie``         the distribution cookie (else see :mod:`bstore.activators.cookie`)
``health_timeout`` seconds to wait for an app to become healthy after an action
                   (default: its health spec's timeout, 5 s without one)
``health_settle``  a healthy probe counts once another one this many seconds later
                   agrees (default 0.3: catches fast crash loops)
``restart_*``      VM supervision: ``restart_burst``, ``restart_window``,
                   ``restart_backoff`` (see :mod:`bstore.activators.vm`)
=================  ===============================================================
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from bstore.activators.agent_build import AGENT_SOURCE, compile_agent
from bstore.activators.agent_client import AgentClient, AgentError, AgentOpError
from bstore.activators.base import (
    Activator,
    ActivatorContext,
    ActivatorError,
    ApplyResult,
    HealthResult,
)
from bstore.activators.gcroots import PreparedRoot, RunningRoots
from bstore.activators.health import HealthSchedule, health_deadline, probe, settle_seconds
from bstore.activators.hostnode import HostNode, HostNodeStatus, NodeRecord
from bstore.activators.nodeops import (
    app_ebin,
    closure_ebins,
    describe_error,
    generation_ebins,
    load_new_code,
    reconfigure_app,
    reload_or_restart,
    run_actions,
    start_app,
    stop_app,
)
from bstore.activators.plan import Action, AppStatus, RunningState, plan
from bstore.activators.records import ManagedApp, ManagedRecords
from bstore.activators.vm import VmActivator, host_node_name, node_environment, runs_in_vm
from bstore.background import in_background
from bstore.errors import BstoreError
from bstore.generations.manifest import AppEntry, GenerationManifest, dependency_order
from bstore.specs.model import Isolation


def ensure_agent(root: Path) -> Path:
    """The agent's ``ebin`` under ``<root>/nodes/.agent/<source hash>/`` (compiled on first
    use; a changed agent source gets a new directory, so running nodes keep theirs)."""
    digest = blake3.blake3(AGENT_SOURCE.read_bytes()).hexdigest()[:16]
    out = root / "nodes" / ".agent" / digest
    ebin = out / "ebin"
    if not (ebin / "bstore_agent.beam").is_file():
        out.mkdir(parents=True, exist_ok=True)
        compile_agent(out)
    return ebin


def load_current_generation(root: Path, profile: str) -> GenerationManifest | None:
    """The manifest of ``profile``'s current generation, None when it has none (or when
    it is a failed first generation, which runs nothing: :mod:`bstore.generations.failed`)."""
    from bstore.generations.failed import failed_number
    from bstore.generations.generation import load_generation
    from bstore.generations.profiles import Profile
    from bstore.store.local import LocalStore

    if not (root / "db.sqlite").exists():
        return None
    with LocalStore.open(root, create=False) as store:
        prof = Profile(store, profile)
        current = prof.current()
        if current is None or failed_number(prof) == current.number:
            return None
        return load_generation(store, current.store_path)


@dataclass(frozen=True)
class BootResult:
    """What :meth:`EmbeddedActivator.boot` did: the node's status, the apps started, and
    the apps that failed to start (name → why)."""

    status: HostNodeStatus
    started: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)


class EmbeddedActivator(Activator):
    """Runs a generation: embedded apps in the profile's host node, vm apps in their own
    VMs (see the module docstring)."""

    name = "embedded"

    def __init__(self, context: ActivatorContext, *, agent_ebin: Path | None = None,
                 vms: VmActivator | None = None) -> None:
        super().__init__(context)
        self.store_dir = context.root / "store"
        self.node = HostNode(context.root, context.profile)
        self._agent_ebin = agent_ebin
        self.distributed = context.options.get("distribution", "on") != "off"
        self.node_name = host_node_name(context.profile, context.options) \
            if self.distributed else None
        self.vms = vms if vms is not None else VmActivator(
            context, agent_ebin=agent_ebin, host_node=self.node_name)
        self._old: GenerationManifest | None = None
        self._new: GenerationManifest | None = None
        self._client: AgentClient | None = None
        #: The connection current_state() asked the running apps through, kept for an
        #: apply() that follows in the same thread on the same node process: one
        #: connection per activation instead of two.
        self._spare: tuple[int, NodeRecord, AgentClient] | None = None
        #: Apps the agent just started in the host node (ensure_all_started answered ok):
        #: for an app without a health spec ("healthy = running") that answer is the
        #: first probe. Only the first: a settle probe still asks the node.
        self._started: set[str] = set()
        self._records = ManagedRecords(self.node.paths.directory / "apps.sqlite")
        #: GC roots of what the host node runs (see :mod:`bstore.activators.gcroots`);
        #: dropped whenever the node is found or made stopped.
        self.roots = RunningRoots(context.root, context.profile)
        self.node.on_stopped.append(lambda: self.roots.clear("host"))

    # ------------------------------------------------------------ the node

    @property
    def agent_ebin(self) -> Path:
        """The compiled agent (compiled on first use)."""
        if self._agent_ebin is None:
            self._agent_ebin = ensure_agent(self.context.root)
        return self._agent_ebin

    def _start_node(self, code_paths: Sequence[Path]) -> HostNodeStatus:
        env = node_environment(self.context, self.node.paths.directory / "home")
        return self.node.start(self.agent_ebin, code_paths, node_name=self.node_name, env=env)

    def boot(self, manifest: GenerationManifest | None = None) -> BootResult:
        """Start the host node from ``manifest`` (default: the profile's current generation)
        unless it runs: code path = its lib dirs, embedded apps started in dependency
        order, vm apps started in their VMs. Returns what started and what failed."""
        status = self.node.status()
        if status.running:
            return BootResult(status)
        if manifest is None:
            manifest = load_current_generation(self.context.root, self.context.profile)
        paths = [] if manifest is None else generation_ebins(
            self.store_dir, manifest, lambda e: not runs_in_vm(e))
        status = self._start_node(paths)
        started: list[str] = []
        failed: dict[str, str] = {}
        records: dict[str, ManagedApp] = {}
        if manifest is not None:
            with self.node.client() as client:
                for name in dependency_order(manifest):
                    entry = manifest.apps[name]
                    if any(d in failed for d in entry.depends_on):
                        failed[name] = "a dependency failed to start"
                        continue
                    try:
                        if runs_in_vm(entry):
                            # A guest that kept running while the host node was down
                            # keeps running; it rejoins the new host node's cluster.
                            self.vms.keep_or_start(entry, manifest)
                        else:
                            self.roots.set("host", name, str(entry.output))
                            start_app(client, [], entry)
                            records[name] = _managed(entry)
                        started.append(name)
                    except (BstoreError, OSError) as exc:
                        failed[name] = describe_error(exc)
        self._write_records(records)
        return BootResult(status, tuple(started), failed)

    def _write_records(self, records: Mapping[str, ManagedApp]) -> None:
        """Record what runs in the host node, and root exactly that in the store."""
        self._records.write(records)
        self.roots.sync("host", {n: r.output for n, r in records.items()})

    def shutdown(self) -> str:
        """Stop every VM of the profile, then the host node (how it ended)."""
        self._drop_spare()
        self.vms.stop_all()
        return self.node.stop()

    def supervise_once(self) -> list[str]:
        """Bring a host node that died back in the active generation, and restart dead VMs
        (with backoff, see :class:`~bstore.activators.vm_supervisor.Supervisor`). Returns
        what it did."""
        done: list[str] = []
        record = self.node.read_record()
        if record is not None and not self.node.status().running:
            result = self.boot()
            done.append(f"host node restarted ({len(result.started)} app(s) started"
                        + (f", failed: {dict(result.failed)}" if result.failed else "") + ")")
        done.extend(self.vms.supervisor().poll())
        return done

    def health_round(self, schedule: HealthSchedule, now: float | None = None
                     ) -> list[HealthResult]:
        """The periodic checks (every ``interval`` of each app's health spec): watch the
        current generation's apps in ``schedule``, check those due, record the results.
        The long-lived process calls this in its loop; :meth:`HealthSchedule.unhealthy`
        then says which apps to act on."""
        at = time.monotonic() if now is None else now
        manifest = self._new or load_current_generation(self.context.root,
                                                        self.context.profile)
        apps = {} if manifest is None else manifest.apps
        for name in list(schedule.intervals):
            if name not in apps:
                schedule.forget(name)
        for name, entry in apps.items():
            if name not in schedule.intervals:
                schedule.watch(name, entry.health, at)
        results = []
        for name in schedule.due(at):
            result = self.health(name)
            schedule.record(result, at)
            results.append(result)
        return results

    @contextlib.contextmanager
    def _connected(self) -> Iterator[AgentClient]:
        if not self.node.is_running():
            self._start_node([])
        with self._take_spare() or self.node.client() as client:
            self._client = client
            try:
                yield client
            finally:
                self._client = None

    def _query_client(self) -> AgentClient:
        """The connection for a question to the host node: apply()'s while it runs, else
        a new one, kept as the spare for the next apply()."""
        if self._client is not None:
            return self._client
        self._drop_spare()
        record = self.node.read_record()
        client = self.node.client(10.0)
        if record is not None:
            self._spare = (threading.get_ident(), record, client)
        return client

    def _take_spare(self) -> AgentClient | None:
        """The spare connection, if it was opened by this thread to the node that runs."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        thread, record, client = spare
        if thread == threading.get_ident() and record == self.node.read_record():
            client.timeout = 30.0
            return client
        client.close()
        return None

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare[2].close()

    def _host(self) -> AgentClient:
        if self._client is None:
            raise ActivatorError("the host node is not connected (apply() connects it)")
        return self._client

    # ------------------------------------------------------------ Activator

    def plan(self, old: GenerationManifest | None, new: GenerationManifest) -> list[Action]:
        """The actions from ``old`` to ``new`` against what runs now; remembers both for
        :meth:`apply`."""
        self._old, self._new = old, new
        return plan(old, new, self.current_state())

    def apply(self, actions: Sequence[Action]) -> ApplyResult:
        """Carry out ``actions`` (from :meth:`plan`) and check each changed app's health."""
        if self._new is None:
            raise ActivatorError("apply() without plan(): the activator needs the target"
                                 " generation", hint="call plan(old, new) first")
        new = self._new
        self._started.clear()
        needs_host = any(not self._old_in_vm(a) or (a.app in new.apps
                                                    and not runs_in_vm(new.apps[a.app]))
                         for a in actions)
        if not needs_host:
            result = run_actions(self, actions, self._new, self._deadline, self.context.echo,
                                 settle=self._settle)
        else:
            with self._connected():
                result = run_actions(self, actions, self._new, self._deadline,
                                     self.context.echo, settle=self._settle)
        self._stop_stray_vms(new)
        return result

    def _stop_stray_vms(self, new: GenerationManifest) -> None:
        """After any apply, no VM runs an app the generation does not run in a VM.

        The plan stops what it sees running; a crash-looping guest caught between two
        restarts looks stopped, so its VM would outlive a rollback that never planned
        its stop. Stopping an already stopped VM is a no-op.
        """
        wanted = {name for name, entry in new.apps.items() if runs_in_vm(entry)}
        for app in self.vms.known_apps():
            if app not in wanted:
                self.vms.stop_vm(app)

    def current_state(self) -> Mapping[str, RunningState]:
        """Every app bstore started here (host node and VMs), with what is observed."""
        records = self._records.read()
        states: dict[str, RunningState] = {}
        running: dict[str, str] | None = None
        if records and self.node.is_running():
            try:
                running = self._query_client().running_versions()
            except AgentError:
                self._drop_spare()
                running = None
        for name, rec in records.items():
            if running is None:
                states[name] = RunningState(name, AppStatus.STOPPED, rec.version,
                                            output=rec.output, reason="host node not running")
            elif name in running:
                states[name] = RunningState(name, AppStatus.RUNNING, running[name],
                                            output=rec.output)
            else:
                states[name] = RunningState(name, AppStatus.STOPPED, rec.version,
                                            output=rec.output,
                                            reason="not running in the host node")
        states.update(self.vms.current_state())
        return states

    def health(self, app: str) -> HealthResult:
        """Check ``app`` now, as its health spec says (running, without one)."""
        manifest = self._new or load_current_generation(self.context.root,
                                                        self.context.profile)
        entry = manifest.apps.get(app) if manifest is not None else None
        if entry is None:
            return HealthResult(app, False, "not in the current generation")
        if runs_in_vm(entry):
            return self.vms.health_of(entry)
        if not self.node.is_running():
            return HealthResult(app, False, "host node not running")
        with self.node.client(10.0) as client:
            return probe(app, entry.health, client)

    # ------------------------------------------------------------ nodeops.Target

    @property
    def _settle(self) -> float:
        return settle_seconds(self.context.options)

    def _deadline(self, entry: AppEntry) -> float:
        return health_deadline(self.context.options, entry)

    def probe(self, entry: AppEntry) -> HealthResult:
        """One health check of ``entry`` (in its node)."""
        if runs_in_vm(entry):
            return self.vms.probe(entry)
        if entry.health is None and entry.name in self._started:
            self._started.discard(entry.name)
            return HealthResult(entry.name, True,
                                f"application started (version {entry.version})")
        return probe(entry.name, entry.health, self._host())

    def _now_runs(self, entry: AppEntry) -> None:
        """``entry`` was started in the host node: record it (and root its output)."""
        self._record(entry, entry.name)
        self._started.add(entry.name)

    def _record(self, entry: AppEntry | None, name: str) -> None:
        """Record that ``name`` runs ``entry`` now (None: runs no more), and root that."""
        if entry is None:
            self._records.update(name, None)
            self.roots.remove("host", name)
        else:
            self.roots.set("host", name, str(entry.output))
            self._records.update(name, _managed(entry))

    def _old_ebin(self, app: str) -> Path | None:
        rec = self._records.get(app)
        if rec is None:
            return None
        return self.store_dir / rec.output / "lib" / f"{app}-{rec.version}" / "ebin"

    def _old_in_vm(self, action: Action) -> bool:
        """Whether the app of ``action`` ran in a VM before it (isolation vm or a release)."""
        old = self._old.apps.get(action.app) if self._old is not None else None
        if old is not None:
            return runs_in_vm(old)
        if (action.old_isolation or action.isolation) is Isolation.VM:
            return True
        return action.app in self.vms.known_apps()

    def do_start(self, entry: AppEntry) -> str:
        """Start ``entry`` in the host node (or its VM)."""
        if runs_in_vm(entry):
            return self.vms.do_start(entry, self._new)
        client = self._host()
        self.roots.set("host", entry.name, str(entry.output))
        ebins = closure_ebins(self.store_dir, self._new, entry)
        if entry.name in {a.name for a in client.loaded_applications()}:
            # A build of the app that stopped or crashed on its own is still loaded (its
            # spec, env and modules): start would run that one again. Clear it first.
            stop_app(client, entry.name, self._old_ebin(entry.name))
            for d in reversed(ebins):
                client.add_patha(d)
            load_new_code(client, app_ebin(self.store_dir, entry), entry)
            start_app(client, [], entry)
        else:
            start_app(client, ebins, entry)
        self._now_runs(entry)
        return "started"

    def do_stop(self, action: Action) -> str:
        """Stop the app on the side it ran on."""
        if self._old_in_vm(action):
            return self.vms.do_stop(action)
        stop_app(self._host(), action.app, self._old_ebin(action.app))
        self._record(None, action.app)
        return "stopped"

    def do_restart(self, action: Action, entry: AppEntry) -> str:
        """Stop the old side, start the new one (loading the new modules over the old)."""
        old_vm = self._old_in_vm(action)
        changed = self._changed_since_record(action.app, entry)
        if not old_vm and not runs_in_vm(entry):
            done = self._restart_in_host(action, entry, changed)
            if done is not None:
                return done
        if old_vm:
            self.vms.do_stop(action)
        else:
            stop_app(self._host(), action.app, self._old_ebin(action.app))
        if runs_in_vm(entry):
            if not old_vm:
                self._record(None, action.app)
            return "restarted: " + self.vms.do_start(entry, self._new)
        # The record keeps naming the old build until the new one started: a kill in
        # between leaves a stopped app the next plan starts again (drift).
        client = self._host()
        self.roots.set("host", entry.name, str(entry.output))
        ebins = closure_ebins(self.store_dir, self._new, entry)
        for d in reversed(ebins):
            client.add_patha(d)
        load_new_code(client, app_ebin(self.store_dir, entry), entry, changed)
        start_app(client, [], entry)
        self._now_runs(entry)
        return "restarted"

    def _restart_in_host(self, action: Action, entry: AppEntry,
                         changed: list[str] | None) -> str | None:
        """Host node to host node: the whole restart is one agent request. None (nothing
        done) when the node's agent predates that request: the steps then go one by one."""
        rec = self._records.get(action.app)
        old_ebin = None if rec is None else \
            self.store_dir / rec.output / "lib" / f"{action.app}-{rec.version}" / "ebin"
        ebins = closure_ebins(self.store_dir, self._new, entry)
        # The host root moves to the new output once the stop worked (as with the separate
        # steps): a failed stop leaves the old code rooted. Meanwhile the new output is
        # rooted by the generation the profile now names. Its link is written while the
        # node works, and renamed into place after.
        staged = in_background(functools.partial(self.roots.prepare, "host", entry.name,
                                                 str(entry.output)))
        try:
            self._host().restart_app(action.app, old_ebin, ebins, {
                m: ebins[0] / f"{m}.beam"
                for m in (entry.modules if changed is None else changed)},
                {k.name: v for k, v in entry.env.items()})
        except AgentOpError as exc:
            unsupported = exc.op == "restart_app" and exc.unsupported
            _settle_root(staged, commit=not unsupported and exc.op not in (
                "app_stop", "app_unload", "del_path"))
            if unsupported:
                return None
            raise
        except BaseException:
            _settle_root(staged, commit=False)
            raise
        prepared = staged.result()
        if prepared is not None:
            prepared.commit()
        self._now_runs(entry)
        return "restarted"

    def _changed_since_record(self, app: str, entry: AppEntry) -> list[str] | None:
        """The modules of ``entry`` whose code differs from the build the host node runs
        (None: load them all). Known only when the record names the old generation's
        build of ``app``: then the loaded code is that build's, module by module."""
        old = self._old.apps.get(app) if self._old is not None else None
        rec = self._records.get(app)
        if old is None or rec is None or rec.output != str(old.output) or runs_in_vm(old):
            return None
        return [m for m, digest in entry.modules.items() if old.modules.get(m) != digest]

    def do_reload(self, action: Action, entry: AppEntry) -> str:
        """Reload the changed modules in place (restart if that fails)."""
        if runs_in_vm(entry):
            return self.vms.do_reload(action, entry)
        # The root moves only once the reload worked (_record): an aborted reload leaves
        # the old code running, and it stays rooted.
        detail = reload_or_restart(self._host(), self.store_dir, action, entry,
                                   self._old_ebin(action.app),
                                   lambda: self.do_restart(action, entry))
        self._record(entry, entry.name)
        return detail

    def do_reconfigure(self, action: Action, entry: AppEntry) -> str:
        """Change the app's env in place and run its ``config_change/3``."""
        if runs_in_vm(entry):
            return self.vms.do_reconfigure(action, entry)
        reconfigure_app(self._host(), action)
        return "reconfigured"


def _managed(entry: AppEntry) -> ManagedApp:
    return ManagedApp(entry.name, entry.version, str(entry.output), entry.isolation)


def _settle_root(staged: Future[PreparedRoot | None], *, commit: bool) -> None:
    """After a failed restart: make the prepared root the app's root (the old code was
    stopped) or drop it. A root that could not be written is left to the next activation:
    the failure being reported matters more."""
    with contextlib.suppress(BstoreError):
        prepared = staged.result()
        if prepared is not None:
            if commit:
                prepared.commit()
            else:
                prepared.discard()
