"""Real builds of the sample apps with rebar3, mix, erlang.mk and erlc, loaded in a
real ``erl``; determinism across build directories; hostile builds and inputs."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import sample_apps
from netprobe import accepted, listening_socket

from bstore.builders.buildsystems import BuildError, BuildResult, DepLib, build
from bstore.builders.sandbox import NO_ISOLATION, Isolation, detect_isolation
from bstore.builders.toolchain import Toolchain, detect_toolchain
from bstore.store.manifest import compute_mcid

pytestmark = pytest.mark.integration

TIMEOUT = 180.0


def do_build(base: Path, source: Path, app: str, vsn: str, deps: Sequence[DepLib] = (),
             *, isolation: Isolation | None = None, timeout: float = TIMEOUT,
             tag: str = "") -> BuildResult:
    """Build ``source`` with every directory under ``base`` (named by app and ``tag``)."""
    name = f"{app}{tag}"
    return build(
        source, base / "out" / name, app_name=app, version=vsn, deps=deps,
        toolchain=detect_toolchain(), work_dir=base / "work" / name,
        log_path=base / "logs" / f"{name}.log", timeout=timeout, isolation=isolation,
    )


def erl_eval(code_paths: Sequence[Path], expr: str) -> str:
    """Evaluate ``expr`` (an Erlang expression) in a fresh ``erl`` and return what it
    prints with ``~p``; fails the test if the VM fails."""
    argv = ["erl", "-noshell"]
    for path in code_paths:
        argv += ["-pa", str(path)]
    argv += ["-eval", f'io:format("~p~n", [begin {expr} end]), halt().']
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def app_facts(result: BuildResult, deps: Sequence[DepLib], call: str,
              extra_paths: Sequence[Path] = ()) -> str:
    """Load the built app in erl: its vsn, its modules and the result of ``call``."""
    app = result.app_name
    paths = [*extra_paths, *(d.ebin for d in deps), result.lib_dir / "ebin"]
    return erl_eval(paths, (
        f"ok = application:load({app}),"
        f"{{ok, V}} = application:get_key({app}, vsn),"
        f"{{ok, Ms}} = application:get_key({app}, modules),"
        f"{{V, lists:sort(Ms), {call}}}"
    ))


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built_deps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DepLib]:
    """greeter (rebar3, Erlang) and exdep (mix, Elixir), built once by our runner."""
    base = tmp_path_factory.mktemp("deps")
    src = base / "src"
    greeter = do_build(base, sample_apps.greeter_dep(src), "greeter", "1.0.0")
    exdep = do_build(base, sample_apps.elixir_dep(src), "exdep", "0.2.0")
    return {
        "greeter": DepLib("greeter", "1.0.0", greeter.lib_dir),
        "exdep": DepLib("exdep", "0.2.0", exdep.lib_dir),
    }


@pytest.fixture(scope="module")
def elixir_ebin() -> Path:
    out = subprocess.run(["elixir", "-e", "IO.write(:code.lib_dir(:elixir))"],
                         capture_output=True, text=True, check=True, timeout=60)
    return Path(out.stdout) / "ebin"


# --- each build system builds, and the result loads and runs ------------------------

def test_erlc_app(tmp_path: Path) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    result = do_build(tmp_path, source, "plainapp", "0.1.0")
    assert result.build_system == "erlc"
    assert result.lib_dir == tmp_path / "out" / "plainapp" / "lib" / "plainapp-0.1.0"
    assert result.modules == ("plainapp", "plainapp_util")
    assert app_facts(result, [], "plainapp:answer()") == (
        '{"0.1.0",[plainapp,plainapp_util],{42,84}}'
    )
    assert (result.lib_dir / "include" / "plainapp.hrl").is_file()
    assert sorted(p.name for p in result.lib_dir.iterdir()) == ["ebin", "include"]


def test_rebar3_app_with_an_erlang_dep(tmp_path: Path, built_deps: dict[str, DepLib]) -> None:
    greeter = built_deps["greeter"]
    source = sample_apps.rebar3_app(tmp_path / "src")
    result = do_build(tmp_path, source, "rebarapp", "2.0.0", [greeter])
    assert result.build_system == "rebar3"
    # vsn comes from the spec, not from `{vsn, git}` in the .app.src.
    assert app_facts(result, [greeter], "{rebarapp:run(), rebarapp:data()}") == (
        '{"2.0.0",[rebarapp],{{<<"hello, ">>,<<"hello, bstore">>},<<"priv data\\n">>}}'
    )


def test_mix_app_with_erlang_and_elixir_deps(
    tmp_path: Path, built_deps: dict[str, DepLib], elixir_ebin: Path
) -> None:
    deps = [built_deps["greeter"], built_deps["exdep"]]
    source = sample_apps.mix_app(tmp_path / "src")
    result = do_build(tmp_path, source, "mixapp", "1.0.0", deps)
    assert result.build_system == "mix"
    assert result.modules == ("Elixir.Mixapp", "Elixir.Mixapp.Helper")
    assert app_facts(result, deps, "'Elixir.Mixapp':run()", [elixir_ebin]) == (
        "{\"1.0.0\",['Elixir.Mixapp','Elixir.Mixapp.Helper'],<<\"HELLO, MIX!\">>}"
    )
    app = (result.lib_dir / "ebin" / "mixapp.app").read_text()
    assert "greeter" in app and "exdep" in app  # mix listed the deps as applications


def test_mix_sees_the_whole_dependency_closure_while_compiling(
    tmp_path: Path, built_deps: dict[str, DepLib], elixir_ebin: Path
) -> None:
    deps = [built_deps["greeter"], built_deps["exdep"]]
    source = sample_apps.mix_app_compile_time_transitive(tmp_path / "src")
    result = do_build(tmp_path, source, "mixtrans", "0.1.0", deps)
    assert app_facts(result, deps, "'Elixir.Mixtrans':greeting()", [elixir_ebin]) == (
        "{\"0.1.0\",['Elixir.Mixtrans'],<<\"HELLO, COMPILE TIME!\">>}"
    )


def test_erlang_mk_app(tmp_path: Path, built_deps: dict[str, DepLib]) -> None:
    greeter = built_deps["greeter"]
    source = sample_apps.erlang_mk_app(tmp_path / "src")
    result = do_build(tmp_path, source, "mkapp", "0.3.1", [greeter])
    assert result.build_system == "make"
    assert app_facts(result, [greeter], "mkapp:run()") == (
        '{"0.3.1",[mkapp,mkapp_two],{<<"hello, ">>,<<"hello, make">>,2}}'
    )
    assert (result.lib_dir / "priv" / "mk.txt").read_text() == "mk\n"


def test_erlang_mk_must_be_vendored(tmp_path: Path, built_deps: dict[str, DepLib]) -> None:
    source = sample_apps.erlang_mk_app(tmp_path / "src")
    (source / "erlang.mk").unlink()
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "mkapp", "0.3.0", [built_deps["greeter"]],
                 isolation=NO_ISOLATION)
    assert "erlang.mk project 'mkapp' does not vendor erlang.mk" in err.value.message
    assert err.value.hint is not None and "cannot download it" in err.value.hint


def test_source_is_not_modified_and_work_dir_is_emptied(
    tmp_path: Path, built_deps: dict[str, DepLib]
) -> None:
    source = sample_apps.rebar3_app(tmp_path / "src")
    before = compute_mcid(source)
    dep_before = compute_mcid(built_deps["greeter"].lib_dir)
    result = do_build(tmp_path, source, "rebarapp", "2.0.0", [built_deps["greeter"]])
    assert compute_mcid(source) == before
    # The dependency was linked into the work dir; cleaning it must not follow the link.
    assert compute_mcid(built_deps["greeter"].lib_dir) == dep_before
    assert list((tmp_path / "work" / "rebarapp").iterdir()) == []
    assert "rebar3 bare compile" in result.log_path.read_text()


# --- determinism: same source, different directories, identical bytes ---------------

@pytest.mark.parametrize("system", ["erlc", "rebar3", "mix", "make"])
def test_two_builds_in_different_dirs_are_byte_identical(
    tmp_path: Path, built_deps: dict[str, DepLib], system: str
) -> None:
    greeter, exdep = built_deps["greeter"], built_deps["exdep"]
    make_app, app, deps = {
        "erlc": (sample_apps.erlc_app, "plainapp", []),
        "rebar3": (sample_apps.rebar3_app, "rebarapp", [greeter]),
        "mix": (sample_apps.mix_app, "mixapp", [greeter, exdep]),
        "make": (sample_apps.erlang_mk_app, "mkapp", [greeter]),
    }[system]
    first_base = tmp_path / "a"
    # A deeper, differently named tree: any absolute path left in a .beam would differ.
    second_base = tmp_path / "b" / "much" / "longer" / "path"
    first = do_build(first_base, make_app(first_base / "src"), app, "1.2.3", deps)
    second = do_build(second_base, make_app(second_base / "elsewhere"), app, "1.2.3", deps)
    assert tree_hashes(first.lib_dir) == tree_hashes(second.lib_dir)
    assert compute_mcid(first.lib_dir) == compute_mcid(second.lib_dir)
    for beam in (first.lib_dir / "ebin").glob("*.beam"):
        assert str(first_base).encode() not in beam.read_bytes()


# --- hostile builds under the sandbox ------------------------------------------------

needs_netns = pytest.mark.skipif(
    not detect_isolation().network,
    reason=f"no network namespace on this host: {detect_isolation().reason}",
)
needs_mountns = pytest.mark.skipif(
    not detect_isolation().filesystem,
    reason=f"no mount namespace on this host: {detect_isolation().reason}",
)


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    sock, port = listening_socket()
    yield sock, port
    sock.close()


def _connecting_script(port: int) -> str:
    # rebar3 evaluates rebar.config.script while reading its configuration: this is
    # compile-time code of the build, trying to reach "the network".
    return (
        f"case gen_tcp:connect({{127,0,0,1}}, {port}, [], 3000) of\n"
        "  {ok, S} -> gen_tcp:close(S), io:format(\"CONNECTED~n\"), CONFIG;\n"
        "  {error, E} -> erlang:error({network_blocked, E})\nend.\n"
    )


@needs_netns
def test_a_build_that_opens_a_socket_fails(
    tmp_path: Path, built_deps: dict[str, DepLib], listener: tuple[socket.socket, int]
) -> None:
    sock, port = listener
    source = sample_apps.rebar3_app(tmp_path / "src", rebar_script=_connecting_script(port))
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "rebarapp", "2.0.0", [built_deps["greeter"]])
    assert "build step 'rebar3 bare compile' failed" in err.value.message
    assert "network_blocked" in err.value.log_tail
    assert not accepted(sock)
    assert not (tmp_path / "out" / "rebarapp" / "lib" / "rebarapp-2.0.0").exists()


def test_the_same_build_connects_without_the_sandbox(
    tmp_path: Path, built_deps: dict[str, DepLib], listener: tuple[socket.socket, int]
) -> None:
    # Control for the test above: the script really does reach the listener.
    sock, port = listener
    source = sample_apps.rebar3_app(tmp_path / "src", rebar_script=_connecting_script(port))
    result = do_build(tmp_path, source, "rebarapp", "2.0.0", [built_deps["greeter"]],
                      isolation=NO_ISOLATION)
    assert accepted(sock)
    assert "CONNECTED" in result.log_path.read_text()
    assert not result.network_isolated


def test_build_env_is_whitelisted_and_home_empty(
    tmp_path: Path, built_deps: dict[str, DepLib], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BSTORE_TEST_SECRET", "do-not-leak")
    monkeypatch.setenv("TERM", "xterm")
    script = (
        'io:format("HOME-LISTING ~p~n", [file:list_dir(os:getenv("HOME"))]),\n'
        '[io:format("BUILD-ENV ~s~n", [KV]) || KV <- lists:sort(os:getenv())],\nCONFIG.\n'
    )
    source = sample_apps.rebar3_app(tmp_path / "src", rebar_script=script)
    result = do_build(tmp_path, source, "rebarapp", "2.0.0", [built_deps["greeter"]])
    log = result.log_path.read_text()
    env = dict(line.removeprefix("BUILD-ENV ").split("=", 1)
               for line in log.splitlines() if line.startswith("BUILD-ENV "))
    assert "HOME-LISTING {ok,[]}" in log
    assert "BSTORE_TEST_SECRET" not in env and "TERM" not in env
    assert env["MIX_ENV"] == "prod" and env["HEX_OFFLINE"] == "1"
    assert env["ERL_COMPILER_OPTIONS"] == "[deterministic]"
    assert env["LANG"] == env["LC_ALL"] == "C.UTF-8"
    assert env["HOME"].startswith(str(tmp_path / "work" / "rebarapp"))
    # Whatever else is there was put there by erl/rebar3 themselves, not inherited.
    allowed = {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ", "MIX_ENV", "HEX_OFFLINE",
               "ERL_COMPILER_OPTIONS", "ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS",
               "SOURCE_DATE_EPOCH", "REBAR_COLOR", "REBAR_BARE_COMPILER_OUTPUT_DIR",
               "ERL_LIBS", "REBAR_CACHE_DIR", "REBAR_GLOBAL_CONFIG_DIR",
               # set by the erl start script and the emulator for their children:
               "BINDIR", "EMU", "ROOTDIR", "PROGNAME", "ESCRIPT_NAME", "PWD", "SHLVL", "_"}
    assert set(env) <= allowed, set(env) - allowed


@needs_mountns
def test_a_build_that_writes_outside_its_dir_fails(
    tmp_path: Path, built_deps: dict[str, DepLib]
) -> None:
    outside = tmp_path / "escaped.txt"
    script = f"ok = file:write_file({str(outside)!r}, <<\"pwned\">>),\nCONFIG.\n".replace(
        "'", '"')
    source = sample_apps.rebar3_app(tmp_path / "src", rebar_script=script)
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "rebarapp", "2.0.0", [built_deps["greeter"]])
    assert "erofs" in err.value.log_tail
    assert not outside.exists()
    assert list((tmp_path / "work" / "rebarapp").iterdir()) == []


@pytest.mark.parametrize("isolation", [None, NO_ISOLATION], ids=["sandboxed", "unisolated"])
def test_a_build_killed_midway_cleans_up(
    tmp_path: Path, built_deps: dict[str, DepLib], isolation: Isolation | None
) -> None:
    marker = f"bstore-sleeper-{uuid.uuid4().hex}"
    script = (
        f'open_port({{spawn_executable, "/bin/sleep"}}, [{{arg0, "{marker}"}}, '
        '{args, ["300"]}]),\nio:format("sleeping now~n"),\ntimer:sleep(300000),\nCONFIG.\n'
    )
    source = sample_apps.rebar3_app(tmp_path / "src", rebar_script=script)
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "rebarapp", "2.0.0", [built_deps["greeter"]],
                 isolation=isolation, timeout=6)
    assert "timed out after 6s and was killed" in err.value.message
    assert "sleeping now" in err.value.log_tail
    assert err.value.log_path == tmp_path / "logs" / "rebarapp.log"
    assert not _processes_with(marker)
    assert list((tmp_path / "work" / "rebarapp").iterdir()) == []
    assert not (tmp_path / "out" / "rebarapp" / "lib").exists()


def test_a_compile_error_shows_in_the_error(tmp_path: Path) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    (source / "src" / "plainapp_util.erl").write_text("-module(plainapp_util).\nbroken(\n")
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "plainapp", "0.1.0")
    assert "build step 'erlc' failed with exit status 1" in err.value.message
    assert "plainapp_util.erl:" in err.value.log_tail
    assert not (tmp_path / "out" / "plainapp" / "lib").exists()


# --- hostile inputs ------------------------------------------------------------------

HOSTILE_DIR = "a b;$(touch PWNED)`touch PWNED2`'q\"&|<>*"


def test_shell_metacharacters_in_paths_never_reach_a_shell(
    tmp_path: Path, built_deps: dict[str, DepLib]
) -> None:
    base = tmp_path / HOSTILE_DIR
    erlc_result = do_build(base, sample_apps.erlc_app(base / "src"), "plainapp", "0.1.0")
    rebar_result = do_build(base, sample_apps.rebar3_app(base / "src"), "rebarapp", "2.0.0",
                            [built_deps["greeter"]])
    assert erlc_result.modules == ("plainapp", "plainapp_util")
    assert rebar_result.modules == ("rebarapp",)
    assert not [p for p in tmp_path.rglob("PWNED*")]
    assert not [p for p in Path.cwd().glob("PWNED*")]


@pytest.mark.parametrize(
    ("app", "vsn", "message"),
    [
        ("x; rm -rf /", "1.0.0", "invalid application name 'x; rm -rf /'"),
        ("$(id)", "1.0.0", "invalid application name '$(id)'"),
        ("Upper", "1.0.0", "invalid application name 'Upper'"),
        ("../evil", "1.0.0", "invalid application name '../evil'"),
        ("", "1.0.0", "invalid application name ''"),
        ("ok", "1.0.0;id", "invalid version '1.0.0;id'"),
        ("ok", "`id`", "invalid version '`id`'"),
        ("ok", "../../etc", "invalid version '../../etc'"),
        ("ok", "1.0 0", "invalid version '1.0 0'"),
        ("ok", "", "invalid version ''"),
    ],
)
def test_hostile_names_and_versions_are_refused(
    tmp_path: Path, app: str, vsn: str, message: str
) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, app, vsn, tag="x")
    assert message in err.value.message
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_a_missing_dependency_build_is_refused(tmp_path: Path) -> None:
    source = sample_apps.rebar3_app(tmp_path / "src")
    ghost = DepLib("greeter", "1.0.0", tmp_path / "nowhere" / "lib" / "greeter-1.0.0")
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "rebarapp", "2.0.0", [ghost])
    assert "dependency 'greeter' has no greeter.app in" in err.value.message


def test_a_non_empty_work_dir_is_refused_and_left_alone(tmp_path: Path) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    precious = tmp_path / "work" / "plainapp" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("keep me")
    with pytest.raises(BuildError, match="is not empty"):
        do_build(tmp_path, source, "plainapp", "0.1.0")
    assert precious.read_text() == "keep me"


def test_a_symlink_out_of_the_source_is_refused(tmp_path: Path) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    (source / "priv").mkdir()
    (source / "priv" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "plainapp", "0.1.0")
    assert "is a symlink to '/etc/passwd', outside the tree" in err.value.message


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    do_build(tmp_path, source, "plainapp", "0.1.0")
    with pytest.raises(BuildError, match="already exists"):
        build(source, tmp_path / "out" / "plainapp", app_name="plainapp", version="0.1.0",
              deps=[], toolchain=detect_toolchain(), work_dir=tmp_path / "w2",
              log_path=tmp_path / "l2.log", timeout=TIMEOUT)


def test_a_missing_tool_is_reported(tmp_path: Path) -> None:
    tc = detect_toolchain()
    no_rebar = Toolchain(otp_release=tc.otp_release, otp_version=tc.otp_version,
                         erts_version=tc.erts_version, erl=tc.erl, erlc=tc.erlc)
    source = sample_apps.greeter_dep(tmp_path / "src")
    with pytest.raises(BuildError, match="build tool 'rebar3' is not installed"):
        build(source, tmp_path / "out", app_name="greeter", version="1.0.0", deps=[],
              toolchain=no_rebar, work_dir=tmp_path / "w", log_path=tmp_path / "l.log",
              timeout=TIMEOUT)


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize(
    ("app_src", "message"),
    [
        ("{application, other, [{vsn, \"1\"}]}.\n",
         "describes application 'other', not 'plainapp'"),
        ("{library, plainapp, []}.\n", "is not an application resource file"),
        ("{application, plainapp, [{vsn, \"1\"}]}.\n{extra, term}.\n",
         "is not an application resource file"),
    ],
)
def test_a_bad_app_src_is_refused(tmp_path: Path, app_src: str, message: str) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    (source / "src" / "plainapp.app.src").write_text(app_src)
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "plainapp", "0.1.0")
    assert message in err.value.message
    assert not (tmp_path / "out" / "plainapp" / "lib").exists()


def test_an_unparseable_app_src_fails_in_the_beam_with_its_reason(tmp_path: Path) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    (source / "src" / "plainapp.app.src").write_text("{application, plainapp, [\n")
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "plainapp", "0.1.0")
    assert "build step 'finalize .app and debug info' failed" in err.value.message
    assert "bstore finalize:" in err.value.log_tail
    assert "unreadable_app_file" in err.value.log_tail


def test_an_app_file_beyond_the_python_term_model_is_written_by_the_beam(
    tmp_path: Path,
) -> None:
    # A map with a list key is valid Erlang that bstore's term model cannot hold: the
    # .app is then produced by file:consult/1 + ~tp in erl, and must still be right.
    source = sample_apps.erlc_app(tmp_path / "src")
    (source / "src" / "plainapp.app.src").write_text(
        '{application, plainapp, [{vsn, "x"}, {registered, []},\n'
        '  {applications, [kernel, stdlib]}, {env, [{routes, #{[1, 2] => root}}]}]}.\n'
    )
    result = do_build(tmp_path, source, "plainapp", "0.1.0")
    assert app_facts(result, [], "application:get_env(plainapp, routes)") == (
        '{"0.1.0",[plainapp,plainapp_util],{ok,#{[1,2] => root}}}'
    )
    assert "finalize .app and debug info" in result.log_path.read_text()


def test_special_files_in_the_source_are_refused(tmp_path: Path) -> None:
    source = sample_apps.erlc_app(tmp_path / "src")
    os.mkfifo(source / "src" / "pipe")
    with pytest.raises(BuildError) as err:
        do_build(tmp_path, source, "plainapp", "0.1.0")
    assert "is not a regular file, directory or symlink" in err.value.message
    assert "pipe" in err.value.message
