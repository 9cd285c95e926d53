"""mix builds: ``mix compile --no-deps-check`` with dependencies in ``_build/prod/lib``.

Each dependency is linked as ``_build/prod/lib/<name>`` (where mix looks for a built
dependency's ``ebin``). mix still *loads* the dependency list of ``mix.exs``, and a Hex
dependency (``{:jason, "~> 1.4"}``) needs an SCM that accepts it — normally Hex, which
is not installed and must not be. So the build gets two tiny modules on ``MIX_PATH``:
a stand-in ``Hex`` whose ``start/0`` registers ``Bstore.OfflineSCM``, an SCM that
accepts any remaining dependency, says it is present, and refuses to fetch. mix then
validates each dependency's ``.app`` in ``_build`` and compiles only the project.
"""

from __future__ import annotations

import shutil

from bstore.builders.buildsystems.base import BuildContext, BuiltTree

# Module names are Elixir aliases; the file names must match them for the code server.
_HEX_STANDIN = """\
-module('Elixir.Hex').
-export([start/0, version/0]).
%% mix calls Hex.start/0 when no SCM accepts a dependency; register ours instead.
start() -> 'Elixir.Mix.SCM':append('Elixir.Bstore.OfflineSCM'), ok.
version() -> <<"2.0.0">>.
"""

_OFFLINE_SCM = """\
-module('Elixir.Bstore.OfflineSCM').
-export(['fetchable?'/0, format/1, format_lock/1, accepts_options/2, 'checked_out?'/1,
         lock_status/1, 'equal?'/2, managers/1, checkout/1, update/1]).
%% Dependencies come built from the bstore store: present, never fetched.
'fetchable?'() -> false.
format(_Opts) -> <<"bstore store">>.
format_lock(_Opts) -> nil.
accepts_options(_App, Opts) -> Opts.
'checked_out?'(_Opts) -> true.
lock_status(_Opts) -> ok.
'equal?'(_A, _B) -> true.
managers(_Opts) -> [].
checkout(Opts) -> erlang:error({bstore_offline_dependency, Opts}).
update(Opts) -> erlang:error({bstore_offline_dependency, Opts}).
"""


def _write_standins(ctx: BuildContext) -> str:
    shim = ctx.work_dir / "mix-offline"
    ebin = shim / "ebin"
    ebin.mkdir(parents=True)
    (shim / "Elixir.Hex.erl").write_text(_HEX_STANDIN, encoding="utf-8")
    (shim / "Elixir.Bstore.OfflineSCM.erl").write_text(_OFFLINE_SCM, encoding="utf-8")
    ctx.sandbox.run(
        [ctx.toolchain.erlc, "-o", "ebin", "Elixir.Hex.erl", "Elixir.Bstore.OfflineSCM.erl"],
        cwd=shim, step="compile the offline mix SCM",
    )
    return str(ebin)


def run(ctx: BuildContext) -> BuiltTree:
    """``mix compile`` in ``ctx.src``; the result is ``_build/prod/lib/<app>``."""
    mix = ctx.toolchain.require("mix")
    # Whatever _build the source carries is stale by definition: start from nothing.
    shutil.rmtree(ctx.src / "_build", ignore_errors=True)
    lib = ctx.src / "_build" / "prod" / "lib"
    lib.mkdir(parents=True)
    for dep in ctx.deps:
        (lib / dep.name).symlink_to(dep.lib_dir, target_is_directory=True)
    env = {
        **ctx.env,
        "MIX_PATH": _write_standins(ctx),
        # mix puts only the deps that mix.exs names on the code path; the rest of the
        # closure (deps of deps, which mix cannot see here) comes through ERL_LIBS.
        "ERL_LIBS": str(ctx.deps_dir),
        "MIX_HOME": str(ctx.sandbox.home / ".mix"),
        "HEX_HOME": str(ctx.sandbox.home / ".hex"),
    }
    ctx.sandbox.run(
        [mix, "compile", "--no-deps-check", "--no-archives-check",
         "--no-protocol-consolidation"],
        cwd=ctx.src, env=env, step="mix compile",
    )
    return BuiltTree(lib_dir=lib / ctx.app_name, fallback=ctx.src)
