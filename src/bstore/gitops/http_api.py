"""The daemon's HTTP API: a small JSON API on a stdlib ``ThreadingHTTPServer``.

Routes (:data:`ROUTES`)::

    GET  /status             the reconciler's status plus the daemon's (loop, suspended)
    GET  /apps               per-app records            GET /apps/<name>   one (404 if unknown)
    GET  /generations        the profile's generations, newest last, current marked
    GET  /events             recent events; ?after=SEQ (only newer), ?prefix=bstore.deploy,
                             ?limit=N (the newest N)
    GET  /metrics            Prometheus text format (the only non-JSON response)
    POST /reconcile          run one pass now; 200 with its result, 409 if one is running
    POST /rollback           {"to": N} optional; 200 with the switch
    POST /suspend            stop timed (and webhook) passes; persisted across restarts
    POST /resume             resume them
    POST /hooks/git          webhook: queue an immediate pass; 202

Authentication: every POST needs ``Authorization: Bearer <token>`` (compared in constant
time); missing or wrong → 401. ``/hooks/git`` also accepts, instead of the token, a
GitHub/Gitea ``X-Hub-Signature-256: sha256=<hex>`` (or ``X-Gitea-Signature: <hex>``) HMAC
of the body when a webhook secret is configured — a forge can sign but not send a bearer
token. GETs are open: the API listens on loopback by default, and the configuration refuses
a non-loopback address without a token; what GETs show (status, versions, events with
secret-looking metadata redacted) is what ``bstore status`` shows any local user.

Every response but ``/metrics`` is JSON; errors are ``{"error": <kind>, "message": …,
"hint": …}`` with 400 (bad JSON, bad query), 401, 404 (unknown path or app), 405 (wrong
method, with ``Allow``), 409 (busy, suspended, nothing to roll back), 411 (chunked body),
413 (body over :data:`MAX_BODY`), 500 (anything else; details in the daemon's log).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from bstore.errors import BstoreError

_log = logging.getLogger("bstore.gitops.http_api")

#: Requests carry at most small JSON documents (a push payload is a few hundred KiB at
#: most); anything larger is refused before it is read.
MAX_BODY = 1 << 20
#: A client that opens a connection and sends nothing must not hold a thread forever.
REQUEST_TIMEOUT = 30.0
_EVENT_PREFIX_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*")
_APP_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")


class ApiError(BstoreError):
    """An error answered with HTTP status :attr:`status` (and ``Retry-After`` if set)."""

    status = 500
    retry_after: int | None = None


class BadRequest(ApiError):
    """The request is malformed (bad JSON, bad query value)."""

    status = 400


class Unauthorized(ApiError):
    """No or a wrong bearer token (or webhook signature)."""

    status = 401


class NotFound(ApiError):
    """No such route or app."""

    status = 404


class MethodNotAllowed(ApiError):
    """The route exists but not for this method."""

    status = 405


class Conflict(ApiError):
    """The request cannot be done in the daemon's current state (a pass runs, suspended)."""

    status = 409


class LengthRequired(ApiError):
    """A body without Content-Length (chunked): refused rather than read unbounded."""

    status = 411


class PayloadTooLarge(ApiError):
    """A body over :data:`MAX_BODY`."""

    status = 413


class Backend(Protocol):
    """What the API serves; the daemon implements it (tests may use a double)."""

    def status(self) -> dict[str, Any]:
        """The status document."""

    def apps(self) -> list[dict[str, Any]]:
        """Per-app records, each with ``name``."""

    def generations(self) -> list[dict[str, Any]]:
        """The profile's generations."""

    def recent_events(self, after: int, prefix: str | None,
                      limit: int | None) -> list[dict[str, Any]]:
        """Recent events as JSON-ready dicts, oldest first."""

    def reconcile(self, trigger: str) -> dict[str, Any]:
        """Run one pass now (raise :class:`Conflict` if one runs)."""

    def rollback(self, to: int | None) -> dict[str, Any]:
        """Switch back to generation ``to`` (default: the previous one) and activate it."""

    def suspend(self, reason: str | None) -> dict[str, Any]:
        """Suspend timed passes."""

    def resume(self) -> dict[str, Any]:
        """Resume timed passes."""

    def request_pass(self, reason: str, detail: Mapping[str, Any]) -> dict[str, Any]:
        """Queue an immediate pass (webhook)."""

    def metrics_text(self) -> bytes:
        """The Prometheus exposition."""

    @property
    def branch(self) -> str:
        """The branch followed (webhook pushes to other branches are ignored)."""


@dataclass(frozen=True)
class Request:
    """A parsed request, as the route handlers see it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON (``None`` when empty); :class:`BadRequest` if it is not."""
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"request body of {self.method} {self.path} is not valid JSON:"
                             f" {exc}", hint="send a JSON object or an empty body") from exc

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object (``{}`` when empty)."""
        data = self.json()
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise BadRequest(f"request body of {self.method} {self.path} must be a JSON"
                             f" object, got {type(data).__name__}")
        return data


@dataclass(frozen=True)
class Response:
    """A response: a JSON document, or raw bytes with a content type."""

    status: int
    document: Any = None
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        """The body bytes."""
        if self.raw is not None:
            return self.raw
        return (json.dumps(self.document, sort_keys=True, default=str) + "\n").encode()


def error_response(exc: BstoreError, status: int,
                   headers: Mapping[str, str] | None = None) -> Response:
    """The JSON form of an error."""
    return Response(status, exc.to_dict(), headers=dict(headers or {}))


Handler = Callable[["Api", Request, re.Match[str]], Response]


@dataclass(frozen=True)
class Route:
    """One route: method, full-match path pattern, handler, whether it needs the token."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: bool


# -- handlers --------------------------------------------------------------------------


def _status(api: Api, req: Request, m: re.Match[str]) -> Response:
    return Response(200, api.backend.status())


def _apps(api: Api, req: Request, m: re.Match[str]) -> Response:
    return Response(200, {"apps": api.backend.apps()})


def _app(api: Api, req: Request, m: re.Match[str]) -> Response:
    name = unquote(m["name"])
    if not _APP_NAME_RE.fullmatch(name):
        raise BadRequest(f"{name!r} is not an app name")
    for record in api.backend.apps():
        if record.get("name") == name:
            return Response(200, record)
    raise NotFound(f"no app named {name!r} in the status", hint="GET /apps lists them")


def _generations(api: Api, req: Request, m: re.Match[str]) -> Response:
    return Response(200, {"generations": api.backend.generations()})


def _int_query(req: Request, name: str, default: int | None) -> int | None:
    text = req.query.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(f"query parameter {name}={text!r} is not a non-negative integer")
    return int(text)


def _events(api: Api, req: Request, m: re.Match[str]) -> Response:
    after = _int_query(req, "after", 0) or 0
    limit = _int_query(req, "limit", None)
    prefix = req.query.get("prefix") or None
    if prefix is not None and prefix != "*" and not _EVENT_PREFIX_RE.fullmatch(prefix):
        raise BadRequest(f"query parameter prefix={prefix!r} is not a dotted event name",
                         hint="use a prefix like bstore.reconcile")
    events = api.backend.recent_events(after, None if prefix == "*" else prefix, limit)
    last = events[-1]["seq"] if events else after
    return Response(200, {"events": events, "last_seq": last})


def _metrics(api: Api, req: Request, m: re.Match[str]) -> Response:
    from bstore.gitops.metrics import CONTENT_TYPE

    return Response(200, raw=api.backend.metrics_text(), content_type=CONTENT_TYPE)


def _reconcile(api: Api, req: Request, m: re.Match[str]) -> Response:
    req.json_object()  # no parameters, but a malformed body is still an error
    return Response(200, api.backend.reconcile("api"))


def _rollback(api: Api, req: Request, m: re.Match[str]) -> Response:
    body = req.json_object()
    unknown = set(body) - {"to"}
    if unknown:
        raise BadRequest(f"unknown key {sorted(unknown)[0]!r} in POST /rollback",
                         hint='send {"to": N} or an empty body')
    to = body.get("to")
    if to is not None and (isinstance(to, bool) or not isinstance(to, int) or to < 1):
        raise BadRequest(f"'to' must be a generation number (a positive integer), got {to!r}")
    return Response(200, api.backend.rollback(to))


def _suspend(api: Api, req: Request, m: re.Match[str]) -> Response:
    body = req.json_object()
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise BadRequest(f"'reason' must be a string, got {reason!r}")
    return Response(200, api.backend.suspend(reason[:500] if reason else None))


def _resume(api: Api, req: Request, m: re.Match[str]) -> Response:
    req.json_object()
    return Response(200, api.backend.resume())


def _hook(api: Api, req: Request, m: re.Match[str]) -> Response:
    """A push webhook (GitHub/Gitea JSON, or any POST): queue an immediate pass."""
    payload = req.json() if req.headers.get("content-type", "").startswith(
        "application/json") or req.body.lstrip().startswith(b"{") else None
    detail: dict[str, Any] = {}
    if isinstance(payload, dict):
        ref = payload.get("ref")
        if isinstance(ref, str):
            detail["ref"] = ref[:200]
            wanted = f"refs/heads/{api.backend.branch}"
            if ref != wanted:
                return Response(200, {"accepted": False, "queued": False,
                                      "reason": f"push to {ref!r}, not {wanted!r}"})
        after = payload.get("after")
        if isinstance(after, str) and re.fullmatch(r"[0-9a-f]{7,64}", after):
            detail["commit"] = after
    event = req.headers.get("x-github-event") or req.headers.get("x-gitea-event")
    if event:
        detail["event"] = event[:64]
        if event == "ping":
            return Response(200, {"accepted": True, "queued": False, "reason": "ping"})
    return Response(202, api.backend.request_pass("webhook", detail))


def _r(method: str, path: str, handler: Handler, auth: bool = False) -> Route:
    return Route(method, re.compile(path), handler, auth)


#: The route table: the only place that says which path does what.
ROUTES: tuple[Route, ...] = (
    _r("GET", r"/status", _status),
    _r("GET", r"/apps", _apps),
    _r("GET", r"/apps/(?P<name>[^/]+)", _app),
    _r("GET", r"/generations", _generations),
    _r("GET", r"/events", _events),
    _r("GET", r"/metrics", _metrics),
    _r("POST", r"/reconcile", _reconcile, auth=True),
    _r("POST", r"/rollback", _rollback, auth=True),
    _r("POST", r"/suspend", _suspend, auth=True),
    _r("POST", r"/resume", _resume, auth=True),
    _r("POST", r"/hooks/git", _hook, auth=True),
)


# -- dispatch ----------------------------------------------------------------------------


def _signature_ok(secret: str, body: bytes, headers: Mapping[str, str]) -> bool:
    """A valid GitHub (``sha256=<hex>``) or Gitea (``<hex>``) HMAC-SHA256 of the body."""
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    github = headers.get("x-hub-signature-256", "")
    gitea = headers.get("x-gitea-signature", "")
    got = github[len("sha256="):] if github.startswith("sha256=") else gitea
    return bool(got) and hmac.compare_digest(expected.encode(), got.strip().lower().encode())


class Api:
    """Routes requests to a :class:`Backend`, enforcing auth; independent of sockets."""

    def __init__(self, backend: Backend, *, token: str | None,
                 webhook_secret: str | None = None) -> None:
        self.backend = backend
        self._token = token
        self._webhook_secret = webhook_secret

    def _authorised(self, req: Request, route: Route) -> None:
        if route.handler is _hook and self._webhook_secret and (
                "x-hub-signature-256" in req.headers or "x-gitea-signature" in req.headers):
            if _signature_ok(self._webhook_secret, req.body, req.headers):
                return
            raise Unauthorized("webhook signature does not match the body",
                               hint="check the webhook secret configured in the forge")
        if self._token is None:
            raise Unauthorized(f"{req.method} {req.path} needs a token but the daemon has"
                               " none configured",
                               hint="set api_token or api_token_env in bstore.toml")
        header = req.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized(f"{req.method} {req.path} needs 'Authorization: Bearer"
                               " <token>'", hint="send the API token")
        if not hmac.compare_digest(self._token.encode(), given.strip().encode()):
            raise Unauthorized("the bearer token is wrong", hint="send the API token")

    def handle(self, req: Request) -> Response:
        """Answer one request (never raises)."""
        try:
            matching = [r for r in ROUTES if r.pattern.fullmatch(req.path)]
            if not matching:
                raise NotFound(f"no such endpoint: {req.path!r}",
                               hint="see GET /status, /apps, /events, /metrics")
            for route in matching:
                m = route.pattern.fullmatch(req.path)
                if route.method == req.method and m is not None:
                    if route.auth:
                        self._authorised(req, route)
                    return route.handler(self, req, m)
            allowed = ", ".join(sorted({r.method for r in matching}))
            return error_response(
                MethodNotAllowed(f"{req.method} is not allowed on {req.path!r}",
                                 hint=f"use {allowed}"), 405, {"Allow": allowed})
        except ApiError as exc:
            headers = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="bstore"'
            return error_response(exc, exc.status, headers)
        except BstoreError as exc:
            # A failed operation the user can act on (activation failed, store missing).
            return error_response(exc, 500)
        except Exception:
            _log.exception("internal error answering %s %s", req.method, req.path)
            return error_response(BstoreError(f"internal error answering {req.method}"
                                              f" {req.path}", hint="see the daemon's log"),
                                  500)


def _handler_class(api: Api, max_body: int) -> type[BaseHTTPRequestHandler]:
    class _RequestHandler(BaseHTTPRequestHandler):
        server_version = "bstore"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = REQUEST_TIMEOUT

        def _answer(self, response: Response) -> None:
            payload = response.payload() if self.command != "HEAD" else b""
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.payload())))
            self.send_header("Cache-Control", "no-store")
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def _refuse(self, exc: ApiError) -> None:
            # The body was not read: the connection cannot carry another request.
            self.close_connection = True
            self._answer(error_response(exc, exc.status, {"Connection": "close"}))

        def _serve(self) -> None:
            split = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            headers = {k.lower(): v for k, v in self.headers.items()}
            if "transfer-encoding" in headers:
                self._refuse(LengthRequired("request bodies must have a Content-Length",
                                            hint="send the body unchunked"))
                return
            length_text = headers.get("content-length", "0")
            if not length_text.isdigit():
                self._refuse(BadRequest(f"Content-Length {length_text!r} is not a number"))
                return
            length = int(length_text)
            if length > max_body:
                self._refuse(PayloadTooLarge(
                    f"request body of {length} bytes is over the limit of {max_body} bytes"))
                return
            try:
                body = self.rfile.read(length) if length else b""
            except OSError:  # the client stalled past REQUEST_TIMEOUT or went away
                body = b""
            if len(body) != length:
                self.close_connection = True
                return
            path = split.path.rstrip("/") or "/"
            self._answer(api.handle(Request(self.command, path, query, headers, body)))

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

        def do_DELETE(self) -> None:
            self._serve()

        def do_PATCH(self) -> None:
            self._serve()

        def do_HEAD(self) -> None:
            self._serve()

        def log_message(self, format: str, *args: Any) -> None:
            _log.debug("%s %s", self.address_string(), format % args)

    return _RequestHandler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A restarted daemon must be able to bind its port while old connections linger.
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class ApiServer:
    """The API listening on ``host:port`` (port 0: a free one) in a background thread."""

    def __init__(self, backend: Backend, host: str, port: int, *, token: str | None,
                 webhook_secret: str | None = None, max_body: int = MAX_BODY) -> None:
        self.api = Api(backend, token=token, webhook_secret=webhook_secret)
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), _handler_class(self.api, max_body))
        except OSError as exc:
            raise ApiError(f"cannot listen on {host}:{port}: {exc.strerror}",
                           hint="choose another api_address (or stop what uses the port)"
                           ) from exc
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="bstore-http-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
