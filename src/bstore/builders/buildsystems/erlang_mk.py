"""erlang.mk builds: ``make app`` with the dependencies already in ``DEPS_DIR``.

erlang.mk itself is a Makefile that projects commit next to their ``Makefile``
(``include erlang.mk``); it is normally bootstrapped from the internet, which a
hermetic build cannot do, so only projects that vendor ``erlang.mk`` are built. Each
dependency appears as ``DEPS_DIR/<name>`` (erlang.mk's layout) and ``SKIP_DEPS=1``
tells erlang.mk not to fetch or rebuild them. ``DEPS_DIR`` is passed relative to the
project so no absolute path of ours is pasted into make's shell recipes.
"""

from __future__ import annotations

from bstore.builders.buildsystems.base import BuildContext, BuiltTree
from bstore.builders.sandbox import BuildError


def run(ctx: BuildContext) -> BuiltTree:
    """``make app`` in ``ctx.src``; erlang.mk leaves ``ebin`` in the project root."""
    make = ctx.toolchain.require("make")
    if not (ctx.src / "erlang.mk").is_file():
        raise BuildError(
            f"erlang.mk project {ctx.app_name!r} does not vendor erlang.mk",
            hint="commit erlang.mk next to the Makefile: builds are offline and cannot "
            "download it",
        )
    deps_dir = ctx.work_dir / "erlang-mk-deps"
    deps_dir.mkdir()
    for dep in ctx.deps:
        (deps_dir / dep.name).symlink_to(dep.lib_dir, target_is_directory=True)
    env = {**ctx.env, "ERL_LIBS": str(deps_dir)}
    argv = [make, "--no-print-directory", "app", "DEPS_DIR=../erlang-mk-deps", "SKIP_DEPS=1"]
    ctx.sandbox.run(argv, cwd=ctx.src, env=env, step="make app (erlang.mk)")
    return BuiltTree(lib_dir=ctx.src, app_src=ctx.src / "src" / f"{ctx.app_name}.app.src")
