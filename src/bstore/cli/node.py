"""``bstore node start|stop|status|logs``: the profile's long-lived host node (and its VMs)."""

from __future__ import annotations

from typing import Any

import click

from bstore.activators.base import ActivatorContext
from bstore.activators.embedded import EmbeddedActivator
from bstore.cli.context import AppContext, pass_app
from bstore.generations.profiles import DEFAULT_PROFILE

_profile = click.option("--profile", "-p", default=DEFAULT_PROFILE, show_default=True,
                        help="The profile whose node to act on.")


def _activator(app: AppContext, profile: str, distribution: bool = True) -> EmbeddedActivator:
    options = {} if distribution else {"distribution": "off"}
    return EmbeddedActivator(ActivatorContext(app.root, profile, options, echo=app.log))


@click.group("node")
def node() -> None:
    """Control the host BEAM node of a profile (it outlives the command)."""


@node.command("start")
@_profile
@click.option("--no-distribution", is_flag=True,
              help="Start without Erlang distribution (guest VMs cannot join).")
@pass_app
def start(app: AppContext, profile: str, no_distribution: bool) -> None:
    """Start the host node from the profile's current generation (its apps included)."""
    act = _activator(app, profile, not no_distribution)
    result = act.boot()
    data = {"profile": profile, "pid": result.status.pid, "socket": str(result.status.socket),
            "log": str(result.status.log), "started": list(result.started),
            "failed": dict(result.failed)}
    lines = [f"host node of profile {profile} runs (pid {result.status.pid})"]
    if result.started:
        lines.append(f"started: {', '.join(result.started)}")
    lines += [f"FAILED {name}: {why}" for name, why in result.failed.items()]
    app.emit(data, "\n".join(lines))
    if result.failed:
        raise SystemExit(1)


@node.command("stop")
@_profile
@pass_app
def stop(app: AppContext, profile: str) -> None:
    """Stop the profile's VMs and host node (graceful, then SIGTERM, then SIGKILL)."""
    act = _activator(app, profile)
    vms = act.vms.stop_all()
    how = act.node.stop()
    app.emit({"profile": profile, "host": how, "vms": vms},
             f"host node of profile {profile}: {how.replace('_', ' ')}"
             + "".join(f"\n{line}" for line in vms))


@node.command("status")
@_profile
@pass_app
def status(app: AppContext, profile: str) -> None:
    """Whether the node runs, its agent answers, and the state of each app."""
    act = _activator(app, profile)
    st = act.node.status()
    apps = {name: s.to_json() for name, s in sorted(act.current_state().items())}
    data: dict[str, Any] = {"profile": profile, "running": st.running, "agent_ok": st.agent_ok,
                            "pid": st.pid, "problem": st.problem, "apps": apps,
                            "node": None if st.info is None else st.info.node,
                            "otp_release": None if st.info is None else st.info.otp_release}
    if st.running:
        head = f"host node of profile {profile}: running (pid {st.pid})"
        if st.info is not None:
            head += f", node {st.info.node}, OTP {st.info.otp_release}"
    else:
        head = f"host node of profile {profile}: not running"
    lines = [head] + ([f"  problem: {st.problem}"] if st.problem else [])
    for name, s in apps.items():
        extra = f" ({s['reason']})" if s["reason"] else ""
        lines.append(f"  {name:<20} {s['status']:<8} {s['version'] or ''}{extra}")
    app.emit(data, "\n".join(lines))


@node.command("logs")
@_profile
@click.option("--app", "app_name", default=None, help="Show this vm app's VM log instead.")
@click.option("--bytes", "max_bytes", default=64 * 1024, show_default=True,
              help="How much of the end of the log to show.")
@pass_app
def logs(app: AppContext, profile: str, app_name: str | None, max_bytes: int) -> None:
    """The end of the host node's (or a guest VM's) log."""
    act = _activator(app, profile)
    node_ = act.node if app_name is None else act.vms.guest(app_name).node
    text = node_.read_log(max_bytes)
    app.emit({"profile": profile, "app": app_name, "log": str(node_.paths.log), "text": text},
             text.rstrip("\n") if text else f"(no log at {node_.paths.log})")


COMMANDS: list[click.Command] = [node]
