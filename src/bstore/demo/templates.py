"""The demo's example apps and their specs, as text.

Three OTP applications, each a git repository of its own, and one spec per app in the
three spec formats:

- ``counter``: Erlang, rebar3, an HTTP counter on loopback built on ``gen_tcp`` only
  (no dependencies), with ``GET /`` (counts visits) and ``GET /health``. Its versions
  differ in what ``/`` answers and, for the broken one, in ``/health`` answering 500.
- ``hello_ex``: Elixir, mix, no dependencies: a GenServer counting ticks, with a custom
  health check module; it starts after ``counter`` (``depends_on``).
- ``worker``: Erlang, plain ``erlc`` layout, run with ``isolation => vm`` in a BEAM VM
  of its own (one scheduler, a memory limit); answers ``ping`` on a TCP port.

Everything is a pure function of its parameters (version, ports, URLs), so a test can
render and inspect it without a disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: Files of one source tree: relative path -> text.
Files = dict[str, str]


@dataclass(frozen=True)
class CounterVersion:
    """One release of the counter: its version, the greeting ``GET /`` answers with,
    and the HTTP status its ``/health`` endpoint answers."""

    version: str
    greeting: str
    health_status: str = "200 OK"

    def __post_init__(self) -> None:
        for text in (self.version, self.greeting, self.health_status):
            if '"' in text or "\\" in text or "\n" in text:
                raise ValueError(f"{text!r} cannot be put in an Erlang string literal")


#: The counter's releases the demo walks through: deploy, upgrade, broken upgrade.
COUNTER_V1 = CounterVersion("1.0.0", "hello from the counter")
COUNTER_V2 = CounterVersion("1.1.0", "hello again, from the upgraded counter")
COUNTER_BROKEN = CounterVersion("1.2.0", "this release is broken", "500 Internal Server Error")

HELLO_VERSION = "0.1.0"
WORKER_VERSION = "0.1.0"
#: The worker VM's limits (MB, schedulers).
WORKER_MEMORY_MB = 256
WORKER_SCHEDULERS = 1


def counter_sources(release: CounterVersion) -> Files:
    """The rebar3 project of ``counter`` at ``release``."""
    return {
        "rebar.config": "{erl_opts, [debug_info]}.\n{deps, []}.\n",
        "src/counter.app.src": (
            "{application, counter,\n"
            ' [{description, "HTTP counter using only OTP (gen_tcp)"},\n'
            f'  {{vsn, "{release.version}"}},\n'
            "  {registered, [counter_sup]},\n"
            "  {applications, [kernel, stdlib]},\n"
            "  {mod, {counter_app, []}},\n"
            "  {env, [{port, 8080}]}]}.\n"
        ),
        "src/counter_app.erl": (
            "-module(counter_app).\n-behaviour(application).\n-export([start/2, stop/1]).\n\n"
            "start(_Type, _Args) -> counter_sup:start_link().\n\n"
            "stop(_State) -> ok.\n"
        ),
        "src/counter_sup.erl": (
            "-module(counter_sup).\n-behaviour(supervisor).\n-export([start_link/0, init/1]).\n\n"
            "start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).\n\n"
            "init([]) ->\n"
            "    Http = #{id => counter_http, start => {counter_http, start_link, []}},\n"
            "    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, [Http]}}.\n"
        ),
        "src/counter_http.erl": _COUNTER_HTTP.replace("@GREETING@", release.greeting)
        .replace("@HEALTH@", release.health_status),
    }


# A minimal HTTP/1.1 server: one acceptor process owning the listen socket (so the socket
# goes away with the application), one short-lived process per connection.
_COUNTER_HTTP = """\
-module(counter_http).
-export([start_link/0, init/1]).

-define(GREETING, "@GREETING@").
-define(HEALTH, "@HEALTH@").

start_link() -> proc_lib:start_link(?MODULE, init, [self()]).

init(Parent) ->
    {ok, Port} = application:get_env(counter, port),
    Opts = [binary, {packet, http_bin}, {active, false}, {reuseaddr, true},
            {ip, {127, 0, 0, 1}}],
    case gen_tcp:listen(Port, Opts) of
        {ok, Listen} ->
            Visits = counters:new(1, []),
            proc_lib:init_ack(Parent, {ok, self()}),
            accept(Listen, Visits);
        {error, Reason} ->
            proc_lib:init_ack(Parent, {error, {listen, Port, Reason}})
    end.

accept(Listen, Visits) ->
    {ok, Sock} = gen_tcp:accept(Listen),
    Pid = spawn(fun() -> receive go -> serve(Sock, Visits) end end),
    ok = gen_tcp:controlling_process(Sock, Pid),
    Pid ! go,
    accept(Listen, Visits).

serve(Sock, Visits) ->
    case gen_tcp:recv(Sock, 0, 5000) of
        {ok, {http_request, _Method, {abs_path, Path}, _Version}} ->
            ok = skip_headers(Sock),
            respond(Sock, route(Path, Visits));
        _ ->
            ok
    end,
    gen_tcp:close(Sock).

skip_headers(Sock) ->
    case gen_tcp:recv(Sock, 0, 5000) of
        {ok, {http_header, _, _, _, _}} -> skip_headers(Sock);
        _ -> ok
    end.

route(<<"/health">>, _Visits) ->
    {?HEALTH, "health: " ?HEALTH "\\n"};
route(<<"/">>, Visits) ->
    ok = counters:add(Visits, 1, 1),
    {ok, Vsn} = application:get_key(counter, vsn),
    {"200 OK", io_lib:format("~s (counter ~s), visit #~b~n",
                             [?GREETING, Vsn, counters:get(Visits, 1)])};
route(_Path, _Visits) ->
    {"404 Not Found", "not found\\n"}.

respond(Sock, {Status, Body0}) ->
    Body = iolist_to_binary(Body0),
    gen_tcp:send(Sock, ["HTTP/1.1 ", Status, "\\r\\n",
                        "content-type: text/plain\\r\\n",
                        "content-length: ", integer_to_list(byte_size(Body)), "\\r\\n",
                        "connection: close\\r\\n\\r\\n", Body]).
"""


def hello_sources() -> Files:
    """The mix project of ``hello_ex`` (Elixir, no dependencies)."""
    return {
        "mix.exs": (
            "defmodule HelloEx.MixProject do\n"
            "  use Mix.Project\n\n"
            "  def project do\n"
            f'    [app: :hello_ex, version: "{HELLO_VERSION}", elixir: "~> 1.14", deps: []]\n'
            "  end\n\n"
            "  def application do\n"
            "    [mod: {HelloEx.Application, []}, extra_applications: []]\n"
            "  end\n"
            "end\n"
        ),
        "lib/hello_ex/application.ex": (
            "defmodule HelloEx.Application do\n"
            "  @moduledoc \"Starts the ticker under a supervisor.\"\n"
            "  use Application\n\n"
            "  @impl true\n"
            "  def start(_type, _args) do\n"
            "    Supervisor.start_link([HelloEx.Ticker], strategy: :one_for_one,\n"
            "                          name: HelloEx.Supervisor)\n"
            "  end\n"
            "end\n"
        ),
        "lib/hello_ex/ticker.ex": (
            "defmodule HelloEx.Ticker do\n"
            "  @moduledoc \"Counts seconds since it started; says hello in its state.\"\n"
            "  use GenServer\n\n"
            "  def start_link(_arg), do: GenServer.start_link(__MODULE__, 0, name: __MODULE__)\n"
            "  def ticks, do: GenServer.call(__MODULE__, :ticks)\n\n"
            "  @impl true\n"
            "  def init(n) do\n"
            "    :timer.send_interval(1000, :tick)\n"
            "    {:ok, n}\n"
            "  end\n\n"
            "  @impl true\n"
            "  def handle_info(:tick, n), do: {:noreply, n + 1}\n\n"
            "  @impl true\n"
            "  def handle_call(:ticks, _from, n), do: {:reply, n, n}\n"
            "end\n"
        ),
        # An Erlang-style module name: the health spec names it as a plain atom.
        "lib/hello_ex/health.ex": (
            "defmodule :hello_ex_health do\n"
            "  @moduledoc \"bstore's custom health check: the ticker answers.\"\n"
            "  def check do\n"
            "    if is_integer(HelloEx.Ticker.ticks()), do: :ok, else: :error\n"
            "  end\n"
            "end\n"
        ),
    }


def worker_sources() -> Files:
    """The plain ``erlc`` project of ``worker`` (``src/`` only, no build tool file)."""
    return {
        "src/worker.app.src": (
            "{application, worker,\n"
            ' [{description, "Answers ping on TCP, in a VM of its own"},\n'
            f'  {{vsn, "{WORKER_VERSION}"}},\n'
            "  {modules, []},\n"
            "  {registered, [worker]},\n"
            "  {applications, [kernel, stdlib]},\n"
            "  {mod, {worker, []}},\n"
            "  {env, [{port, 8090}]}]}.\n"
        ),
        "src/worker.erl": _WORKER,
    }


_WORKER = """\
-module(worker).
-behaviour(application).
-behaviour(supervisor).
-export([start/2, stop/1, init/1, listener/1]).

start(_Type, _Args) -> supervisor:start_link({local, worker}, ?MODULE, []).

stop(_State) -> ok.

init([]) ->
    Listener = #{id => listener, start => {proc_lib, start_link, [?MODULE, listener, [self()]]}},
    {ok, {#{strategy => one_for_one}, [Listener]}}.

listener(Parent) ->
    {ok, Port} = application:get_env(worker, port),
    Opts = [binary, {packet, line}, {active, false}, {reuseaddr, true}, {ip, {127, 0, 0, 1}}],
    case gen_tcp:listen(Port, Opts) of
        {ok, Listen} ->
            proc_lib:init_ack(Parent, {ok, self()}),
            accept(Listen);
        {error, Reason} ->
            proc_lib:init_ack(Parent, {error, {listen, Port, Reason}})
    end.

accept(Listen) ->
    {ok, Sock} = gen_tcp:accept(Listen),
    _ = case gen_tcp:recv(Sock, 0, 5000) of
        {ok, _Line} ->
            gen_tcp:send(Sock, io_lib:format("pong from ~s (~b scheduler(s))~n",
                                             [node(), erlang:system_info(schedulers)]));
        _ ->
            ok
    end,
    gen_tcp:close(Sock),
    accept(Listen).
"""


@dataclass(frozen=True)
class Ports:
    """The loopback ports the demo's apps listen on (probed free)."""

    counter: int
    worker: int

    def __post_init__(self) -> None:
        for port in (self.counter, self.worker):
            if not 1024 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1024-65535")
        if self.counter == self.worker:
            raise ValueError(f"the counter and the worker were given the same port {self.counter}")


def counter_spec(url: str, release: CounterVersion, ports: Ports) -> str:
    """``apps/counter/app.config`` (Erlang terms) for ``release``."""
    return (
        "%% An Erlang rebar3 HTTP counter, built from its git repository at a tag.\n"
        "#{name => counter,\n"
        f'  version => <<"{release.version}">>,\n'
        '  description => <<"HTTP counter using only OTP">>,\n'
        f'  source => #{{type => git, url => <<"{url}">>, ref => <<"v{release.version}">>}},\n'
        f"  env => #{{port => {ports.counter}}},\n"
        f'  health => #{{type => http, port => {ports.counter}, path => <<"/health">>,\n'
        "              interval => 5000, timeout => 3000}}.\n"
    )


def hello_spec(url: str) -> str:
    """``apps/hello_ex/app.yaml``: the Elixir app, started after the counter."""
    return (
        "# An Elixir mix app; bstore starts it after the counter.\n"
        "name: hello_ex\n"
        f"version: '{HELLO_VERSION}'\n"
        "description: Elixir ticker with a custom health check\n"
        f"source: {{type: git, url: '{url}', ref: 'v{HELLO_VERSION}'}}\n"
        "depends_on: [counter]\n"
        "health: {type: custom, module: hello_ex_health, timeout: 3000}\n"
    )


def worker_spec(url: str, ports: Ports) -> str:
    """``apps/worker/app.json``: the app that runs in a BEAM VM of its own."""
    spec = {
        "name": "worker",
        "version": WORKER_VERSION,
        "description": "Answers ping on TCP, in its own VM",
        "source": {"type": "git", "url": url, "ref": f"v{WORKER_VERSION}"},
        "env": {"port": ports.worker},
        "isolation": "vm",
        "vm_config": {"memory_limit": WORKER_MEMORY_MB, "scheduler_limit": WORKER_SCHEDULERS},
        "health": {"type": "tcp", "port": ports.worker, "timeout": 3000},
    }
    return json.dumps(spec, indent=2) + "\n"


def config_toml(repo_url: str, profile: str) -> str:
    """The demo's ``bstore.toml``."""
    return (
        "# bstore's configuration for the demo (see bstore reconcile --help).\n"
        f"repo_url = {json.dumps(repo_url)}\n"
        'branch = "main"\n'
        'apps_dir = "apps"\n'
        f"profile = {json.dumps(profile)}\n"
        'activator = "embedded"\n'
        'reconcile_interval = "5s"\n'
        "\n[health]\n"
        'timeout = "3s"\n'
    )
