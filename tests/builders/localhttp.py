"""A small threaded HTTP server on 127.0.0.1 with scripted misbehaviour, for fetch tests.

Routes map a path to a :class:`Route`: a body plus one of the behaviours a real network
shows (stall after headers, truncated body, endless body, slow drip, transient 5xx).
Every loop is bounded in count and time, so the server always stops by itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass
class Route:
    """What the server does for one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # "ok" | "stall" | "truncate" | "endless" | "drip" | "redirect"
    behaviour: str = "ok"
    # Answer 503 to the first ``fail_first`` requests, then behave.
    fail_first: int = 0
    hits: int = 0
    location: str = ""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not found")
            return
        route.hits += 1
        if route.hits <= route.fail_first:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            self._serve(route)
        except (BrokenPipeError, ConnectionResetError):
            return

    def _serve(self, route: Route) -> None:
        self.send_response(route.status)
        for key, value in route.headers.items():
            self.send_header(key, value)
        if route.behaviour == "redirect":
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.behaviour == "endless":
            self.end_headers()
            chunk = b"z" * 65536
            # Bounded: at most 256 MiB or 20 s, whichever comes first.
            deadline = time.monotonic() + 20
            for _ in range(4096):
                if time.monotonic() > deadline:
                    break
                self.wfile.write(chunk)
            self.close_connection = True
            return
        if route.behaviour == "truncate":
            self.send_header("Content-Length", str(len(route.body) + 1000))
            self.end_headers()
            self.wfile.write(route.body)
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        if route.behaviour == "stall":
            self.wfile.flush()
            self.server.stop_event.wait(10)
            return
        if route.behaviour == "drip":
            for byte in route.body[:50]:
                if self.server.stop_event.wait(0.2):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            return
        self.wfile.write(route.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]
    stop_event: threading.Event


class LocalServer:
    """``with LocalServer() as srv: srv.routes["/x"] = Route(b"..."); srv.url("/x")``."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.routes = {}
        self._server.stop_event = threading.Event()
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def routes(self) -> dict[str, Route]:
        """The mutable route table."""
        return self._server.routes

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` of this server."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this server."""
        return self.base_url + path

    def start(self) -> LocalServer:
        """Start serving in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release stalled handlers."""
        self._server.stop_event.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
