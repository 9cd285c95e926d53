"""Crash supervision of the ``vm`` activator's guest VMs (see :mod:`.vm`): dead VMs are
restarted with exponential backoff, and an app whose VM crashes more than ``burst`` times
within ``window`` seconds is failed with the reason of its last death."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bstore.activators.agent_client import AgentError
from bstore.activators.vm_guest import Guest, VmState, read_entry
from bstore.errors import BstoreError

if TYPE_CHECKING:
    from bstore.activators.vm import VmActivator

#: The longest pause between two restarts of a crashing VM.
MAX_BACKOFF = 30.0
#: How long a guest that lost its link may take to finish dying before the loss is
#: reported as "node down" (a SIGKILLed VM closes its sockets before it exits).
EXIT_GRACE = 1.0


class Supervisor:
    """Restarts dead VMs with backoff; fails an app after too many crashes.

    :meth:`poll` does one round (the daemon calls it periodically, a one-shot command
    once); :meth:`run` polls in a thread until stopped. All state is in the VMs' files,
    so any bstore process can supervise and none needs to have started the VMs.
    """

    def __init__(self, vms: VmActivator, *, clock: Callable[[], float] = time.time) -> None:
        self.vms = vms
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def backoff(self, crashes: int) -> float:
        """The delay before restart number ``crashes``."""
        return float(min(MAX_BACKOFF, self.vms.backoff * (2 ** max(0, crashes - 1))))

    def poll(self) -> list[str]:
        """One round over every VM: note deaths, restart those due, fail crash loops.
        Returns a line per thing done."""
        done: list[str] = []
        connected = self.vms._connected_nodes()
        for app in self.vms.known_apps():
            with self.vms._lock:
                line = self._poll_one(app, connected)
            if line:
                done.append(line)
        return done

    def _poll_one(self, app: str, connected: set[str] | None) -> str | None:
        guest = self.vms.guest(app)
        state = VmState.read(guest.state_file)
        if not state.desired or state.failed is not None:
            return None
        now = float(self.clock())
        forced: str | None = None
        if guest.running() and not self._app_running(guest, app):
            # The VM outlived its app (it crashed past its supervisor): a VM without
            # its app is a crashed VM, so it is stopped and restarted like one.
            guest.node.stop()
            forced = f"application {app} stopped in its VM"
        elif guest.running():
            entry = read_entry(guest)
            if connected is None or entry is None:
                return None
            up = self.vms.node_name(entry) in connected
            if not up:
                # The host node restarted (or the link broke): the guest's kernel
                # does not reconnect by itself.
                up = self.vms.reconnect(entry) is True
            # A guest that is gone by now lost the link by dying: that is a death
            # (handled below), not a "node down". A SIGKILLed VM closes its sockets
            # before its (large) address space is torn down, so give it a moment.
            if up or not guest.exited_within(EXIT_GRACE):
                if up != state.connected:
                    first = state.connected is None
                    state.connected = up
                    state.write(guest.state_file)
                    if not first:
                        return f"{app}: node {'up' if up else 'down'}"
                return None
        if state.restart_at is None:
            reason = forced or self.vms.death_reason(guest)
            state.last_exit = reason
            state.crashes = [t for t in state.crashes if now - t < self.vms.window] + [now]
            state.connected = False
            if len(state.crashes) > self.vms.burst:
                state.failed = reason
                state.write(guest.state_file)
                # A failed VM runs nothing: its code is no longer rooted.
                self.vms.roots.remove("vm", app)
                return (f"{app}: failed after {len(state.crashes)} crashes in"
                        f" {self.vms.window:g} s: {reason}")
            state.restart_at = now + self.backoff(len(state.crashes))
            state.write(guest.state_file)
            if state.restart_at > now:
                return f"{app}: died ({reason}); restart in {state.restart_at - now:.1f} s"
        if state.restart_at is not None and now >= state.restart_at:
            state.restart_at = None
            state.write(guest.state_file)
            try:
                self.vms.launch(app)
            except (BstoreError, OSError) as exc:
                return f"{app}: restart failed: {exc}"
            return f"{app}: restarted"
        return None

    def _app_running(self, guest: Guest, app: str) -> bool:
        """Whether ``app`` runs in its VM (True when the agent cannot be asked: an
        unanswering agent is not evidence of a crash)."""
        try:
            with guest.client(5.0) as client:
                return app in {a.name for a in client.which_applications()}
        except AgentError:
            return True

    def run(self, interval: float = 0.5) -> threading.Thread:
        """Poll every ``interval`` seconds in a daemon thread until :meth:`stop`."""
        def loop() -> None:
            while not self._stop.wait(interval):
                with contextlib.suppress(BstoreError, OSError):
                    self.poll()

        self._thread = threading.Thread(target=loop, name="bstore-vm-supervisor", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """End :meth:`run`'s thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
