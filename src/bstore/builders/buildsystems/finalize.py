"""The last step of every build: a correct ``.app`` and path-free debug info.

Runs one short ``erl`` (inside the sandbox) over the staged lib dir that:

- reads ``ebin/<app>.app`` (or, when the build system writes none, ``src/<app>.app.src``)
  with ``file:consult/1`` — the real Erlang term reader, so any valid file is understood —
  sets ``vsn`` to the spec's version and ``modules`` to exactly the ``.beam`` files in
  ``ebin`` (sorted), and writes it back with ``~tp`` (deterministic);
- rewrites any debug-info chunk that mentions the build directory (Elixir records the
  absolute source path there; Erlang's ``deterministic`` option already strips it) so
  that it names ``/build/<app>-<vsn>`` instead: two builds of the same source in
  different directories then give byte-identical ``.beam`` files.
"""

from __future__ import annotations

from pathlib import Path

from bstore.builders.buildsystems.base import CANONICAL_BUILD_PREFIX, BuildContext
from bstore.builders.sandbox import BuildError

# Arguments come through init:get_plain_arguments/0 (after -extra), never through a
# shell or string interpolation. Exit status 3 = a problem with the app's files.
_FINALIZE_ERL = r"""
Main = fun() ->
  [LibDir, AppS, Vsn, AppSrc, Prefix, Canon] = init:get_plain_arguments(),
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
  Props2 = lists:keystore(modules, 1, Props1, {modules, Mods}),
  Text = io_lib:format("~tp.~n", [{application, App, Props2}]),
  ok = file:write_file(AppFile, unicode:characters_to_binary(Text))
end,
try Main() of
  _ -> halt(0)
catch
  throw:Reason ->
    io:format(standard_error, "bstore finalize: ~tp~n", [Reason]), halt(3);
  Class:Reason:Stack ->
    io:format(standard_error, "bstore finalize: ~tp:~tp~n~tp~n", [Class, Reason, Stack]),
    halt(3)
end.
"""


def finalize(ctx: BuildContext, *, app_src: Path | None = None, source_root: Path) -> None:
    """Fix the staged ``.app`` and normalise build paths in debug info (see module doc).

    ``app_src`` is used when the build wrote no ``ebin/<app>.app``; ``source_root`` is
    the directory whose absolute path must not appear in the output.
    """
    if not (ctx.stage_dir / "ebin").is_dir():
        raise BuildError(f"nothing to finalize: {str(ctx.stage_dir)!r} has no ebin")
    canon = f"{CANONICAL_BUILD_PREFIX}/{ctx.lib_name}"
    ctx.sandbox.run(
        [
            ctx.toolchain.erl, "-noshell", "-noinput", "-eval", _FINALIZE_ERL, "-extra",
            str(ctx.stage_dir), ctx.app_name, ctx.version,
            str(app_src) if app_src is not None else "", str(source_root), canon,
        ],
        cwd=ctx.work_dir,
        step="finalize .app and debug info",
    )
