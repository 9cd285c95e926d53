"""A generation as a store path: built from app specs and their realised outputs,
written once, read back strictly.

::

    store/<digest>-generation/
      manifest.json            see bstore.generations.manifest
      lib/<app>-<vsn>  ->  ../../<digest>-<app>-<vsn>/lib/<app>-<vsn>   (code path links)

The digest is computed from the manifest's content hash (kind ``generation``), so the
same content always lands on the same path. The path references every app output, so
GC keeps each output's closure as long as the generation is alive.

The ``lib/`` links need the store to accept symlinks into referenced store paths
(requested from the store owner, see ``helpers/GEN-needs.md``); until
``LocalStore.register_tree`` offers ``allowed_link_roots``, generations hold only
``manifest.json`` and :func:`code_path` resolves the same directories from the manifest
(what activators should use in any case: it needs no link resolution).
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import blake3

from bstore.errors import BstoreError
from bstore.generations.manifest import (
    MAX_MANIFEST_BYTES,
    AppEntry,
    GenerationManifest,
    ManifestError,
    SourceIdentity,
    now_utc,
    parse_manifest,
)
from bstore.specs.model import AppSpec
from bstore.store.local import LocalStore
from bstore.store.manifest import EntryType, Manifest
from bstore.store.paths import PathKind, StorePath, make_store_path

#: The name part of every generation store path (``<digest>-generation``).
GENERATION_NAME = "generation"
MANIFEST_FILE = "manifest.json"

# Manifests already read and checked, by the identity of their file. A generation's
# store path names its content and its files are never rewritten, so a switch need not
# parse and re-hash the same 50-app manifest again (~4 ms each time); the key holds the
# inode, size and ctime (which no one can set back), so a replaced or rewritten file is
# read afresh.
_LOADED: OrderedDict[tuple[str, int, int, int, int], GenerationManifest] = OrderedDict()
_LOADED_MAX = 32
_LOADED_LOCK = threading.Lock()


class GenerationError(BstoreError):
    """A generation that cannot be built, written or read."""


@dataclass(frozen=True)
class AppBuild:
    """What a generation is made of, per app: its spec and its realised output.

    ``resolved`` is what the source resolved to (e.g. the git commit of a branch).
    """

    spec: AppSpec
    output: StorePath
    resolved: str | None = None
    commit: str | None = None


def _app_dir_entries(manifest: Manifest, lib: bytes) -> tuple[dict[str, str], str]:
    """Module hashes of ``<lib>/ebin/*.beam`` and one hash over every other entry."""
    ebin = lib + b"/ebin/"
    modules: dict[str, str] = {}
    rest = blake3.blake3()
    for e in manifest.entries:
        name = e.path[len(ebin):]
        if (e.path.startswith(ebin) and b"/" not in name and name.endswith(b".beam")
                and e.type in (EntryType.FILE, EntryType.EXECUTABLE) and e.blake3_hex):
            modules[name[:-5].decode("utf-8", "replace")] = e.blake3_hex
        else:
            rest.update(b"%s %s %d %s\0" % (e.type.value.encode(), e.path, e.size,
                                            (e.blake3_hex or "-").encode()))
    return modules, str(rest.hexdigest())


def app_entry(store: LocalStore, build: AppBuild) -> AppEntry:
    """The manifest entry of one app, from its spec and the store's records of its
    output (module hashes come from the manifest recorded at registration)."""
    spec, output = build.spec, build.output
    if not store.is_valid(output):
        raise GenerationError(f"app {spec.name!r}: output {store.full_path(output)!r} is not"
                              " a valid store path", hint="realise the app first (bstore build)")
    info = store.query_info(output)
    recorded = store.query_manifest(output)
    lib = f"lib/{spec.name}-{spec.version}".encode()
    if not any(e.path == lib and e.type is EntryType.DIRECTORY for e in recorded.entries):
        raise GenerationError(
            f"app {spec.name!r}: output {store.full_path(output)!r} has no"
            f" {lib.decode()!r} directory",
            hint="the build output must hold lib/<app>-<vsn> (check name and version)")
    modules, resources = _app_dir_entries(recorded, lib)
    return AppEntry(
        name=spec.name, version=spec.version, output=output, mcid=info.mcid,
        closure=tuple(store.closure([output])), modules=modules, resources=resources,
        source=SourceIdentity.from_spec(spec.source, build.resolved), env=spec.env,
        isolation=spec.isolation, vm_config=spec.vm_config, health=spec.health,
        depends_on=spec.depends_on,
        origin=spec.origin.source if spec.origin is not None else None,
        commit=build.commit)


def _code_path(store: LocalStore, apps: Sequence[AppEntry]) -> dict[str, str]:
    """``lib/`` entry → ``<base>/lib/<entry>`` for the app dirs of every closure."""
    found: dict[str, str] = {}
    owner: dict[str, str] = {}
    for app in apps:
        for sp in app.closure:
            for e in store.query_manifest(sp).entries:
                parts = e.path.split(b"/")
                if len(parts) != 2 or parts[0] != b"lib" or e.type is not EntryType.DIRECTORY:
                    continue
                entry = parts[1].decode("utf-8", "replace")
                target = f"{sp}/lib/{entry}"
                if found.setdefault(entry, target) != target:
                    raise GenerationError(
                        f"lib/{entry} comes from two store paths: {found[entry].split('/')[0]}"
                        f" (for app {owner[entry]!r}) and {sp} (for app {app.name!r})",
                        hint="build both apps against the same dependency, or give them"
                        " different versions")
                owner.setdefault(entry, app.name)
    return found


def make_manifest(store: LocalStore, builds: Sequence[AppBuild], *, commit: str | None = None,
                  created: datetime | None = None) -> GenerationManifest:
    """The manifest of a generation running ``builds`` (outputs must be valid)."""
    apps = [app_entry(store, b) for b in builds]
    return GenerationManifest.of(apps, _code_path(store, apps),
                                 created=created or now_utc(), commit=commit)


def generation_path(store: LocalStore, manifest: GenerationManifest) -> StorePath:
    """The store path ``manifest`` is (or would be) written to."""
    return make_store_path(PathKind.GENERATION, manifest.content_hash(), str(store.store_dir),
                           GENERATION_NAME)


def write_generation(store: LocalStore, manifest: GenerationManifest) -> StorePath:
    """Make ``manifest`` a valid GENERATION store path (a no-op if it is one already)
    and keep it as a temporary root of this store handle. Atomic (register_tree)."""
    sp = generation_path(store, manifest)
    if store.is_valid(sp):
        store.add_temp_root(sp)
        return sp
    # The whole closure, not just the app outputs: lib/ links point into dependency
    # outputs too, and a store path may only link into paths it references.
    references = sorted({p for a in manifest.apps.values() for p in a.closure}, key=str)
    with store.staging_dir("generation") as stage:
        tree = stage / "generation"
        tree.mkdir()
        (tree / MANIFEST_FILE).write_bytes(manifest.to_bytes())
        if manifest.code_path:
            lib = tree / "lib"
            lib.mkdir()
            for entry, target in manifest.code_path.items():
                os.symlink(f"../../{target}", lib / entry)
        got = store.register_tree(tree, GENERATION_NAME, kind=PathKind.GENERATION,
                                  hash_hex=manifest.content_hash(), references=references)
    if got != sp:  # pragma: no cover - register_tree computes the same function
        raise GenerationError(f"generation registered as {got}, expected {sp}")
    return sp


def load_generation(store: LocalStore, sp: StorePath) -> GenerationManifest:
    """Read and check the manifest of the generation ``sp``.

    Refuses a path that is not a valid generation, a ``manifest.json`` that is not a
    regular file, too big, malformed, or whose content hash does not give ``sp``.
    """
    where = store.full_path(sp)
    if sp.name != GENERATION_NAME:
        raise GenerationError(f"{where!r} is not a generation (its name is not"
                              f" {GENERATION_NAME!r})")
    if not store.is_valid(sp):
        raise GenerationError(f"generation {where!r} is not a valid store path",
                              hint="it was deleted or never registered; switch to another"
                              " generation (bstore generations)")
    path = store.real_path(sp) / MANIFEST_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ManifestError(f"cannot read {str(path)!r}: {exc.strerror}",
                            hint="run bstore store verify --repair") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{str(path)!r} is not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{str(path)!r} is {st.st_size} bytes, more than"
                                f" {MAX_MANIFEST_BYTES}")
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)
        with _LOADED_LOCK:
            known = _LOADED.get(key)
            if known is not None:
                _LOADED.move_to_end(key)
                return known
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    manifest = parse_manifest(b"".join(chunks), str(path))
    if generation_path(store, manifest) != sp:
        raise ManifestError(f"{str(path)!r}: content hash {manifest.content_hash()} does not"
                            f" give the store path {str(sp)!r}",
                            hint="the manifest was replaced; run bstore store verify")
    with _LOADED_LOCK:
        _LOADED[key] = manifest
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    return manifest


def code_path(store: LocalStore, manifest: GenerationManifest) -> list[Path]:
    """The full ``lib/<app>-<vsn>`` directories of a generation (its Erlang code path)."""
    return [store.store_dir / target for target in manifest.code_path.values()]
