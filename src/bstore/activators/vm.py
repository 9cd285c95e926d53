"""The ``vm`` activator: one BEAM VM per ``isolation => vm`` app, supervised.

Each VM lives under ``<root>/nodes/<profile>/vms/<app>/``::

    agent.sock  node.json  node.log  lock     as for the host node (hostnode.py)
    home/.erlang.cookie                       the cookie (0400) in the VM's private HOME
    app.json                                  a one-app manifest: what to (re)start
    vm.json                                   supervision state (crashes, failed, cluster)
    erl_crash.dump                            written by the VM when it dies on its own

The VM is ``erl`` with node name ``<prefix><app>@127.0.0.1`` (prefix: ``vm_config``'s
``node_prefix``, default ``bstore_<profile>_``), distribution on loopback only
(``inet_dist_use_interface``, epmd via ``ERL_EPMD_ADDRESS=127.0.0.1``), ``+S`` from
``scheduler_limit``, and a memory limit from ``memory_limit``: cgroup v2 ``memory.max``
where usable (:mod:`.cgroups`), else the allocators' fixed super carrier
(``+MMscs <MB> +MMsco true +Musac false``: every allocation must fit in it, so the VM
dies with "Cannot allocate" instead of growing). ``extra_args`` are separate argv items.
The cookie is never on a command line (:mod:`.cookie`). When the profile's host node is
distributed, the VM connects to it at boot (``sync_nodes_optional``) and so joins its
cluster; :meth:`VmActivator.current_state` reports whether it is connected. The kernel
connects only at boot, so a guest that outlives a restart of the host node is asked to
reconnect (the agent's ``connect_node``) by the supervisor's poll and by the host's boot.
While a VM runs, its app's output is a GC root (``gcroots/nodes/<profile>/vm/<app>``).

A VM that dies is restarted by :class:`~bstore.activators.vm_supervisor.Supervisor` with
exponential backoff; after more than ``burst`` crashes within ``window`` seconds the app
is ``failed`` with the reason of the last death: ``oom`` when the cgroup's OOM counter or
the VM itself says so, else the exit status or the crash dump's slogan. Supervision runs
in whichever bstore process is long-lived (``Supervisor.run`` in a thread); a one-shot
command calls ``Supervisor.poll`` and so restarts VMs found dead on its next run.
Stopping is graceful through the agent, then SIGTERM, then SIGKILL of the VM's process
group, never signalling a recycled pid (:class:`~bstore.activators.hostnode.HostNode`
does it). One guest's files and process: :mod:`.vm_guest`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from bstore.activators.agent_client import AgentClient, AgentError
from bstore.activators.base import (
    Activator,
    ActivatorContext,
    ActivatorError,
    ApplyResult,
    HealthResult,
)
from bstore.activators.cgroups import BSTORE_GROUP, Cgroup, CgroupSupport, detect
from bstore.activators.cookie import cookie_home, resolve_cookie, vm_environment
from bstore.activators.gcroots import RunningRoots
from bstore.activators.health import health_deadline, probe, settle_seconds
from bstore.activators.hostnode import HostNode, HostNodeError
from bstore.activators.nodeops import (
    closure_ebins,
    reconfigure_app,
    reload_or_restart,
    run_actions,
    start_app,
)
from bstore.activators.plan import Action, AppStatus, RunningState, plan
from bstore.activators.vm_guest import (
    Guest,
    GuestNode,
    VmState,
    last_run_log,
    read_entry,
    slogan,
)
from bstore.activators.vm_supervisor import Supervisor
from bstore.errors import BstoreError
from bstore.generations.manifest import AppEntry, GenerationManifest, parse_manifest
from bstore.specs.model import Isolation, SourceType, valid_app_name
from bstore.specs.terms.model import Atom

#: Restarts allowed within WINDOW seconds before an app is failed.
DEFAULT_BURST = 3
DEFAULT_WINDOW = 60.0
#: First restart delay; doubled for each crash in the window, capped (vm_supervisor).
DEFAULT_BACKOFF = 0.5
#: A VM's log lines that mean its allocators ran out of the memory it may use.
_OOM_RE = re.compile(rb"Cannot allocate \d+ bytes of memory")


class VmError(BstoreError):
    """A guest VM that cannot be started, reached or stopped (names the app)."""


def runs_in_vm(entry: AppEntry) -> bool:
    """Whether ``entry`` runs in a VM of its own: ``isolation => vm``, or a ``release``
    source (a release boots its own VM from its boot files)."""
    return entry.isolation is Isolation.VM or entry.source.type is SourceType.RELEASE


def release_boot(out_dir: Path) -> tuple[Path, Path | None] | None:
    """``(boot file without .boot, sys.config or None)`` of the release tree ``out_dir``:
    the version ``releases/start_erl.data`` names, else the only one with a ``start.boot``."""
    releases = out_dir / "releases"
    boot: Path | None = None
    try:
        fields = (releases / "start_erl.data").read_text(encoding="utf-8").split()
        if len(fields) == 2 and (releases / fields[1] / "start.boot").is_file():
            boot = releases / fields[1] / "start.boot"
    except (OSError, UnicodeDecodeError):
        pass
    if boot is None:
        found = sorted(releases.glob("*/start.boot"))
        if len(found) != 1:
            return None
        boot = found[0]
    config = boot.parent / "sys.config"
    return boot.with_suffix(""), config if config.is_file() else None


def host_node_name(profile: str, options: Mapping[str, str]) -> str:
    """The host node's distribution name: the ``node_name`` option or
    ``bstore_<profile>@127.0.0.1``."""
    return options.get("node_name") or f"bstore_{_safe(profile)}@127.0.0.1"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def elixir_lib_dir() -> Path | None:
    """The directory of Elixir's own OTP applications (``elixir``, ``logger`` …) of the
    installed ``elixir`` (``<prefix>/lib`` beside its ``bin/``), None without one."""
    exe = shutil.which("elixir")
    if exe is None:
        return None
    lib = Path(os.path.realpath(exe)).parent.parent / "lib"
    return lib if (lib / "elixir" / "ebin" / "elixir.app").is_file() else None


def node_environment(context: ActivatorContext, home: Path) -> dict[str, str]:
    """The environment of a node of ``context``'s profile: a private ``HOME`` holding the
    profile's cookie, epmd on loopback, no cookie variables, and Elixir's applications
    on ``ERL_LIBS`` (a mix-built app needs ``elixir`` at run time; OTP's code path does
    not hold it)."""
    cookie = resolve_cookie(context.root / "nodes" / context.profile,
                            context.options.get("cookie"))
    env = vm_environment(cookie_home(home, cookie))
    elixir = elixir_lib_dir()
    if elixir is not None:
        libs = [p for p in env.get("ERL_LIBS", "").split(os.pathsep) if p]
        if str(elixir) not in libs:
            env["ERL_LIBS"] = os.pathsep.join([*libs, str(elixir)])
    return env


class VmActivator(Activator):
    """One VM per ``isolation => vm`` app (see the module docstring). Options: those of
    the embedded activator, plus ``restart_burst``, ``restart_window`` (s),
    ``restart_backoff`` (s) and ``cgroup_base`` (a delegated cgroup v2 directory)."""

    name = "vm"

    def __init__(self, context: ActivatorContext, *, agent_ebin: Path | None = None,
                 host_node: str | None = None, cgroups: CgroupSupport | None = None) -> None:
        super().__init__(context)
        self.store_dir = context.root / "store"
        self.vms_dir = context.root / "nodes" / context.profile / "vms"
        self._agent_ebin = agent_ebin
        opts = context.options
        if host_node is None and opts.get("distribution", "on") != "off":
            host_node = host_node_name(context.profile, opts)
        self.host_node = host_node
        base = opts.get("cgroup_base")
        self.cgroups = cgroups if cgroups is not None else detect(
            Path(base) if base else None)
        self.burst = int(opts.get("restart_burst", DEFAULT_BURST))
        self.window = float(opts.get("restart_window", DEFAULT_WINDOW))
        self.backoff = float(opts.get("restart_backoff", DEFAULT_BACKOFF))
        self._guests: dict[str, Guest] = {}
        self._new: GenerationManifest | None = None
        self._lock = threading.RLock()
        #: GC roots of the code each running VM loaded (:mod:`bstore.activators.gcroots`).
        self.roots = RunningRoots(context.root, context.profile)

    # ------------------------------------------------------------ guests

    @property
    def agent_ebin(self) -> Path:
        """The compiled agent."""
        if self._agent_ebin is None:
            from bstore.activators.embedded import ensure_agent

            self._agent_ebin = ensure_agent(self.context.root)
        return self._agent_ebin

    def guest(self, app: str) -> Guest:
        """The VM of ``app`` (its files; it need not run)."""
        if not valid_app_name(app):
            raise VmError(f"{app!r} is not a valid application name",
                          hint="an OTP application name: a lowercase letter, then letters,"
                          " digits and '_'")
        if app not in self._guests:
            directory = self.vms_dir / app
            cgroup = None
            if self.cgroups.base is not None:
                cgroup = Cgroup(self.cgroups.base / BSTORE_GROUP
                                / _cgroup_name(self.context.profile, app))
            self._guests[app] = Guest(app, directory, GuestNode(directory, f"{app} (vm)",
                                                                 cgroup))
        return self._guests[app]

    def known_apps(self) -> list[str]:
        """Apps with a VM directory under this profile."""
        try:
            return sorted(p.name for p in self.vms_dir.iterdir()
                          if valid_app_name(p.name) and (p / "app.json").exists())
        except FileNotFoundError:
            return []

    def node_name(self, entry: AppEntry) -> str:
        """``<prefix><app>@127.0.0.1``."""
        prefix = entry.vm_config.node_prefix if entry.vm_config is not None else None
        if prefix is None:
            prefix = f"bstore_{_safe(self.context.profile)}_"
        return f"{prefix}{entry.name}@127.0.0.1"

    def vm_args(self, entry: AppEntry, guest: Guest) -> list[str]:
        """The emulator and kernel arguments of ``entry``'s VM (without the cookie)."""
        args: list[str] = []
        cfg = entry.vm_config
        if cfg is not None and cfg.scheduler_limit is not None:
            args += ["+S", f"{cfg.scheduler_limit}:{cfg.scheduler_limit}"]
        if cfg is not None and cfg.memory_limit is not None and guest.node.cgroup is None:
            # No cgroup: one fixed super carrier holds every allocation (+MMmcs would
            # only count segments, and ulimit -v breaks the VM's address space layout).
            args += ["+MMscs", str(cfg.memory_limit), "+MMsco", "true", "+Musac", "false"]
        if self.host_node is not None and self._host_running():
            # Join the host node's cluster at boot (the connection is made by the kernel).
            args += ["-kernel", "sync_nodes_optional", f"['{self.host_node}']",
                     "-kernel", "sync_nodes_timeout", "10000"]
        if entry.source.type is SourceType.RELEASE:
            args += self._release_args(entry)
        if cfg is not None:
            args += list(cfg.extra_args)
        return args

    def _release_args(self, entry: AppEntry) -> list[str]:
        """Boot a release from its own boot file and sys.config (not its ``bin/`` script,
        which would put the cookie from ``vm.args`` on the command line). Paths in the boot
        file under ``$RELEASE_LIB`` resolve to the release's ``lib/``."""
        out = self.store_dir / str(entry.output)
        found = release_boot(out)
        if found is None:
            raise VmError(f"release {entry.name!r}: no releases/<vsn>/start.boot under {out}",
                          hint="a release tarball must hold its boot files (releases/)")
        boot, config = found
        args = ["-boot", str(boot), "-boot_var", "RELEASE_LIB", str(out / "lib")]
        if config is not None:
            args += ["-config", str(config)]
        return args

    def _host_running(self) -> bool:
        try:
            return HostNode(self.context.root, self.context.profile).status(2.0).running
        except HostNodeError:
            return False

    def launch(self, app: str) -> None:
        """Start ``app``'s VM from its ``app.json`` and start the app in it."""
        guest = self.guest(app)
        manifest = parse_manifest(guest.app_file.read_bytes(), str(guest.app_file))
        entry = manifest.apps[app]
        env = node_environment(self.context, guest.directory / "home")
        env["ERL_CRASH_DUMP"] = str(guest.directory / "erl_crash.dump")
        # Long enough for the dump's slogan (the reason bstore reports), bounded.
        env["ERL_CRASH_DUMP_SECONDS"] = "5"
        with contextlib.suppress(FileNotFoundError):
            (guest.directory / "erl_crash.dump").unlink()
        cgroup = guest.node.cgroup
        state = VmState.read(guest.state_file)
        if cgroup is not None:
            cfg = entry.vm_config
            self.cgroups.group(cgroup.path.name)
            if cfg is not None and cfg.memory_limit is not None:
                cgroup.set_memory_max(cfg.memory_limit * 1024 * 1024)
            state.oom_baseline = cgroup.oom_kills()
        state.write(guest.state_file)
        try:
            guest.node.start(self.agent_ebin, closure_ebins(self.store_dir, manifest, entry),
                             node_name=self.node_name(entry),
                             extra_args=self.vm_args(entry, guest), env=env)
        except HostNodeError as exc:
            raise VmError(f"VM of app {app!r} did not start: {exc.message}",
                          hint=f"see {guest.node.paths.log}") from exc
        with guest.client() as client:
            start_app(client, [], entry)

    def _write_app(self, guest: Guest, entry: AppEntry,
                   manifest: GenerationManifest | None) -> None:
        code_path = {} if manifest is None else {
            k: v for k, v in manifest.code_path.items()
            if v.split("/", 1)[0] in {str(p) for p in entry.closure}}
        one = GenerationManifest.of([_standalone(entry)], code_path)
        guest.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = guest.app_file.with_name(".app.json.tmp")
        tmp.write_bytes(one.to_bytes())
        os.replace(tmp, guest.app_file)

    # ------------------------------------------------------------ actions

    def do_start(self, entry: AppEntry, manifest: GenerationManifest | None = None) -> str:
        """Spawn ``entry``'s VM and start the app in it (supervised from now on)."""
        with self._lock:
            guest = self.guest(entry.name)
            if guest.running():
                guest.node.stop()
            self._write_app(guest, entry, manifest or self._new)
            VmState(desired=True).write(guest.state_file)
            self.roots.set("vm", entry.name, str(entry.output))
            self.launch(entry.name)
        return f"started in VM {self.node_name(entry)}"

    def keep_or_start(self, entry: AppEntry, manifest: GenerationManifest | None) -> str:
        """Keep ``entry``'s VM if it already runs exactly that build (same output, env
        and VM config: e.g. it outlived a host node restart) and have it rejoin the host
        node's cluster; else start it like :meth:`do_start`."""
        with self._lock:
            guest = self.guest(entry.name)
            current = read_entry(guest)
            state = VmState.read(guest.state_file)
            if (current is not None and state.desired and state.failed is None
                    and current.output == entry.output and current.env == entry.env
                    and current.vm_config == entry.vm_config and guest.running()):
                self.roots.set("vm", entry.name, str(entry.output))
                joined = self.reconnect(entry)
                return "kept running" + ("" if joined is None else
                                         f" ({'node up' if joined else 'node down'})")
        return self.do_start(entry, manifest)

    def reconnect(self, entry: AppEntry) -> bool | None:
        """Ask ``entry``'s VM to connect to the host node (``net_kernel:connect_node``
        through its agent): a guest whose host node restarted is not reconnected by the
        kernel. True when connected; None without a host node to join."""
        if self.host_node is None:
            return None
        try:
            with self.guest(entry.name).client(10.0) as client:
                return client.connect_node(self.host_node)
        except AgentError:
            return False

    def do_stop(self, action: Action) -> str:
        """Stop the app's VM: graceful, then SIGTERM, then SIGKILL (never supervised again)."""
        return self.stop_vm(action.app)

    def stop_vm(self, app: str) -> str:
        """Stop ``app``'s VM and forget it; returns how it ended."""
        with self._lock:
            guest = self.guest(app)
            if guest.directory.exists():
                state = VmState.read(guest.state_file)
                state.desired = False
                state.write(guest.state_file)
            how = guest.node.stop()
            self.roots.remove("vm", app)
            if guest.node.cgroup is not None:
                guest.node.cgroup.remove()
            with contextlib.suppress(FileNotFoundError):
                guest.app_file.unlink()
            return f"VM stopped ({how})"

    def stop_all(self) -> list[str]:
        """Stop every VM of the profile."""
        return [self.stop_vm(app) for app in self.known_apps()]

    def do_restart(self, action: Action, entry: AppEntry) -> str:
        """A new VM for the new version."""
        self.stop_vm(action.app)
        return "restarted: " + self.do_start(entry)

    def do_reload(self, action: Action, entry: AppEntry) -> str:
        """Reload changed modules inside the VM (restart the VM if that fails)."""
        guest = self.guest(entry.name)
        old = read_entry(guest)
        old_ebin = None if old is None else (self.store_dir / str(old.output) / "lib"
                                             / old.lib_name / "ebin")
        with guest.client() as client:
            detail = reload_or_restart(client, self.store_dir, action, entry, old_ebin,
                                       lambda: self.do_restart(action, entry))
        self._write_app(guest, entry, self._new)
        self.roots.set("vm", entry.name, str(entry.output))
        return detail

    def do_reconfigure(self, action: Action, entry: AppEntry) -> str:
        """Change env in the VM and run ``config_change/3``."""
        guest = self.guest(entry.name)
        with guest.client() as client:
            reconfigure_app(client, action)
        self._write_app(guest, entry, self._new)
        return "reconfigured"

    def probe(self, entry: AppEntry) -> HealthResult:
        """One health check of ``entry`` (custom checks and "running" ask its VM)."""
        guest = self.guest(entry.name)
        if not guest.running():
            state = VmState.read(guest.state_file)
            return HealthResult(entry.name, False, "VM not running"
                                + (f": {state.failed or state.last_exit}"
                                   if state.failed or state.last_exit else ""))
        with guest.client(10.0) as client:
            return probe(entry.name, entry.health, client)

    def health_of(self, entry: AppEntry) -> HealthResult:
        """:meth:`probe`, for callers outside an apply."""
        return self.probe(entry)

    # ------------------------------------------------------------ Activator

    def plan(self, old: GenerationManifest | None, new: GenerationManifest) -> list[Action]:
        """Plan against what runs; remembers ``new`` for :meth:`apply`."""
        self._new = new
        return plan(old, new, self.current_state())

    def apply(self, actions: Sequence[Action]) -> ApplyResult:
        """Carry out the actions of vm apps; an embedded app's action fails (use the
        ``embedded`` activator, which hands vm apps to this one)."""
        if self._new is None:
            raise ActivatorError("apply() without plan()", hint="call plan(old, new) first")
        return run_actions(_VmOnly(self), actions, self._new, self._deadline,
                           self.context.echo, settle=self._settle)

    @property
    def _settle(self) -> float:
        return settle_seconds(self.context.options)

    def _deadline(self, entry: AppEntry) -> float:
        return health_deadline(self.context.options, entry)

    def current_state(self) -> Mapping[str, RunningState]:
        """Each VM app: running (with cluster connection), stopped, or failed (why)."""
        known = self.known_apps()
        if not known:
            return {}  # no question to the host node for a profile without VMs
        connected = self._connected_nodes()
        out: dict[str, RunningState] = {}
        for app in known:
            guest = self.guest(app)
            entry = read_entry(guest)
            state = VmState.read(guest.state_file)
            if entry is None or not state.desired:
                continue
            version, output = entry.version, str(entry.output)
            if state.failed is not None:
                out[app] = RunningState(app, AppStatus.FAILED, version, output=output,
                                        reason=state.failed)
            elif guest.running():
                reason = None
                if connected is not None:
                    up = self.node_name(entry) in connected
                    reason = "node up" if up else f"node down: not connected to {self.host_node}"
                out[app] = RunningState(app, AppStatus.RUNNING, version, output=output,
                                        reason=reason)
            else:
                out[app] = RunningState(app, AppStatus.STOPPED, version, output=output,
                                        reason=state.last_exit or "VM not running")
        return out

    def _connected_nodes(self) -> set[str] | None:
        """The host node's distribution peers, None when it cannot be asked."""
        if self.host_node is None:
            return None
        host = HostNode(self.context.root, self.context.profile)
        sock = host.paths.socket
        if not sock.exists():
            return None
        try:
            with AgentClient(sock, 5.0) as client:
                peers = client.call("nodes")
        except AgentError:
            return None
        return {p.name for p in peers if isinstance(p, Atom)} if isinstance(peers, list) \
            else None

    def health(self, app: str) -> HealthResult:
        """Check ``app`` in its VM now."""
        entry = read_entry(self.guest(app))
        if entry is None:
            return HealthResult(app, False, "no VM for this app")
        return self.probe(entry)

    def supervisor(self) -> Supervisor:
        """The supervisor of this profile's VMs."""
        return Supervisor(self)

    # ------------------------------------------------------------ deaths

    def death_reason(self, guest: Guest) -> str:
        """Why ``guest``'s VM died: ``oom``, ``exit status N``/``killed by SIG..``,
        the crash dump's slogan, or ``exited``."""
        state = VmState.read(guest.state_file)
        cgroup = guest.node.cgroup
        if cgroup is not None and cgroup.oom_kills() > state.oom_baseline:
            return "oom"
        log = last_run_log(guest.node.paths.log)
        if _OOM_RE.search(log):
            return "oom"
        parts = []
        proc = guest.node.proc
        if proc is not None and proc.poll() is not None:
            code = proc.returncode
            parts.append(f"killed by {signal.Signals(-code).name}" if code < 0
                         else f"exit status {code}")
        dump_slogan = slogan(guest.directory / "erl_crash.dump")
        if dump_slogan:
            parts.append(f"crashed: {dump_slogan}")
        return ", ".join(parts) or "exited"


class _VmOnly:
    """The vm activator as a ``nodeops.Target`` that refuses embedded apps."""

    def __init__(self, vms: VmActivator) -> None:
        self.vms = vms

    def _check(self, isolation: Isolation | None, app: str, entry: AppEntry | None = None
               ) -> None:
        if isolation is not Isolation.VM and (entry is None or not runs_in_vm(entry)):
            raise VmError(f"app {app!r} is not isolation vm; the vm activator only runs VMs",
                          hint="use the embedded activator, which runs both")

    def do_start(self, entry: AppEntry) -> str:
        self._check(entry.isolation, entry.name, entry)
        return self.vms.do_start(entry)

    def do_stop(self, action: Action) -> str:
        if action.app not in self.vms.known_apps():
            self._check(action.old_isolation or action.isolation, action.app)
        return self.vms.do_stop(action)

    def do_restart(self, action: Action, entry: AppEntry) -> str:
        self._check(entry.isolation, entry.name, entry)
        return self.vms.do_restart(action, entry)

    def do_reload(self, action: Action, entry: AppEntry) -> str:
        self._check(entry.isolation, entry.name, entry)
        return self.vms.do_reload(action, entry)

    def do_reconfigure(self, action: Action, entry: AppEntry) -> str:
        self._check(entry.isolation, entry.name, entry)
        return self.vms.do_reconfigure(action, entry)

    def probe(self, entry: AppEntry) -> HealthResult:
        return self.vms.probe(entry)


# -- helpers -------------------------------------------------------------------------------


def _cgroup_name(profile: str, app: str) -> str:
    return f"{_safe(profile)}-{app}"


def _standalone(entry: AppEntry) -> AppEntry:
    """``entry`` without dependencies on other apps (its manifest holds only itself)."""
    from dataclasses import replace

    return replace(entry, depends_on=())
