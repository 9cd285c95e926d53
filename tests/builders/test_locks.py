"""rebar.lock and mix.lock parsing, checked against files the real tools write and read."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from hexrepo import ServedHexRepo
from hypothesis import given, settings
from hypothesis import strategies as st

from bstore.builders.hex.errors import LockError
from bstore.builders.hex.locks import (
    LockEntry,
    parse_mix_lock,
    parse_rebar_lock,
    read_elixir_literal,
)
from bstore.specs.terms import Atom

OLD_REBAR_LOCK = """\
[{<<"cowlib">>,{pkg,<<"cowlib">>,<<"2.11.0">>},1},
 {<<"ranch">>,{pkg,<<"ranch">>,<<"1.8.0">>},1},
 {<<"cowboy">>,{pkg,<<"cowboy">>,<<"2.9.0">>},0}].
"""

NEW_REBAR_LOCK = """\
{"1.2.0",
[{<<"cowboy">>,{pkg,<<"cowboy">>,<<"2.9.0">>},0},
 {<<"my_fork">>,
  {git,"https://example.invalid/fork.git",
       {ref,"0123456789abcdef0123456789abcdef01234567"}},
  0},
 {<<"renamed_app">>,{pkg,<<"real_pkg">>,<<"1.0.0-rc.1">>},1}]}.
[
{pkg_hash,[
 {<<"cowboy">>, <<"AAAA">>},
 {<<"renamed_app">>, <<"BBBB">>}]},
{pkg_hash_ext,[
 {<<"cowboy">>, <<"CCCC">>},
 {<<"renamed_app">>, <<"DDDD">>}]}
].
"""

MIX_LOCK = """\
%{
  "cowboy": {:hex, :cowboy, "2.9.0", "865dd8b6607e14cf03282e10e934023a1bd8be6f6bacf921a7e2a96d800cd452", [:make, :rebar3], [{:cowlib, "2.11.0", [hex: :cowlib, repo: "hexpm", optional: false]}, {:ranch, "1.8.0", [hex: :ranch, repo: "hexpm", optional: false]}], "hexpm", "2c729f934b4e1aa149aff882f57c6372c15399a20d54f65c8d67bef583021bde"},
  "old_style": {:hex, :old_style, "0.1.0", "abcd", [:mix], []},
  "mid_style": {:hex, :real_name, "0.2.0", "abcd", [:mix], [], "hexpm:acme"},
  "my_dep": {:git, "https://example.invalid/dep.git", "0123abc", [branch: "main"]},
  "quoted": {:hex, :"quoted", "1.0.0", "ff\\\\ee", [:mix], [{:x, "~> 1.0", [hex: :x, optional: true]}], "hexpm", "00"},
}
"""  # noqa: E501 - mix writes one line per dependency


def test_old_rebar_lock_layout() -> None:
    lock = parse_rebar_lock(OLD_REBAR_LOCK)
    assert lock.pins() == {"cowlib": "2.11.0", "ranch": "1.8.0", "cowboy": "2.9.0"}
    assert [e.level for e in lock.entries] == [1, 1, 0]


def test_new_rebar_lock_layout_with_hashes_and_git() -> None:
    lock = parse_rebar_lock(NEW_REBAR_LOCK)
    assert lock.pins() == {"cowboy": "2.9.0", "real_pkg": "1.0.0-rc.1"}
    cowboy, fork, renamed = lock.entries
    assert (cowboy.inner_checksum, cowboy.outer_checksum) == ("AAAA", "CCCC")
    assert fork == LockEntry(
        "my_fork",
        "git",
        git_url="https://example.invalid/fork.git",
        git_ref="0123456789abcdef0123456789abcdef01234567",
        level=0,
    )
    assert (renamed.name, renamed.package, renamed.outer_checksum) == (
        "renamed_app",
        "real_pkg",
        "DDDD",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{<<"1.2.0">>, [', "rebar.lock is not valid Erlang terms"),
        ("foo.", "first term is neither a list of deps"),
        ('[{<<"a">>, {pkg, <<"a">>}, 0}].', 'malformed pkg source {pkg,<<"a">>}'),
        ('[{<<"a">>, {pkg, <<"a">>, <<"1.0">>}, 0}].', "invalid version '1.0'"),
        ('[{<<"a">>, 0}].', "dependency #1 is not {Name, Source, Level}"),
        ("[].\n[{pkg_hash, [bad]}].", "malformed hash entry bad"),
    ],
)
def test_bad_rebar_locks(text: str, message: str) -> None:
    with pytest.raises(LockError) as info:
        parse_rebar_lock(text)
    assert message in info.value.message
    assert "rebar.lock" in info.value.message


def test_mix_lock_entries() -> None:
    lock = parse_mix_lock(MIX_LOCK)
    assert lock.pins() == {
        "cowboy": "2.9.0",
        "old_style": "0.1.0",
        "real_name": "0.2.0",
        "quoted": "1.0.0",
    }
    by_name = {e.name: e for e in lock.entries}
    cowboy = by_name["cowboy"]
    assert cowboy.deps == ("cowlib", "ranch")
    assert cowboy.repository == "hexpm"
    assert cowboy.outer_checksum is not None and cowboy.outer_checksum.startswith("2c729f")
    assert by_name["mid_style"].repository == "hexpm:acme"
    assert by_name["quoted"].inner_checksum == "ff\\ee"
    assert by_name["my_dep"] == LockEntry(
        "my_dep", "git", git_url="https://example.invalid/dep.git", git_ref="0123abc"
    )


def test_elixir_literal_subset() -> None:
    value = read_elixir_literal('%{"a" => [b: 1, c: nil], :d => {true, false, -1_000}}')
    assert value == {"a": [(Atom("b"), 1), (Atom("c"), None)], Atom("d"): (True, False, -1000)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('%{"a": {:hex, :a, "1.0.0"', "expected '}', got end of file"),
        ('%{"a": {:hex, :a, "#{System.cmd(\\"rm\\")}", "x"}}', "interpolation"),
        ('%{"a": File.rm!("x")}', "unexpected '.rm!(\"x\")}'"),
        ("[1, 2]", "mix.lock is not a map literal"),
        ('%{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('%{"a": {:hex}}', "hex entry is too short"),
        ('%{"a": {:hex, :a, "1.0", "x"}}', "invalid version '1.0'"),
        ("%{" + '"a": ' + "[" * 100 + "]" * 100 + "}", "nesting deeper than 64"),
        ('%{"a": 1} extra', "unexpected text after the literal"),
    ],
)
def test_bad_mix_locks(text: str, message: str) -> None:
    with pytest.raises(LockError) as info:
        parse_mix_lock(text)
    assert message in info.value.message


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("elixir") is None, reason="elixir is not installed")
def test_mix_lock_reading_agrees_with_elixir(tmp_path: Path) -> None:
    path = tmp_path / "mix.lock"
    path.write_text(MIX_LOCK)
    code = """
    {lock, _} = Code.eval_file(hd(System.argv()))
    for {name, spec} <- Enum.sort(lock) do
      IO.puts(Enum.join([name, elem(spec, 0), elem(spec, 1), elem(spec, 2)], "|"))
    end
    """
    out = subprocess.run(
        ["elixir", "-e", code, str(path)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    theirs = [line.split("|") for line in out.splitlines()]
    ours = [
        [e.name, e.source, e.package or e.git_url or "", e.version or e.git_ref or ""]
        for e in sorted(parse_mix_lock(MIX_LOCK).entries, key=lambda e: e.name)
    ]
    assert ours == theirs


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("rebar3") is None, reason="rebar3 is not installed")
def test_rebar_lock_written_by_rebar3(hex_repo: ServedHexRepo, tmp_path: Path) -> None:
    """rebar3 itself fetches from the test repository (checking our signatures, protobuf
    and tarballs with hex_core) and writes a rebar.lock that we then read back."""
    app = tmp_path / "app"
    env = {**hex_repo.rebar3_app(app, applications="hexa_mid", deps='{hexa_mid, "1.0.0"}'),
           "REBAR_OFFLINE": ""}
    proc = subprocess.run(
        ["rebar3", "get-deps"], cwd=app, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lock = parse_rebar_lock((app / "rebar.lock").read_text(), str(app / "rebar.lock"))
    # hexa_mid 1.0.0 needs hexa_leaf ~> 1.0: 1.1.0 (2.0.0 is out, 1.2.0-rc.1 a pre-release).
    assert lock.pins() == {"hexa_mid": "1.0.0", "hexa_leaf": "1.1.0"}
    leaf = next(e for e in lock.entries if e.name == "hexa_leaf")
    tarball = hex_repo.builder.release("hexa_leaf", leaf.version or "").tarball()
    assert leaf.outer_checksum == hashlib.sha256(tarball).hexdigest().upper()
    assert leaf.level == 1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='%{}[]",:=> \nabc019_-#\\', max_size=60))
def test_random_mix_text_fails_only_with_lock_errors(text: str) -> None:
    with contextlib.suppress(LockError):
        parse_mix_lock(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='[]{}<>",.pkg 019\n%', max_size=60))
def test_random_rebar_text_fails_only_with_lock_errors(text: str) -> None:
    with contextlib.suppress(LockError):
        parse_rebar_lock(text)
