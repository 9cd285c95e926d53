"""Build-system detection from the files a source tree ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from bstore.builders.buildsystems import BuildSystemNotDetected, detect_build_system

APP_SRC = "src/x.app.src"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"mix.exs": "", "rebar.config": "", APP_SRC: ""}, "mix"),
        ({"rebar.config": "", "Makefile": "include erlang.mk\n", APP_SRC: ""}, "rebar3"),
        ({"rebar.config.script": "CONFIG.", APP_SRC: ""}, "rebar3"),
        ({"Makefile": "PROJECT = x\ninclude erlang.mk\n", "erlang.mk": ""}, "make"),
        ({"GNUmakefile": "PROJECT = x\n-include $(CURDIR)/erlang.mk\n"}, "make"),
        ({"Makefile": "PROJECT = x\n  include ../../erlang.mk  \n"}, "make"),
        # A Makefile that is not erlang.mk's falls through to plain erlc.
        ({"Makefile": "all:\n\terlc src/*.erl\n", APP_SRC: ""}, "erlc"),
        ({"Makefile": "# include erlang.mk later\n", APP_SRC: ""}, "erlc"),
        ({APP_SRC: "", "src/x.erl": ""}, "erlc"),
    ],
)
def test_detection_table(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert detect_build_system(tmp_path) == expected


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"src/x.erl": "-module(x)."},
        {"Makefile": "all:\n\ttrue\n"},
        {"mix.exs/README": "a directory named mix.exs is not a project file"},
    ],
)
def test_nothing_detected_is_a_clear_error(tmp_path: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    with pytest.raises(BuildSystemNotDetected) as err:
        detect_build_system(tmp_path)
    assert f"cannot tell how to build {str(tmp_path)!r}" in err.value.message
    assert err.value.hint is not None and "rebar3" in err.value.hint


def test_missing_source_dir(tmp_path: Path) -> None:
    with pytest.raises(BuildSystemNotDetected, match="does not exist"):
        detect_build_system(tmp_path / "nope")
