"""Helpers for the activator tests: small OTP apps compiled with the real ``erlc``,
registered as build outputs in a real store, and generation manifests made from them.

Each test app ``<n>`` has a stateful gen_server (``<n>_srv``: ``version()``, state kept
by ``code_change/3``, which counts upgrades), a helper process looping in ``<n>_tcp``'s
code (a TCP/HTTP endpoint on the ``port`` env key, 0 = none; it answers
``HTTP/1.0 <http_status>`` with ``<version> <tcp_variant>``), and ``config_change/3``.
The app writes what the tests observe into files under its ``dir`` env key:
``<n>.state`` (``{SrvPid, Version, State}``), ``<n>.change`` (config_change arguments).
Env ``crash_after`` (ms) makes the server crash repeatedly (a crash loop); ``hog`` (MB)
makes it allocate that much memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

from bstore.generations.generation import AppBuild, make_manifest
from bstore.generations.manifest import GenerationManifest
from bstore.specs.model import (
    AppSpec,
    HealthSpec,
    IconSpec,
    Isolation,
    SourceSpec,
    SourceType,
    VmConfig,
)
from bstore.specs.terms.model import Atom, Term
from bstore.store.local import LocalStore
from bstore.store.paths import PathKind, StorePath

APP_MOD = """\
-module(@N@_app).
-behaviour(application).
-export([start/2, stop/1, config_change/3]).
start(_Type, _Args) -> @N@_sup:start_link().
stop(_State) -> ok.
config_change(Changed, New, Removed) ->
    {ok, Dir} = application:get_env(@N@, dir),
    ok = file:write_file(filename:join(Dir, "@N@.change"),
                         io_lib:format("~p.~n", [{Changed, New, Removed}]), [append]).
"""

SUP_MOD = """\
-module(@N@_sup).
-behaviour(supervisor).
-export([start_link/0, init/1]).
start_link() -> supervisor:start_link({local, @N@_sup}, ?MODULE, []).
init([]) ->
    {ok, {#{strategy => one_for_one, intensity => 3, period => 10},
          [#{id => srv, start => {@N@_srv, start_link, []}, modules => [@N@_srv]}]}}.
"""

SRV_MOD = """\
-module(@N@_srv).
-behaviour(gen_server).
-vsn("@V@").
-export([start_link/0, version/0, check/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, code_change/3]).
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).
version() -> @V@.
check() -> application:get_env(@N@, check_result, ok).
init([]) ->
    case application:get_env(@N@, port, 0) of
        0 -> ok;
        Port -> @N@_tcp:start(Port)
    end,
    case application:get_env(@N@, crash_after, 0) of
        0 -> ok;
        Ms -> erlang:send_after(Ms, self(), crash)
    end,
    case application:get_env(@N@, hog, 0) of
        0 -> ok;
        _ -> erlang:send_after(300, self(), hog)
    end,
    S = #{id => erlang:unique_integer([positive]), upgrades => 0},
    publish(S),
    {ok, S}.
handle_call(state, _From, S) -> {reply, S, S}.
handle_cast(_, S) -> {noreply, S}.
handle_info(crash, _S) -> erlang:error(crash_loop);
handle_info(hog, S) ->
    {ok, Mb} = application:get_env(@N@, hog),
    Hog = [binary:copy(<<7>>, 1024 * 1024) || _ <- lists:seq(1, Mb)],
    {noreply, S#{hog => Hog}};
handle_info(_, S) -> {noreply, S}.
code_change(_Old, S, _Extra) ->
    S2 = S#{upgrades => maps:get(upgrades, S) + 1},
    publish(S2),
    {ok, S2}.
publish(S) ->
    {ok, Dir} = application:get_env(@N@, dir),
    ok = file:write_file(filename:join(Dir, "@N@.state"),
                         io_lib:format("~p.~n", [{self(), version(), maps:without([hog], S)}])).
"""

TCP_MOD = """\
-module(@N@_tcp).
-export([start/1, tcp_variant/0]).
tcp_variant() -> @T@.
start(Port) ->
    Self = self(),
    Pid = spawn_link(fun() ->
        {ok, L} = gen_tcp:listen(Port, [binary, {ip, {127,0,0,1}}, {reuseaddr, true},
                                        {active, false}]),
        Self ! {listening, self()},
        loop(L)
    end),
    receive {listening, Pid} -> ok after 5000 -> erlang:error(no_listener) end.
loop(L) ->
    {ok, S} = gen_tcp:accept(L),
    _ = gen_tcp:recv(S, 0, 1000),
    Status = application:get_env(@N@, http_status, 200),
    Body = io_lib:format("~p ~p~n", [@N@_srv:version(), tcp_variant()]),
    Head = io_lib:format("HTTP/1.0 ~p X\\r\\nContent-Length: ~p\\r\\nConnection: close\\r\\n\\r\\n",
                         [Status, iolist_size(Body)]),
    _ = gen_tcp:send(S, [Head, Body]),
    gen_tcp:close(S),
    loop(L).
"""

APP_FILE = """\
{application, @N@,
 [{vsn, "@VSN@"}, {description, "bstore activator test app"},
  {modules, [@N@_app, @N@_sup, @N@_srv, @N@_tcp]},
  {registered, [@N@_sup, @N@_srv]},
  {applications, [kernel, stdlib]},
  {mod, {@N@_app, []}},
  {env, []}]}.
"""


class AppCompiler:
    """Compiles ``(name, version, variant, tcp_variant)`` once per session."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._done: dict[tuple[str, str, int, int], Path] = {}

    def ebin(self, name: str, version: str, variant: int, tcp_variant: int = 1) -> Path:
        """An ``ebin`` with the app's ``.beam`` files and ``.app`` (compiled on first use)."""
        key = (name, version, variant, tcp_variant)
        if key not in self._done:
            src = self.base / f"{name}-{version}-{variant}-{tcp_variant}"
            ebin = src / "ebin"
            ebin.mkdir(parents=True)
            files = {f"{name}_app.erl": APP_MOD, f"{name}_sup.erl": SUP_MOD,
                     f"{name}_srv.erl": SRV_MOD, f"{name}_tcp.erl": TCP_MOD}
            for fname, text in files.items():
                (src / fname).write_text(text.replace("@N@", name).replace("@V@", str(variant))
                                         .replace("@T@", str(tcp_variant)))
            # +deterministic: an unchanged module compiles to the same bytes in every
            # variant, so only the modules that really changed differ in the manifest.
            subprocess.run(["erlc", "+deterministic", "-o", str(ebin),
                            *(str(src / f) for f in files)], check=True, capture_output=True)
            (ebin / f"{name}.app").write_text(APP_FILE.replace("@N@", name)
                                              .replace("@VSN@", version))
            self._done[key] = ebin
        return self._done[key]


def charlist(text: str) -> list[Term]:
    """An Erlang string (list of character codes)."""
    return [ord(c) for c in text]


def register_output(store: LocalStore, name: str, version: str, ebin: Path) -> StorePath:
    """Register ``ebin`` as the build output ``lib/<name>-<version>/ebin``."""
    with store.staging_dir("act-test") as stage:
        tree = stage / "out"
        shutil.copytree(ebin, tree / "lib" / f"{name}-{version}" / "ebin")
        digest = blake3.blake3()
        for f in sorted(ebin.iterdir()):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        digest.update(f"{name}-{version}".encode())
        return store.register_tree(tree, f"{name}-{version}", kind=PathKind.OUTPUT,
                                   hash_hex=digest.hexdigest(), references=[])


@dataclass(frozen=True)
class AppDef:
    """One app of a test generation."""

    name: str
    version: str = "1.0.0"
    variant: int = 1
    tcp_variant: int = 1
    env: Mapping[str, Term] | None = None
    health: HealthSpec | None = None
    vm: VmConfig | None = None
    depends_on: tuple[str, ...] = ()


def generation(store: LocalStore, compiler: AppCompiler, workdir: Path,
               apps: Sequence[AppDef]) -> GenerationManifest:
    """A real manifest of ``apps`` (outputs registered in ``store``); every app's env
    gets ``dir`` = ``workdir`` for its observation files."""
    builds = []
    for a in apps:
        ebin = compiler.ebin(a.name, a.version, a.variant, a.tcp_variant)
        out = register_output(store, a.name, a.version, ebin)
        env = {Atom("dir"): charlist(str(workdir)),
               **{Atom(k): v for k, v in (a.env or {}).items()}}
        spec = AppSpec(name=a.name, version=a.version,
                       source=SourceSpec(SourceType.HEX, ref=a.version),
                       icon=IconSpec.identicon(a.name), env=env, depends_on=a.depends_on,
                       isolation=Isolation.VM if a.vm is not None else Isolation.EMBEDDED,
                       vm_config=a.vm, health=a.health)
        builds.append(AppBuild(spec, out))
    return make_manifest(store, builds)


_STATE_RE = re.compile(r"\{(<[\d.]+>),(\d+),#\{(.*)\}\}\.\n")


def read_state(workdir: Path, app: str) -> tuple[str, int, dict[str, int]]:
    """(server pid, version, state) as the app's server last published them."""
    text = (workdir / f"{app}.state").read_text()
    m = _STATE_RE.fullmatch(text)
    assert m, text
    fields = dict(re.findall(r"(\w+) => (\d+)", m.group(3)))
    return m.group(1), int(m.group(2)), {k: int(v) for k, v in fields.items()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int) -> tuple[int, str]:
    """(status, body) of ``GET /`` on 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def short_root() -> Path:
    """A short state root (agent socket paths must stay under 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="bsa", dir="/tmp"))


class Epmd:
    """An epmd on a free loopback port, started and killed by the test (by pid)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(["epmd", "-address", "127.0.0.1", "-port",
                                      str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def listening_sockets(pid: int) -> list[str]:
    """``ip:port`` of every TCP socket ``pid`` listens on (from /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                addr, port = cols[1].split(":")
                found.append(f"{_ip(addr)}:{int(port, 16)}")
    return found


def _ip(hex_addr: str) -> str:
    if len(hex_addr) == 8:
        return ".".join(str(int(hex_addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return "ipv6:" + hex_addr


def all_cmdlines() -> Iterator[bytes]:
    """Every readable ``/proc/*/cmdline``."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                yield (p / "cmdline").read_bytes()
            except OSError:
                continue


def dump(obj: object) -> str:
    """Compact JSON (for messages)."""
    return json.dumps(obj, default=str)
