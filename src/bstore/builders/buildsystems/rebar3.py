"""rebar3 builds, the way mix builds rebar dependencies: ``rebar3 bare compile``.

``bare compile`` compiles only the project in the current directory into
``REBAR_BARE_COMPILER_OUTPUT_DIR`` and never resolves or fetches the ``deps`` of
``rebar.config`` — exactly what a hermetic build needs. The already-built dependencies
are on the code path through ``ERL_LIBS`` (so ``-include_lib`` and parse transforms
from them work); ``--paths`` is left empty because rebar3 splits it on spaces and puts
it ahead of rebar3's own modules.
"""

from __future__ import annotations

import shutil

from bstore.builders.buildsystems.base import BuildContext, BuiltTree


def run(ctx: BuildContext) -> BuiltTree:
    """``rebar3 bare compile`` in ``ctx.src``; the result is the bare output dir."""
    rebar3 = ctx.toolchain.require("rebar3")
    # A _build committed to the source (or left by a developer) must not be reused.
    shutil.rmtree(ctx.src / "_build", ignore_errors=True)
    out = ctx.work_dir / "rebar3-out" / ctx.app_name
    out.mkdir(parents=True)
    # rebar3 looks for the app's headers (and priv) in the output dir, where a normal
    # build links them; link them the same way (mix does this for rebar deps too).
    for sub in ("include", "priv"):
        if (ctx.src / sub).is_dir():
            (out / sub).symlink_to(ctx.src / sub, target_is_directory=True)
    env = {
        **ctx.env,
        "REBAR_BARE_COMPILER_OUTPUT_DIR": str(out),
        "ERL_LIBS": str(ctx.deps_dir),
        "REBAR_CACHE_DIR": str(ctx.sandbox.home / ".cache" / "rebar3"),
        "REBAR_GLOBAL_CONFIG_DIR": str(ctx.sandbox.home / ".config" / "rebar3"),
    }
    ctx.sandbox.run([rebar3, "bare", "compile", "--paths", ""], cwd=ctx.src, env=env,
                    step="rebar3 bare compile")
    return BuiltTree(lib_dir=out)
