"""The last step of every build: a correct ``.app`` and path-free debug info.

Over the staged lib dir:

- ``ebin/<app>.app`` (or, when the build system writes none, ``src/<app>.app.src``) is
  read with :func:`bstore.specs.terms.consult` (``file:consult/1`` semantics), gets
  ``vsn`` = the spec's version and ``modules`` = exactly the ``.beam`` files in ``ebin``
  (sorted), and is written back deterministically;
- any debug-info chunk that mentions the build directory (Elixir records the absolute
  source path there; Erlang's ``deterministic`` option already strips it) is rewritten
  by one short ``erl`` in the sandbox to name ``/build/<app>-<vsn>`` instead, so two
  builds of the same source in different directories give byte-identical ``.beam``
  files. The same ``erl`` writes the ``.app`` (``file:consult/1``, ``~tp``) in the rare
  case the Python term model cannot represent it (e.g. a map with list keys).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from bstore.builders.buildsystems.base import CANONICAL_BUILD_PREFIX, BuildContext
from bstore.builders.sandbox import BuildError
from bstore.specs.terms import (
    Atom,
    Term,
    TermFormatError,
    TermReadError,
    TermSyntaxError,
    consult,
)
from bstore.specs.terms import format as format_term

# Arguments come through init:get_plain_arguments/0 (after -extra), never through a
# shell or string interpolation. Exit status 3 = a problem with the app's files.
_FINALIZE_ERL = r"""
Main = fun() ->
  [LibDir, AppS, Vsn, AppSrc, Prefix, Canon, DoApp] = init:get_plain_arguments(),
  App = list_to_atom(AppS),
  Ebin = filename:join(LibDir, "ebin"),
  Beams = lists:sort(filelib:wildcard("*.beam", Ebin)),
  PB = unicode:characters_to_binary(Prefix),
  CB = unicode:characters_to_binary(Canon),
  Fix = fun Fix(T) when is_binary(T) ->
                case binary:match(T, PB) of
                  nomatch -> T;
                  _ -> binary:replace(T, PB, CB, [global])
                end;
            Fix(T) when is_list(T), T =/= [] ->
                case io_lib:printable_unicode_list(T) of
                  true ->
                    case string:find(T, Prefix) of
                      nomatch -> T;
                      _ -> unicode:characters_to_list(string:replace(T, Prefix, Canon, all))
                    end;
                  false -> [Fix(hd(T)) | Fix(tl(T))]
                end;
            Fix(T) when is_tuple(T) -> list_to_tuple(Fix(tuple_to_list(T)));
            Fix(T) when is_map(T) -> maps:from_list(Fix(maps:to_list(T)));
            Fix(T) -> T
        end,
  Mods = [begin
            File = filename:join(Ebin, B),
            Mod = list_to_atom(filename:basename(B, ".beam")),
            {ok, Mod, Chunks} = beam_lib:all_chunks(File),
            case lists:keyfind("Dbgi", 1, Chunks) of
              {_, <<131, _/binary>> = Bin} ->
                Term = binary_to_term(Bin),
                case Fix(Term) of
                  Term -> ok;
                  New ->
                    Opts = case Bin of
                             <<131, 80, _/binary>> -> [deterministic, compressed];
                             _ -> [deterministic]
                           end,
                    Chunks1 = lists:keyreplace("Dbgi", 1, Chunks,
                                               {"Dbgi", term_to_binary(New, Opts)}),
                    {ok, Beam} = beam_lib:build_module(Chunks1),
                    ok = file:write_file(File, Beam)
                end;
              _ -> ok
            end,
            Mod
          end || B <- Beams],
  AppFile = filename:join(Ebin, AppS ++ ".app"),
  DoApp =:= "app" orelse throw(done),
  Source = case {filelib:is_regular(AppFile), AppSrc} of
             {true, _} -> AppFile;
             {false, ""} -> throw({no_app_file, AppFile});
             {false, _} -> AppSrc
           end,
  Props = case file:consult(Source) of
            {ok, [{application, App, P}]} when is_list(P) -> P;
            {ok, Other} -> throw({bad_app_file, Source, Other});
            {error, Why} -> throw({unreadable_app_file, Source, Why})
          end,
  Props1 = lists:keystore(vsn, 1, Props, {vsn, Vsn}),
  Props2 = lists:keystore(modules, 1, Props1, {modules, lists:sort(Mods)}),
  Text = io_lib:format("~tp.~n", [{application, App, Props2}]),
  ok = file:write_file(AppFile, unicode:characters_to_binary(Text))
end,
try Main() of
  _ -> halt(0)
catch
  throw:done -> halt(0);
  throw:Reason ->
    io:format(standard_error, "bstore finalize: ~tp~n", [Reason]), halt(3);
  Class:Reason:Stack ->
    io:format(standard_error, "bstore finalize: ~tp:~tp~n~tp~n", [Class, Reason, Stack]),
    halt(3)
end.
"""


def _chunks(beam: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(id, data) of each chunk of a BEAM file (IFF: ``FOR1`` size ``BEAM`` chunks…)."""
    if beam[:2] == b"\x1f\x8b":  # a gzip-compressed .beam (erlc +compressed)
        beam = zlib.decompress(beam, 16 + zlib.MAX_WBITS)
    if beam[:4] != b"FOR1" or beam[8:12] != b"BEAM":
        return
    pos = 12
    while pos + 8 <= len(beam):
        size = int.from_bytes(beam[pos + 4 : pos + 8], "big")
        yield beam[pos : pos + 4], beam[pos + 8 : pos + 8 + size]
        pos += 8 + ((size + 3) & ~3)


def debug_info_mentions(beam_path: Path, needle: bytes) -> bool:
    """Whether the debug info of ``beam_path`` contains ``needle`` (e.g. a build path).

    Debug info is external term format, often zlib-compressed (``131, 80, Size:32``),
    so the raw bytes of the file would not show it.
    """
    for chunk_id, data in _chunks(beam_path.read_bytes()):
        if chunk_id not in (b"Dbgi", b"Abst"):
            continue
        if data[:2] == b"\x83\x50":
            try:
                data = zlib.decompress(data[6:])
            except zlib.error:
                return True  # unreadable here: let the BEAM look at it
        if needle in data:
            return True
    return False


def _charlist(text: str) -> list[Term]:
    return [ord(c) for c in text]


def write_app_file(
    ctx: BuildContext, modules: Sequence[str], app_src: Path | None
) -> bool:
    """Write ``ebin/<app>.app`` with ``vsn`` and ``modules`` set; False when the file
    uses Erlang syntax the Python term model cannot hold (the BEAM then does it)."""
    app_file = ctx.stage_dir / "ebin" / f"{ctx.app_name}.app"
    source = app_file if app_file.is_file() else app_src
    if source is None or not source.is_file():
        raise BuildError(
            f"the build of {ctx.lib_name!r} wrote no ebin/{ctx.app_name}.app and there is "
            f"no src/{ctx.app_name}.app.src to make one from",
            hint="the application name must match the .app / .app.src file name",
            log_path=ctx.sandbox.log_path,
        )
    try:
        terms = consult(source)
    except (TermSyntaxError, TermReadError) as exc:
        if isinstance(exc, TermReadError):
            raise BuildError(f"cannot read {str(source)!r}: {exc.message}") from exc
        return False
    if (
        len(terms) != 1
        or not isinstance(terms[0], tuple)
        or len(terms[0]) != 3
        or terms[0][0] != Atom("application")
        or not isinstance(terms[0][2], list)
    ):
        raise BuildError(
            f"{str(source)!r} is not an application resource file "
            "({application, Name, [Props]}.)",
            log_path=ctx.sandbox.log_path,
        )
    _, name, props = terms[0]
    assert isinstance(props, list)
    if name != Atom(ctx.app_name):
        raise BuildError(
            f"{str(source)!r} describes application {str(name)!r}, not {ctx.app_name!r}",
            hint="the spec's app name must match the application in the .app file",
            log_path=ctx.sandbox.log_path,
        )
    new_props: list[Term] = list(props)
    module_atoms: list[Term] = [Atom(m) for m in modules]
    updates: tuple[tuple[str, Term], ...] = (
        ("vsn", _charlist(ctx.version)), ("modules", module_atoms),
    )
    for key, value in updates:
        for i, prop in enumerate(new_props):
            if isinstance(prop, tuple) and len(prop) == 2 and prop[0] == Atom(key):
                new_props[i] = (Atom(key), value)
                break
        else:
            new_props.append((Atom(key), value))
    try:
        text = format_term((Atom("application"), name, new_props))
    except TermFormatError:
        return False
    app_file.write_text(text + ".\n", encoding="utf-8")
    return True


def finalize(ctx: BuildContext, *, app_src: Path | None = None, source_root: Path) -> None:
    """Fix the staged ``.app`` and normalise build paths in debug info (see module doc).

    ``app_src`` is used when the build wrote no ``ebin/<app>.app``; ``source_root`` is
    the directory whose absolute path must not appear in the output. The ``.app`` is
    rewritten in Python; a BEAM is started only for debug info that names the build
    directory (Elixir) or an ``.app`` the Python term model cannot represent.
    """
    ebin = ctx.stage_dir / "ebin"
    if not ebin.is_dir():
        raise BuildError(f"nothing to finalize: {str(ctx.stage_dir)!r} has no ebin")
    beams = sorted(ebin.glob("*.beam"))
    modules = sorted(b.name[: -len(".beam")] for b in beams)
    needle = str(source_root).encode()
    fix_debug_info = any(debug_info_mentions(b, needle) for b in beams)
    app_done = write_app_file(ctx, modules, app_src)
    if not fix_debug_info and app_done:
        return
    canon = f"{CANONICAL_BUILD_PREFIX}/{ctx.lib_name}"
    ctx.sandbox.run(
        [
            ctx.toolchain.erl, "-noshell", "-noinput", "-eval", _FINALIZE_ERL, "-extra",
            str(ctx.stage_dir), ctx.app_name, ctx.version,
            str(app_src) if app_src is not None else "", str(source_root), canon,
            "noapp" if app_done else "app",
        ],
        cwd=ctx.work_dir,
        step="finalize .app and debug info",
    )
