"""Plain ``erlc`` builds: an OTP app with only ``src/*.erl`` and ``src/<app>.app.src``.

``erlc +deterministic +debug_info -I include -o ebin src/*.erl`` in the source copy
(relative paths, so none end up in the output), dependencies visible through
``ERL_LIBS`` (for ``-include_lib`` and parse transforms); the ``.app`` is generated from
the ``.app.src`` by :func:`~bstore.builders.buildsystems.finalize.finalize`.
"""

from __future__ import annotations

from bstore.builders.buildsystems.base import BuildContext, BuiltTree
from bstore.builders.sandbox import BuildError


def run(ctx: BuildContext) -> BuiltTree:
    """Compile ``ctx.src`` with ``erlc``; the result is ``ctx.src`` itself."""
    app_src = ctx.src / "src" / f"{ctx.app_name}.app.src"
    if not app_src.is_file():
        raise BuildError(
            f"plain erlc build of {ctx.app_name!r} needs src/{ctx.app_name}.app.src",
            hint="the application name must match the .app.src file name",
        )
    sources = sorted(p.name for p in (ctx.src / "src").glob("*.erl") if p.is_file())
    (ctx.src / "ebin").mkdir(exist_ok=True)
    if sources:
        argv = [ctx.toolchain.erlc, "+deterministic", "+debug_info", "-I", "include",
                "-o", "ebin", "-pa", "ebin", *(f"src/{name}" for name in sources)]
        ctx.sandbox.run(argv, cwd=ctx.src, env={"ERL_LIBS": str(ctx.deps_dir), **ctx.env},
                        step="erlc")
    return BuiltTree(lib_dir=ctx.src, fallback=None, app_src=app_src)
