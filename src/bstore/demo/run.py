"""The demo's script: the GitOps loop on the built-in example, told step by step.

:func:`run_demo` creates the work dir (:mod:`.workspace`, :mod:`.templates`), writes
``bstore.toml`` and drives the real :class:`~bstore.gitops.reconciler.Reconciler` with
the ``embedded`` activator through four commits:

1. three apps (Erlang/rebar3 counter, Elixir/mix app, a worker in its own VM) deployed;
2. the counter upgraded: only it restarts, the new version answers over HTTP;
3. a broken counter (``/health`` answers 500): rolled back to the previous generation,
   the commit quarantined, the previous version still answers;
4. ``bstore status`` and ``bstore generations``; the nodes stopped (or kept running).

It returns a JSON-ready summary; a step that does not go as told raises
:class:`~bstore.demo.workspace.DemoError` (the nodes are stopped first unless asked
to keep them).
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bstore.activators.plan import ActionKind
from bstore.demo import templates as t
from bstore.demo.workspace import (
    DemoError,
    GitRepo,
    free_ports,
    http_get,
    tcp_ping,
)
from bstore.events import Event, EventBus
from bstore.gitops.config import load_config
from bstore.gitops.reconciler import Reconciler, ReconcileResult
from bstore.gitops.status import Status

#: Tools the demo runs (builds and nodes), with the Debian package that has each.
REQUIRED_TOOLS = {"git": "git", "erl": "erlang-nox", "erlc": "erlang-nox",
                  "rebar3": "rebar3", "mix": "elixir", "elixir": "elixir"}
STEPS = 5

Say = Callable[[str], None]


def check_tools() -> None:
    """Fail with the packages to install when a tool the demo needs is missing."""
    missing = {tool: pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None}
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        raise DemoError(f"the demo needs {', '.join(missing)}, which "
                        f"{'is' if len(missing) == 1 else 'are'} not on PATH",
                        hint=f"apt-get install {packages} (./dev demo installs them)")


class Narrator:
    """Numbered steps and indented detail lines; ``styled`` adds bold headers (for a
    terminal), otherwise the lines are plain."""

    def __init__(self, say: Say, styled: bool) -> None:
        self._say = say
        self.styled = styled

    def step(self, number: int, title: str) -> None:
        """Start step ``number``."""
        head = f"[{number}/{STEPS}] {title}"
        if self.styled:
            import click

            head = click.style(head, bold=True)
        self._say("")
        self._say(head)

    def line(self, text: str = "", indent: int = 2) -> None:
        """One or more detail lines."""
        for part in text.splitlines() or [""]:
            self._say(" " * indent + part if part else "")

    def why(self, text: str) -> None:
        """An explanation for a newcomer."""
        self.line(f"-> {text}")


def _free_ports() -> t.Ports:
    counter, worker = free_ports(2)
    return t.Ports(counter=counter, worker=worker)


def _changed(result: ReconcileResult) -> dict[str, str]:
    """App → action kind for every activation action that touched an app."""
    if result.activation is None:
        return {}
    return {a.app: a.kind.value for a in result.activation.actions
            if a.kind is not ActionKind.KEEP}


def _apps_json(status: Status) -> dict[str, Any]:
    return {name: {"version": a.version, "status": a.status.value, "healthy": a.healthy,
                   "isolation": a.isolation, "node": a.node}
            for name, a in sorted(status.apps.items())}


def _generations(root: Path, profile: str) -> list[dict[str, Any]]:
    """Every generation of ``profile``: number, commit, apps, current marker."""
    from bstore.generations.generation import load_generation
    from bstore.generations.profiles import Profile
    from bstore.store.local import LocalStore

    rows = []
    with LocalStore.open(root, create=False) as store:
        prof = Profile(store, profile)
        current = prof.current_number()
        for g in prof.generations():
            manifest = load_generation(store, g.store_path)
            rows.append({"number": g.number, "current": g.number == current,
                         "date": g.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "commit": manifest.commit,
                         "apps": {a.name: a.version for a in manifest.apps.values()}})
    return rows


def _render_generations(profile: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"profile {profile}: {len(rows)} generation(s)"]
    for r in rows:
        apps = ", ".join(f"{n}-{v}" for n, v in sorted(r["apps"].items()))
        mark = "*" if r["current"] else " "
        lines.append(f"{mark} {r['number']:>4}  {r['date']}  {(r['commit'] or '-')[:12]:<12}"
                     f"  {apps}" + ("  (current)" if r["current"] else ""))
    return "\n".join(lines)


class Demo:
    """One run of the demo in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Path, narrator: Narrator, *, keep_running: bool = False
                 ) -> None:
        self.workdir = workdir.absolute()
        self.root = self.workdir / "state"
        self.say = narrator
        self.keep_running = keep_running
        # A profile of its own per run: node names (bstore_<profile>@127.0.0.1) and the
        # VM's must not collide with another bstore, or another demo, on this machine.
        self.profile = f"demo-{secrets.token_hex(3)}"
        self.config_path = self.workdir / "bstore.toml"
        self.bus = EventBus()
        self.bus.attach("bstore.build", self._on_build)
        self.reconciler: Reconciler | None = None
        self.summary: dict[str, Any] = {}

    # -- plumbing ------------------------------------------------------------------------

    def _on_build(self, event: Event) -> None:
        label = event.metadata.get("derivation")
        if label and event.name.endswith(".stop"):
            seconds = event.measurements.get("duration", 0) / 1000
            self.say.line(f"built {label}: {event.metadata.get('result')} ({seconds:.1f} s)",
                          4)

    def _reconcile(self) -> ReconcileResult:
        assert self.reconciler is not None
        return self.reconciler.reconcile_once(trigger="demo")

    def _status(self) -> Status:
        assert self.reconciler is not None
        return self.reconciler.status()

    def _fail(self, what: str, result: ReconcileResult) -> DemoError:
        status = self._status()
        problems = [f"{n}: {a.last_error}" for n, a in sorted(status.apps.items())
                    if a.last_error]
        detail = result.error or "; ".join(problems) or f"state {result.state.value}"
        return DemoError(f"demo step '{what}' did not go as expected: {detail}",
                         hint=f"see the node logs: bstore --root {self.root} node logs"
                         f" -p {self.profile}, and the build logs under {self.root}/logs")

    def _show_apps(self, status: Status) -> None:
        for name, a in sorted(status.apps.items()):
            # None: not checked in this pass (an app the pass did not touch).
            health = {True: "healthy", False: "UNHEALTHY", None: "-"}[a.healthy]
            where = f"in VM {a.node}" if a.isolation == "vm" else "in the host node"
            self.say.line(f"{name:<9} {a.version or '-':<7} {a.status.value:<8} {health:<8}"
                          f" {where}", 4)

    def _counter(self, ports: t.Ports) -> str:
        code, body = http_get(ports.counter)
        shown = f"HTTP {code}: {body}" if code is not None else body
        self.say.line(f"GET http://127.0.0.1:{ports.counter}/ -> {shown}", 4)
        return body if code == 200 else f"(no answer: {shown})"

    # -- the steps -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """All steps; the summary. Stops what it started unless ``keep_running``."""
        started = time.monotonic()
        check_tools()
        try:
            ports, repos = self.step_setup()
            self.step_deploy(ports)
            self.step_upgrade(ports, repos)
            self.step_broken(ports, repos)
            self.step_report()
        except OSError as exc:
            self.stop()
            raise DemoError(f"the demo failed in {str(self.workdir)!r}:"
                            f" {exc.strerror or exc} ({exc.filename or 'no file'})",
                            hint="check that the work dir is writable and has space") from exc
        except BaseException:
            # A demo that failed half-way leaves nothing running, --keep-running or not.
            self.stop()
            raise
        if not self.keep_running:
            self.stop()
        self.summary["running"] = self.keep_running
        self.summary["duration_s"] = round(time.monotonic() - started, 1)
        self.step_explore()
        return self.summary

    def step_setup(self) -> tuple[t.Ports, Mapping[str, GitRepo]]:
        """Step 1: the app repositories, the GitOps repo, bstore.toml."""
        self.say.step(1, "Create example apps and a GitOps repository")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if any(self.workdir.iterdir()):
            raise DemoError(f"work dir {str(self.workdir)!r} is not empty",
                            hint="give --workdir a new or empty directory")
        ports = _free_ports()
        src = self.workdir / "sources"
        counter = GitRepo.create(src / "counter")
        counter.commit(t.counter_sources(t.COUNTER_V1), "counter 1.0.0",
                       tag=f"v{t.COUNTER_V1.version}")
        hello = GitRepo.create(src / "hello_ex")
        hello.commit(t.hello_sources(), "hello_ex", tag=f"v{t.HELLO_VERSION}")
        worker = GitRepo.create(src / "worker")
        worker.commit(t.worker_sources(), "worker", tag=f"v{t.WORKER_VERSION}")
        gitops = GitRepo.create(self.workdir / "gitops")
        commit = gitops.commit({
            "apps/counter/app.config": t.counter_spec(counter.url, t.COUNTER_V1, ports),
            "apps/hello_ex/app.yaml": t.hello_spec(hello.url),
            "apps/worker/app.json": t.worker_spec(worker.url, ports),
        }, "deploy counter, hello_ex and worker")
        self.config_path.write_text(t.config_toml(gitops.url, self.profile), encoding="utf-8")
        config = load_config(self.config_path)
        self.say.line("app sources, each its own git repository:")
        self.say.line(f"counter   Erlang, rebar3, HTTP counter on 127.0.0.1:{ports.counter}"
                      f"  {counter.path}", 4)
        self.say.line(f"hello_ex  Elixir, mix, starts after counter  {hello.path}", 4)
        self.say.line(f"worker    Erlang, erlc, runs in its own VM ({t.WORKER_SCHEDULERS}"
                      f" scheduler, {t.WORKER_MEMORY_MB} MB) on 127.0.0.1:{ports.worker}"
                      f"  {worker.path}", 4)
        self.say.line(f"GitOps repository {gitops.url}, commit {commit[:12]}:")
        for rel in ("apps/counter/app.config  (Erlang terms)",
                    "apps/hello_ex/app.yaml   (YAML)", "apps/worker/app.json     (JSON)"):
            self.say.line(rel, 4)
        self.say.line(f"configuration {self.config_path} (profile {self.profile},"
                      f" activator {config.activator})")
        self.reconciler = Reconciler(config, self.root, events=self.bus,
                                     echo=lambda m: self.say.line(m, 4))
        self.summary.update({"workdir": str(self.workdir), "root": str(self.root),
                             "config": str(self.config_path), "profile": self.profile,
                             "repo_url": gitops.url,
                             "ports": {"counter": ports.counter, "worker": ports.worker}})
        return ports, {"counter": counter, "gitops": gitops}

    def step_deploy(self, ports: t.Ports) -> None:
        """Step 2: the first reconcile."""
        self.say.step(2, "Reconcile: build the three apps and start them")
        self.say.why("bstore fetches the GitOps repo, parses the specs, builds each app"
                     " from its git source into the store, makes generation 1 and starts it")
        result = self._reconcile()
        if not result.ok:
            raise self._fail("deploy", result)
        status = self._status()
        self.say.line(f"generation {status.generation} is live (commit"
                      f" {(result.commit or '-')[:12]}):")
        self._show_apps(status)
        body = self._counter(ports)
        pong = tcp_ping(ports.worker)
        self.say.line(f"ping 127.0.0.1:{ports.worker} -> {pong}", 4)
        self.summary["deploy"] = {
            "commit": result.commit, "generation": status.generation,
            "state": result.state.value, "built": list(result.built),
            "started": sorted(n for n, k in _changed(result).items() if k == "start"),
            "apps": _apps_json(status), "counter_response": body, "worker_response": pong}

    def _push_counter(self, repos: Mapping[str, GitRepo], release: t.CounterVersion,
                      ports: t.Ports, message: str) -> str:
        counter, gitops = repos["counter"], repos["gitops"]
        counter.commit(t.counter_sources(release), f"counter {release.version}",
                       tag=f"v{release.version}")
        return gitops.commit({"apps/counter/app.config":
                              t.counter_spec(counter.url, release, ports)}, message)

    def step_upgrade(self, ports: t.Ports, repos: Mapping[str, GitRepo]) -> None:
        """Step 3: upgrade the counter; only it restarts."""
        old, new = t.COUNTER_V1.version, t.COUNTER_V2.version
        self.say.step(3, f"Upgrade: counter {old} -> {new}")
        commit = self._push_counter(repos, t.COUNTER_V2, ports, f"upgrade counter to {new}")
        self.say.line(f"committed {commit[:12]} \"upgrade counter to {new}\" (the counter's"
                      f" source is tagged v{new}, with a new answer)")
        self.say.why("only the counter's spec changed: bstore builds the new version and"
                     " restarts the counter alone; the other apps keep running")
        assert self.reconciler is not None
        plan = self.reconciler.plan()
        self.say.line("bstore plan:")
        self.say.line(plan.render(), 4)
        result = self._reconcile()
        if not result.ok:
            raise self._fail("upgrade", result)
        changed = _changed(result)
        status = self._status()
        self.say.line(f"generation {status.generation}: "
                      + ", ".join(f"{k} {a}" for a, k in sorted(changed.items()))
                      + "; every other app kept running untouched")
        self._show_apps(status)
        body = self._counter(ports)
        self.summary["upgrade"] = {
            "commit": commit, "generation": status.generation, "from_version": old,
            "to_version": new, "state": result.state.value,
            "plan": [c.to_json() for c in plan.changes if c.kind.value != "keep"],
            "actions": changed, "restarted": sorted(a for a, k in changed.items()
                                                    if k in ("restart", "reload")),
            "built": list(result.built), "counter_response": body,
            "apps": _apps_json(status)}

    def step_broken(self, ports: t.Ports, repos: Mapping[str, GitRepo]) -> None:
        """Step 4: a broken release is rolled back and its commit quarantined."""
        bad = t.COUNTER_BROKEN.version
        self.say.step(4, f"A broken release: counter {bad}, whose /health answers 500")
        commit = self._push_counter(repos, t.COUNTER_BROKEN, ports,
                                    f"upgrade counter to {bad}")
        self.say.line(f"committed {commit[:12]} \"upgrade counter to {bad}\"")
        self.say.why("bstore builds it, switches to a new generation, starts it and checks"
                      " its health; it never gets healthy, so bstore switches back")
        result = self._reconcile()
        activation = result.activation
        if not result.quarantined or activation is None or activation.ok:
            raise self._fail("broken release rolled back", result)
        status = self._status()
        quarantine = dict(status.quarantine or {})
        self.say.line(f"generation {activation.attempted} failed its health check:"
                      f" {'; '.join(f'{a}: {w}' for a, w in activation.failed.items())}")
        self.say.line(f"rolled back to generation {activation.rolled_back_to};"
                      f" commit {commit[:12]} is quarantined")
        self.say.line(f"bstore status says: {status.state.value}: {status.error}")
        self._show_apps(status)
        body = self._counter(ports)
        again = self._reconcile()
        self.say.line(f"reconcile again: {again.skipped or again.state.value} (a quarantined"
                      " commit is not retried until the repository changes)")
        self.summary["broken"] = {
            "commit": commit, "version": bad, "state": result.state.value,
            "quarantined": result.quarantined, "attempted_generation": activation.attempted,
            "rolled_back_to": activation.rolled_back_to, "failed": dict(activation.failed),
            "quarantine": quarantine, "status_error": status.error,
            "counter_response": body, "retry": again.skipped or again.state.value,
            "apps": _apps_json(status)}

    def step_report(self) -> None:
        """Step 5: ``bstore status`` and ``bstore generations``."""
        self.say.step(5, "Where things stand: bstore status and bstore generations")
        status = self._status()
        rows = _generations(self.root, self.profile)
        self.say.why(f"'{status.state.value}' because the repository's tip is quarantined;"
                     f" the apps run generation {status.generation}, the last good one."
                     " The next commit to the repository is tried again.")
        self.say.line(f"$ bstore --root {self.root} status --config {self.config_path}")
        self.say.line(status.render(), 4)
        self.say.line(f"$ bstore --root {self.root} generations -p {self.profile}")
        self.say.line(_render_generations(self.profile, rows), 4)
        self.summary["status"] = status.to_json()
        self.summary["generations"] = rows

    def stop(self) -> None:
        """Stop the worker's VM and the host node (nothing of the demo keeps running)."""
        if self.reconciler is None:
            return
        from bstore.activators.embedded import EmbeddedActivator

        activator = self.reconciler.activator
        if isinstance(activator, EmbeddedActivator):
            how = activator.shutdown()
            self.summary["stopped"] = how

    def step_explore(self) -> None:
        """How to look around (and stop the node when it was kept running)."""
        root, cfg, p = self.root, self.config_path, self.profile
        self.say.line("")
        if self.keep_running:
            self.say.line("The host node and the worker VM are still running. Explore:", 0)
        else:
            self.say.line("Done: the host node and the worker VM were stopped. The state"
                          " is kept; explore it:", 0)
        for cmd in (f"bstore --root {root} status --config {cfg}",
                    f"bstore --root {root} generations -p {p}",
                    f"bstore --root {root} diff -p {p}",
                    f"bstore --root {root} node status -p {p}",
                    (f"bstore --root {root} node stop -p {p}     (stop the node and the VM)"
                     if self.keep_running else
                     f"bstore --root {root} node start -p {p}    (start them again)"),
                    f"cd {self.workdir} && bstore --root {root} reconcile"
                    "   (after a commit in gitops/)"):
            self.say.line(cmd, 2)
        self.say.line(f"(took {self.summary.get('duration_s', '?')} s;"
                      f" remove {self.workdir} when done)", 0)


def run_demo(workdir: Path, say: Say, *, styled: bool = False,
             keep_running: bool = False) -> dict[str, Any]:
    """Run the demo in ``workdir`` (created; must be empty), telling ``say`` what happens;
    returns the JSON-ready summary (see :class:`Demo`)."""
    return Demo(workdir, Narrator(say, styled), keep_running=keep_running).run()


__all__ = ["Demo", "DemoError", "Narrator", "check_tools", "run_demo"]
