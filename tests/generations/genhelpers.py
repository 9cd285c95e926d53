"""Helpers for generation tests: real ``.beam`` files from ``erlc``, fake app outputs
registered in a real store, app specs, and a subprocess runner for crash tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import blake3

from bstore.generations.generation import AppBuild
from bstore.specs.model import AppSpec, IconSpec, Isolation, SourceSpec, SourceType, VmConfig
from bstore.specs.terms.model import Atom, Term
from bstore.store.local import LocalStore
from bstore.store.paths import PathKind, StorePath

#: Modules compiled in every variant; ``version()`` returns the variant number.
MODULES = ("web", "web_util", "db", "api", "core")


def compile_variants(base: Path, variants: Sequence[int] = (1, 2)) -> dict[int, dict[str, bytes]]:
    """``{variant: {module: beam bytes}}``, compiled by one ``erlc`` run per variant."""
    out: dict[int, dict[str, bytes]] = {}
    for v in variants:
        src = base / f"v{v}"
        src.mkdir(parents=True, exist_ok=True)
        for mod in MODULES:
            (src / f"{mod}.erl").write_text(
                f"-module({mod}).\n-export([version/0]).\nversion() -> {v}.\n")
        subprocess.run(["erlc", "-o", str(src), *(str(src / f"{m}.erl") for m in MODULES)],
                       check=True, capture_output=True)
        out[v] = {m: (src / f"{m}.beam").read_bytes() for m in MODULES}
    return out


def make_output(store: LocalStore, name: str, version: str, beams: Mapping[str, bytes],
                references: Sequence[StorePath] = (), priv: str | None = None,
                extra_lib: tuple[str, str] | None = None) -> StorePath:
    """Register an OUTPUT path ``lib/<name>-<version>/{ebin/*.beam,ebin/<name>.app}``
    (plus ``priv/data`` and another lib dir when asked), like a build output."""
    with store.staging_dir("test-out") as stage:
        tree = stage / "out"
        ebin = tree / "lib" / f"{name}-{version}" / "ebin"
        ebin.mkdir(parents=True)
        for mod, data in beams.items():
            (ebin / f"{mod}.beam").write_bytes(data)
        mods = ",".join(sorted(beams))
        (ebin / f"{name}.app").write_text(
            f'{{application,{name},[{{vsn,"{version}"}},{{modules,[{mods}]}}]}}.\n')
        if priv is not None:
            (tree / "lib" / f"{name}-{version}" / "priv").mkdir()
            (tree / "lib" / f"{name}-{version}" / "priv" / "data").write_text(priv)
        if extra_lib is not None:
            (tree / "lib" / f"{extra_lib[0]}-{extra_lib[1]}" / "ebin").mkdir(parents=True)
        digest = blake3.blake3()
        for part in (name, version, repr(sorted(beams.items())), priv or "", repr(extra_lib),
                     repr(sorted(map(str, references)))):
            digest.update(part.encode() if isinstance(part, str) else part)
            digest.update(b"\0")
        return store.register_tree(tree, f"{name}-{version}", kind=PathKind.OUTPUT,
                                   hash_hex=digest.hexdigest(), references=references)


def spec(name: str, version: str, *, env: Mapping[str, Term] | None = None,
         depends_on: Sequence[str] = (), vm: bool = False, ref: str | None = None) -> AppSpec:
    """A hex-sourced app spec."""
    return AppSpec(
        name=name, version=version,
        source=SourceSpec(SourceType.HEX, ref=ref or version),
        icon=IconSpec.identicon(name),
        env={Atom(k): v for k, v in (env or {}).items()},
        depends_on=tuple(depends_on),
        isolation=Isolation.VM if vm else Isolation.EMBEDDED,
        vm_config=VmConfig(memory_limit=256) if vm else None)


def build(store: LocalStore, name: str, version: str, beams: Mapping[str, bytes],
          **spec_kw: object) -> AppBuild:
    """An output with ``beams`` plus its spec, ready for ``make_manifest``."""
    return AppBuild(spec(name, version, **spec_kw),  # type: ignore[arg-type]
                    make_output(store, name, version, beams))


def run_python(code: str, root: Path, env: Mapping[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (for crash points: it SIGKILLs itself)."""
    full = {**os.environ, "BSTORE_ROOT": str(root), **(env or {})}
    if env is None or "BSTORE_CRASH_AT" not in env:
        full.pop("BSTORE_CRASH_AT", None)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, timeout=120)


def bstore_cmd() -> list[str]:
    """The installed ``bstore`` console script next to this interpreter."""
    return [str(Path(sys.executable).with_name("bstore"))]


def dump(obj: object) -> str:
    """Compact JSON (for passing values into subprocess code)."""
    return json.dumps(obj)


def fake_output(name: str, version: str, salt: str = "") -> StorePath:
    """A store path base name for an output that need not exist (pure tests)."""
    from bstore.store.paths import make_store_path

    digest = blake3.blake3(f"{name}-{version}-{salt}".encode()).hexdigest()
    return make_store_path(PathKind.OUTPUT, digest, "/nonexistent/store", f"{name}-{version}")


def fake_entry(name: str, version: str = "1.0", *, modules: Mapping[str, str] | None = None,
               env: Mapping[str, Term] | None = None, depends_on: Sequence[str] = (),
               deps: Sequence[StorePath] = (), resources: str = "r", vm: bool = False,
               vm_memory: int = 256, ref: str | None = None, salt: str = "",
               health_port: int | None = None) -> object:
    """A pure :class:`AppEntry`: module bodies and resources are given as short labels
    (hashed), the output path is derived from everything that changes the build."""
    from bstore.generations.manifest import AppEntry, SourceIdentity
    from bstore.specs.model import HealthSpec, HealthType

    mods = {m: blake3.blake3(body.encode()).hexdigest()
            for m, body in (modules or {name: "v1"}).items()}
    build_id = f"{sorted(mods.items())}{resources}{salt}"
    output = fake_output(name, version, build_id)
    mcid = "mcid1-manifest-blake3-" + blake3.blake3(build_id.encode()).hexdigest()
    return AppEntry(
        name=name, version=version, output=output, mcid=mcid,
        closure=(*deps, output), modules=mods,
        resources=blake3.blake3(resources.encode()).hexdigest(),
        source=SourceIdentity(SourceType.HEX, ref=ref or version),
        env={Atom(k): v for k, v in (env or {}).items()},
        isolation=Isolation.VM if vm else Isolation.EMBEDDED,
        vm_config=VmConfig(memory_limit=vm_memory) if vm else None,
        health=None if health_port is None else HealthSpec(HealthType.TCP, port=health_port),
        depends_on=tuple(depends_on))
