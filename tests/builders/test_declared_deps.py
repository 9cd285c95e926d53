"""Reading the Hex dependencies a source declares (rebar.config, mix.exs, erlang.mk
Makefile) and its lock file, without running anything; hostile and unsupported forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from bstore.builders.declared_deps import DeclaredDepsError, read_declared_deps


def deps_of(tmp_path: Path, system: str, files: dict[str, str]) -> list[tuple[str, str, str]]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    got = read_declared_deps(tmp_path, system)
    return [(r.package, r.requirement, r.app or "") for r in got.requested]


@pytest.mark.parametrize(("text", "expected"), [
    ("{deps, []}.", []),
    ("{erl_opts, []}.", []),
    ("{deps, [cowboy]}.", [("cowboy", ">= 0.0.0", "cowboy")]),
    ('{deps, [{cowboy, "2.9.0"}]}.', [("cowboy", "2.9.0", "cowboy")]),
    ('{deps, [{cowboy, "~> 2.9"}, jsx]}.',
     [("cowboy", "~> 2.9", "cowboy"), ("jsx", ">= 0.0.0", "jsx")]),
    ("{deps, [{myapp, {pkg, real_pkg}}]}.", [("real_pkg", ">= 0.0.0", "myapp")]),
    ('{deps, [{myapp, "1.0.0", {pkg, real_pkg}}]}.', [("real_pkg", "1.0.0", "myapp")]),
    ('{deps, [{a, <<"~> 1.0">>}]}.', [("a", "~> 1.0", "a")]),
])
def test_rebar_config(tmp_path: Path, text: str, expected: list[tuple[str, str, str]]) -> None:
    assert deps_of(tmp_path, "rebar3", {"rebar.config": text}) == expected


@pytest.mark.parametrize(("text", "message"), [
    ('{deps, [{x, {git, "https://h/x.git", {tag, "1"}}}]}.', "dependency .* is not a Hex"),
    ('{deps, [{x, ".*", {git, "u", {branch, "m"}}}]}.', "is not a Hex package"),
    ("{deps, nope}.", "deps is not a list"),
    ("{deps, [", "rebar.config"),
    ('{deps, [{x, "not a version"}]}.', "x"),
])
def test_rebar_config_bad(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DeclaredDepsError, match=message):
        deps_of(tmp_path, "rebar3", {"rebar.config": text})


MIX = """defmodule A.MixProject do
  use Mix.Project
  def project, do: [app: :a, version: "1.0.0", deps: deps()]
  defp deps do
    [
      {:jason, "~> 1.4"},  # a comment with ] in it
      {:plug, "~> 1.14", optional: true},
      {:credo, "~> 1.7", only: [:dev, :test], runtime: false},
      {:telemetry, "~> 1.0", only: :prod},
      {:renamed, "~> 0.1", hex: :real_name, repo: "private"},
    ]
  end
end
"""


def test_mix_exs(tmp_path: Path) -> None:
    (tmp_path / "mix.exs").write_text(MIX)
    got = read_declared_deps(tmp_path, "mix")
    assert [(r.package, r.requirement, r.optional, r.repository) for r in got.requested] == [
        ("jason", "~> 1.4", False, "hexpm"),
        ("plug", "~> 1.14", True, "hexpm"),
        ("telemetry", "~> 1.0", False, "hexpm"),
        ("real_name", "~> 0.1", False, "private"),
    ]


@pytest.mark.parametrize(("deps", "message"), [
    ('[{:x, git: "https://h/x.git"}]', "'x' is a git dependency"),
    ('[{:x, path: "../x"}]', "'x' is a path dependency"),
    ('[{:x, github: "o/x"}]', "'x' is a github dependency"),
    ("[{:x, some_function()}]", "not a plain literal"),
    ('[{:x, "~> 1.0"}', "not closed"),
    ('["x"]', "is not a {:name, ...} tuple"),
])
def test_mix_exs_bad(tmp_path: Path, deps: str, message: str) -> None:
    (tmp_path / "mix.exs").write_text(f"defmodule A do\n  defp deps, do: {deps}\nend\n")
    with pytest.raises(DeclaredDepsError, match=message):
        read_declared_deps(tmp_path, "mix")


def test_mix_lock_pins(tmp_path: Path) -> None:
    (tmp_path / "mix.exs").write_text(
        'defmodule A do\n  defp deps, do: [{:jason, "~> 1.0"}]\nend\n')
    (tmp_path / "mix.lock").write_text(
        '%{\n  "jason": {:hex, :jason, "1.4.0", "abc", [:mix], [], "hexpm", "def"},\n}\n')
    got = read_declared_deps(tmp_path, "mix", label="app")
    assert got.lock == {"jason": "1.4.0"} and got.lock_file == "app/mix.lock"


def test_erlang_mk(tmp_path: Path) -> None:
    makefile = ("PROJECT = x\nDEPS = cowboy jsx\nBUILD_DEPS += lager\n"
                "dep_cowboy = hex 2.9.0\ndep_jsx = hex 3.1.0 jsx_pkg\n"
                "dep_lager = hex 3.9.2\ninclude erlang.mk\n")
    assert deps_of(tmp_path, "make", {"Makefile": makefile}) == [
        ("cowboy", "== 2.9.0", "cowboy"), ("jsx_pkg", "== 3.1.0", "jsx"),
        ("lager", "== 3.9.2", "lager")]


@pytest.mark.parametrize("line", ["", "dep_cowboy = git https://h/c.git 2.9.0"])
def test_erlang_mk_bad(tmp_path: Path, line: str) -> None:
    with pytest.raises(DeclaredDepsError, match="'cowboy' has no 'dep_cowboy = hex"):
        deps_of(tmp_path, "make", {"Makefile": f"DEPS = cowboy\n{line}\ninclude erlang.mk\n"})


def test_erlc_declares_nothing(tmp_path: Path) -> None:
    assert read_declared_deps(tmp_path, "erlc").requested == ()


def test_huge_build_file_refused(tmp_path: Path) -> None:
    (tmp_path / "rebar.config").write_bytes(b"%" * (2 << 20))
    with pytest.raises(DeclaredDepsError, match="larger than"):
        read_declared_deps(tmp_path, "rebar3")


def test_mix_lock_stands_in_for_computed_deps(tmp_path: Path) -> None:
    (tmp_path / "mix.exs").write_text(
        "defmodule A do\n  defp deps, do: [{:jason, version()}]\nend\n")
    with pytest.raises(DeclaredDepsError, match="not a plain literal"):
        read_declared_deps(tmp_path, "mix")
    (tmp_path / "mix.lock").write_text(
        '%{\n  "jason": {:hex, :jason, "1.4.0", "abc", [:mix], [], "hexpm", "def"},\n'
        '  "dep": {:git, "https://h/dep.git", "0123abc", [branch: "main"]},\n}\n')
    got = read_declared_deps(tmp_path, "mix")
    assert [(r.package, r.requirement, r.repository) for r in got.requested] == [
        ("jason", "== 1.4.0", "hexpm")]
    assert got.lock == {"jason": "1.4.0"}
