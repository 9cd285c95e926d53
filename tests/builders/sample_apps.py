"""Generators of real sample OTP applications for the build-system tests.

Each function writes a complete project under ``root`` and returns its directory:

- :func:`greeter_dep` — a rebar3 Erlang library with a public header (the Erlang dep);
- :func:`erlc_app` — only ``src/*.erl`` + ``src/<app>.app.src`` (plain erlc);
- :func:`rebar3_app` — a rebar3 app depending on ``greeter`` (header + calls + priv);
- :func:`elixir_dep` — a mix library (the Elixir dep);
- :func:`mix_app` — a mix app depending on ``greeter`` and ``exdep``;
- :func:`erlang_mk_app` — a Makefile that includes a vendored ``erlang.mk``.

``rebar_script`` lets a test add a ``rebar.config.script`` (Erlang code run by rebar3
while it reads its config) to make a build do something hostile.
"""

from __future__ import annotations

from pathlib import Path


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def greeter_dep(root: Path) -> Path:
    """rebar3 library ``greeter`` 1.0.0: ``greeter:greet(Name) -> <<"hello, Name">>``."""
    return _write(root / "greeter", {
        "rebar.config": "{erl_opts, [debug_info]}.\n{deps, []}.\n",
        "src/greeter.app.src": (
            '{application, greeter, [{description, "greets"}, {vsn, "1.0.0"},\n'
            "  {registered, []}, {applications, [kernel, stdlib]}, {env, []}]}.\n"
        ),
        "include/greeter.hrl": "-define(GREETING, <<\"hello, \">>).\n",
        "src/greeter.erl": (
            "-module(greeter).\n-export([greet/1]).\n-include(\"greeter.hrl\").\n"
            "greet(Name) when is_binary(Name) -> <<?GREETING/binary, Name/binary>>.\n"
        ),
    })


def erlc_app(root: Path, name: str = "plainapp") -> Path:
    """Plain erlc app: two modules, a private header, ``vsn`` left for bstore to set."""
    return _write(root / name, {
        f"src/{name}.app.src": (
            f'{{application, {name}, [{{description, "plain"}}, {{vsn, "0.0.0-src"}},\n'
            "  {modules, []}, {registered, []}, {applications, [kernel, stdlib]}]}.\n"
        ),
        f"include/{name}.hrl": "-define(ANSWER, 42).\n",
        f"src/{name}.erl": (
            f"-module({name}).\n-export([answer/0]).\n-include(\"{name}.hrl\").\n"
            f"answer() -> {{?ANSWER, {name}_util:double(?ANSWER)}}.\n"
        ),
        f"src/{name}_util.erl": (
            f"-module({name}_util).\n-export([double/1]).\ndouble(X) -> 2 * X.\n"
        ),
    })


def rebar3_app(root: Path, name: str = "rebarapp", rebar_script: str | None = None) -> Path:
    """rebar3 app depending on ``greeter`` (uses its header via include_lib, and priv)."""
    files = {
        "rebar.config": '{erl_opts, [debug_info]}.\n{deps, [{greeter, "1.0.0"}]}.\n',
        f"src/{name}.app.src": (
            f'{{application, {name}, [{{description, "rebar app"}}, {{vsn, git}},\n'
            "  {registered, []}, {applications, [kernel, stdlib, greeter]}]}.\n"
        ),
        f"src/{name}.erl": (
            f"-module({name}).\n-export([run/0, data/0]).\n"
            '-include_lib("greeter/include/greeter.hrl").\n'
            "run() -> {?GREETING, greeter:greet(<<\"bstore\">>)}.\n"
            f"data() -> {{ok, B}} = file:read_file(filename:join(code:priv_dir({name}), "
            '"data.txt")), B.\n'
        ),
        "priv/data.txt": "priv data\n",
    }
    if rebar_script is not None:
        files["rebar.config.script"] = rebar_script
    return _write(root / name, files)


def elixir_dep(root: Path) -> Path:
    """mix library ``exdep`` 0.2.0: ``Exdep.shout(binary)``."""
    return _write(root / "exdep", {
        "mix.exs": (
            "defmodule Exdep.MixProject do\n  use Mix.Project\n"
            '  def project, do: [app: :exdep, version: "0.2.0", elixir: "~> 1.14", deps: []]\n'
            "  def application, do: [extra_applications: []]\nend\n"
        ),
        "lib/exdep.ex": (
            'defmodule Exdep do\n  def shout(s) when is_binary(s), do: String.upcase(s) <> "!"\n'
            "end\n"
        ),
    })


def mix_app(root: Path) -> Path:
    """mix app ``mixapp`` 1.0.0 depending on ``greeter`` (Erlang, Hex-style requirement)
    and ``exdep`` (Elixir)."""
    return _write(root / "mixapp", {
        "mix.exs": (
            "defmodule Mixapp.MixProject do\n  use Mix.Project\n"
            '  def project, do: [app: :mixapp, version: "1.0.0", elixir: "~> 1.14",\n'
            "                    deps: deps()]\n"
            "  def application, do: [extra_applications: []]\n"
            '  defp deps, do: [{:greeter, "~> 1.0"}, {:exdep, "~> 0.2"}]\nend\n'
        ),
        "lib/mixapp.ex": (
            "defmodule Mixapp do\n"
            '  def run, do: Exdep.shout(:greeter.greet("mix"))\nend\n'
        ),
        "lib/mixapp/helper.ex": "defmodule Mixapp.Helper do\n  def one, do: 1\nend\n",
    })


# A small erlang.mk-compatible file, written by these tests because the real erlang.mk
# is fetched from the internet (no Debian/PyPI/npm package ships it). It implements the
# part of erlang.mk's interface bstore relies on: PROJECT, DEPS, DEPS_DIR, SKIP_DEPS,
# ERLC_OPTS, ERL_LIBS, `make app` leaving ebin/<app>.app and beams in ebin/.
ERLANG_MK_SUBSET = """\
# erlang.mk-compatible subset (bstore test fixture).
PROJECT ?= $(notdir $(CURDIR))
DEPS_DIR ?= $(CURDIR)/deps
ERLC_OPTS ?= -Werror +debug_info +warn_export_vars +warn_shadow_vars
ERL_LIBS ?= $(DEPS_DIR)
export ERL_LIBS

comma := ,
empty :=
space := $(empty) $(empty)

ERL_FILES := $(sort $(wildcard src/*.erl))
BEAM_FILES := $(patsubst src/%.erl,ebin/%.beam,$(ERL_FILES))
MODULES := $(subst $(space),$(comma),$(patsubst src/%.erl,%,$(ERL_FILES)))

.PHONY: all app deps
all:: app

deps::
ifeq ($(SKIP_DEPS),)
\t@for d in $(DEPS); do test -d "$(DEPS_DIR)/$$d" || \\
\t  { echo "erlang.mk: dependency $$d is missing from $(DEPS_DIR)" >&2; exit 1; }; done
endif

app:: deps ebin/$(PROJECT).app

ebin:
\tmkdir -p ebin

ebin/%.beam: src/%.erl | ebin
\terlc $(ERLC_OPTS) -I include -pa ebin -o ebin $<

ebin/$(PROJECT).app: $(BEAM_FILES) src/$(PROJECT).app.src | ebin
\tsed 's/{modules, *\\[\\]}/{modules, [$(MODULES)]}/' src/$(PROJECT).app.src > $@
"""


def erlang_mk_app(root: Path, name: str = "mkapp", extra_make: str = "") -> Path:
    """erlang.mk project depending on ``greeter``, with ``erlang.mk`` vendored."""
    return _write(root / name, {
        "Makefile": (
            f"PROJECT = {name}\nPROJECT_VERSION = 0.3.0\nDEPS = greeter\n"
            f"{extra_make}\ninclude erlang.mk\n"
        ),
        "erlang.mk": ERLANG_MK_SUBSET,
        f"src/{name}.app.src": (
            f'{{application, {name}, [{{description, "mk app"}}, {{vsn, "0.3.0"}},\n'
            "  {modules, []}, {registered, []}, {applications, [kernel, stdlib, greeter]}]}.\n"
        ),
        f"src/{name}.erl": (
            f"-module({name}).\n-export([run/0]).\n"
            '-include_lib("greeter/include/greeter.hrl").\n'
            f"run() -> {{?GREETING, greeter:greet(<<\"make\">>), {name}_two:two()}}.\n"
        ),
        f"src/{name}_two.erl": f"-module({name}_two).\n-export([two/0]).\ntwo() -> 2.\n",
        "priv/mk.txt": "mk\n",
    })


def mix_app_compile_time_transitive(root: Path) -> Path:
    """mix app ``mixtrans`` that names only ``exdep`` in mix.exs but calls ``greeter``
    (a dependency of the closure, not of mix.exs) while it compiles."""
    return _write(root / "mixtrans", {
        "mix.exs": (
            "defmodule Mixtrans.MixProject do\n  use Mix.Project\n"
            '  def project, do: [app: :mixtrans, version: "0.1.0", elixir: "~> 1.14",\n'
            '                    deps: [{:exdep, "~> 0.2"}]]\n'
            "  def application, do: [extra_applications: []]\nend\n"
        ),
        "lib/mixtrans.ex": (
            "defmodule Mixtrans do\n"
            '  @greeting :greeter.greet("compile time")\n'
            "  def greeting, do: Exdep.shout(@greeting)\nend\n"
        ),
    })
