"""Toolchain detection against the real erl/rebar3/elixir, and its validation."""

from __future__ import annotations

import json
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from bstore.builders.toolchain import (
    Toolchain,
    ToolchainError,
    detect_toolchain,
    parse_elixir_version,
    parse_rebar3_version,
    probe_toolchain,
)

pytestmark = pytest.mark.integration


def _erl(expr: str) -> str:
    out = subprocess.run(["erl", "-noshell", "-eval", f"{expr}, halt()."],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_detects_the_installed_versions() -> None:
    tc = detect_toolchain()
    assert tc.otp_release == _erl('io:format("~s", [erlang:system_info(otp_release)])')
    assert tc.erts_version == _erl('io:format("~s", [erlang:system_info(version)])')
    assert tc.otp_version.split(".")[0] == tc.otp_release
    rebar = subprocess.run(["rebar3", "version"], capture_output=True, text=True, check=True)
    assert f"rebar {tc.rebar3_version} " in rebar.stdout
    elixir = subprocess.run(["elixir", "-e", "IO.write(System.version())"],
                            capture_output=True, text=True, check=True)
    assert tc.elixir_version == elixir.stdout
    assert tc.erlc is not None and Path(tc.erlc).name == "erlc" and Path(tc.erlc).is_absolute()


def test_detection_is_cached_per_process() -> None:
    first = detect_toolchain()
    hits = detect_toolchain.cache_info().hits
    assert detect_toolchain() is first
    assert detect_toolchain.cache_info().hits == hits + 1


def test_fingerprint_is_canonical_and_complete() -> None:
    tc = detect_toolchain()
    fp = tc.fingerprint()
    assert sorted(fp) == ["elixir_version", "erlc", "erts_version", "otp_release",
                          "otp_version", "rebar3_version"]
    assert all(isinstance(v, str) for v in fp.values())
    assert fp["otp_release"] == tc.otp_release and fp["erlc"] == tc.erlc
    # Same toolchain, same bytes; a different rebar3 gives a different fingerprint.
    dumped = json.dumps(fp, sort_keys=True)
    assert json.dumps(probe_toolchain().fingerprint(), sort_keys=True) == dumped
    assert replace(tc, rebar3_version="9.9.9").fingerprint() != fp
    # Tool paths other than erlc do not move the hash.
    assert replace(tc, make="/opt/other/make").fingerprint() == fp


def test_absent_tools_fingerprint_as_empty_strings() -> None:
    tc = Toolchain(otp_release="25", otp_version="25.2.3", erts_version="13.1.5",
                   erl="/usr/bin/erl", erlc="/usr/bin/erlc")
    assert tc.fingerprint()["elixir_version"] == ""
    assert tc.fingerprint()["rebar3_version"] == ""
    with pytest.raises(ToolchainError, match="'mix' is not installed"):
        tc.require("mix")
    assert tc.tool_dirs() == ("/usr/bin",)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("otp_release", "25; rm -rf /", "otp_release '25; rm -rf /' is not a version"),
        ("erts_version", "", "erts_version '' is not a version"),
        ("rebar3_version", "3.19 0", "rebar3_version '3.19 0' is not a version"),
        ("erlc", "bin/erlc", "erlc path 'bin/erlc' is not absolute"),
        ("mix", "mix", "mix path 'mix' is not absolute"),
    ],
)
def test_invalid_toolchain_values_are_refused(field: str, value: str, message: str) -> None:
    fields = dict(otp_release="25", otp_version="25.2.3", erts_version="13.1.5",
                  erl="/usr/bin/erl", erlc="/usr/bin/erlc")
    fields[field] = value
    with pytest.raises(ToolchainError) as err:
        Toolchain(**fields)  # type: ignore[arg-type]
    assert message in err.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rebar 3.19.0 on Erlang/OTP 25 Erts 13.1.5\n", "3.19.0"),
        ("rebar 3.22.1+build.5 on Erlang/OTP 26 Erts 14.2\n", "3.22.1+build.5"),
    ],
)
def test_parse_rebar3_version(text: str, expected: str) -> None:
    assert parse_rebar3_version(text) == expected


@pytest.mark.parametrize("text", ["", "rebar3: command not found", "rebar $(id) on"])
def test_parse_rebar3_version_refuses_garbage(text: str) -> None:
    with pytest.raises(ToolchainError) as err:
        parse_rebar3_version(text)
    assert "cannot read a version from rebar3 output" in err.value.message
    assert repr(text.strip()) in err.value.message


def test_parse_elixir_version() -> None:
    text = "Erlang/OTP 25 [erts-13.1.5]\n\nElixir 1.14.0 (compiled with Erlang/OTP 24)\n"
    assert parse_elixir_version(text) == "1.14.0"
    with pytest.raises(ToolchainError, match="cannot read a version from elixir output"):
        parse_elixir_version("Erlang/OTP 25\n")


def test_missing_erlang_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ToolchainError) as err:
        probe_toolchain(path=str(tmp_path))
    assert "Erlang/OTP is not installed: erl not found on PATH" in err.value.message
    assert err.value.hint is not None and "erlang" in err.value.hint


def test_a_broken_erl_is_reported_with_its_status(tmp_path: Path) -> None:
    for tool in ("erl", "erlc"):
        script = tmp_path / tool
        script.write_text("#!/bin/sh\necho 'erl: broken install' >&2\nexit 3\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(ToolchainError) as err:
        probe_toolchain(path=str(tmp_path))
    assert "exited with status 3" in err.value.message
    assert "erl: broken install" in err.value.message
