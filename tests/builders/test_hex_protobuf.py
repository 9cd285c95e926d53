"""The registry protobuf codec against hex_core's generated codec (as bundled in rebar3)."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from bstore.builders.hex.protobuf import (
    Dependency,
    Names,
    Package,
    Release,
    Retirement,
    Signed,
    Versions,
    VersionsEntry,
)

PACKAGE = Package(
    "pkg",
    "hexpm",
    (
        Release(
            "1.0.0-rc.1",
            b"\x01\x02\x03",
            (Dependency("dep", "~> 1.0", optional=True, app="dep_app"),),
            Retirement(2, "cve"),
            b"\x04\x05",
        ),
        Release("0.9.0", b"\x09" * 32, (Dependency("x", ">= 0.1.0", repository="other"),)),
    ),
)

# The same message as an Erlang map for hex_core's encode_msg/2.
PACKAGE_ERL = """#{name => <<"pkg">>, repository => <<"hexpm">>, releases => [
  #{version => <<"1.0.0-rc.1">>, inner_checksum => <<1,2,3>>, outer_checksum => <<4,5>>,
    dependencies => [#{package => <<"dep">>, requirement => <<"~> 1.0">>, optional => true,
                       app => <<"dep_app">>}],
    retired => #{reason => 'RETIRED_SECURITY', message => <<"cve">>}},
  #{version => <<"0.9.0">>, inner_checksum => binary:copy(<<9>>, 32),
    dependencies => [#{package => <<"x">>, requirement => <<">= 0.1.0">>,
                       repository => <<"other">>}]}]}"""


@pytest.fixture(scope="module")
def hex_core_pb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hex_core's protobuf modules, taken out of the rebar3 escript (a zip archive)."""
    rebar3 = shutil.which("rebar3")
    if rebar3 is None or shutil.which("erl") is None:
        pytest.skip("rebar3 and erl are needed for the hex_core comparison")
    out = tmp_path_factory.mktemp("hex_core_pb")
    with zipfile.ZipFile(rebar3) as archive:
        for name in archive.namelist():
            if "/r3_hex_pb_" in name and name.endswith(".beam"):
                (out / Path(name).name).write_bytes(archive.read(name))
    if not list(out.iterdir()):
        pytest.skip("this rebar3 does not bundle hex_core's protobuf modules")
    return out


def erl(pb_dir: Path, expr: str) -> str:
    """Evaluate ``expr`` (which must produce a binary) and return it as hex."""
    code = f'B = begin {expr} end, io:format("~s~n", [binary:encode_hex(B)]), halt().'
    proc = subprocess.run(
        ["erl", "-noshell", "-pa", str(pb_dir), "-eval", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.strip().lower()


def erl_decode(pb_dir: Path, module: str, message: str, data: bytes) -> str:
    """hex_core's decoding of ``data``, printed as an Erlang term."""
    code = (
        f'T = r3_hex_pb_{module}:decode_msg(binary:decode_hex(<<"{data.hex()}">>), '
        f"'{message}'), io:format(\"~0p~n\", [T]), halt()."
    )
    proc = subprocess.run(
        ["erl", "-noshell", "-pa", str(pb_dir), "-eval", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.strip()


@pytest.mark.integration
def test_package_bytes_match_hex_core_exactly(hex_core_pb: Path) -> None:
    theirs = bytes.fromhex(
        erl(hex_core_pb, f"r3_hex_pb_package:encode_msg({PACKAGE_ERL}, 'Package')")
    )
    assert Package.decode(theirs) == PACKAGE
    assert PACKAGE.encode() == theirs


@pytest.mark.integration
def test_hex_core_decodes_our_messages(hex_core_pb: Path) -> None:
    decoded = erl_decode(hex_core_pb, "package", "Package", PACKAGE.encode())
    assert 'name => <<"pkg">>' in decoded
    assert "reason => 'RETIRED_SECURITY'" in decoded
    assert 'app => <<"dep_app">>' in decoded
    assert 'repository => <<"other">>' in decoded
    signed = Signed(b"payload", b"sig")
    assert erl_decode(hex_core_pb, "signed", "Signed", signed.encode()) == (
        '#{payload => <<"payload">>,signature => <<"sig">>}'
    )
    names = Names("hexpm", ("a", "b"))
    assert erl_decode(hex_core_pb, "names", "Names", names.encode()) == (
        '#{packages => [#{name => <<"a">>},#{name => <<"b">>}],repository => <<"hexpm">>}'
    )


@pytest.mark.integration
def test_versions_with_packed_retired_indexes(hex_core_pb: Path) -> None:
    expr = (
        'r3_hex_pb_versions:encode_msg(#{repository => <<"hexpm">>, packages => ['
        '#{name => <<"a">>, versions => [<<"1.0.0">>, <<"1.1.0">>, <<"2.0.0">>],'
        " retired => [0, 2]}]}, 'Versions')"
    )
    theirs = bytes.fromhex(erl(hex_core_pb, expr))
    expected = Versions("hexpm", (VersionsEntry("a", ("1.0.0", "1.1.0", "2.0.0"), (0, 2)),))
    assert Versions.decode(theirs) == expected
    assert expected.encode() == theirs
