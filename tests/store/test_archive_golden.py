"""Golden vectors of the manifest, MCID, store path and export stream formats.

The trees are described in ``golden/trees.json``; the expected bytes live next to it
and are quoted in docs/formats.md. ``BSTORE_REGEN_GOLDEN=1`` rewrites the files (only
do that for a deliberate format change, together with a version bump).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bstore.store.archive import write_path
from bstore.store.archive_format import LimitedInput, NullSink, StreamReader, StreamWriter
from bstore.store.archive_meta import PathMeta
from bstore.store.manifest import EntryType, Manifest, scan_tree
from bstore.store.paths import PathKind, StorePath, make_store_path

GOLDEN = Path(__file__).parent / "golden"
SPEC: dict[str, Any] = json.loads((GOLDEN / "trees.json").read_text())
STORE_DIR: str = SPEC["store_dir"]
DOCS = Path(__file__).parents[2] / "docs" / "formats.md"
REGEN = os.environ.get("BSTORE_REGEN_GOLDEN") == "1"


def build_tree(name: str, dest: Path) -> Path:
    """Materialise golden tree ``name`` at ``dest`` with deliberately odd modes/times."""
    tree = SPEC["trees"][name]
    if tree["root"] == "f":
        dest.write_text(tree["contents"])
        os.chmod(dest, 0o600)
        return dest
    dest.mkdir()
    for entry in tree["entries"]:
        path = dest / entry["path"]
        if entry["type"] == "d":
            path.mkdir()
        elif entry["type"] == "l":
            path.symlink_to(entry["target"])
        else:
            path.write_text(entry["contents"])
            # Mode bits other than the owner's x bit are not content.
            os.chmod(path, 0o750 if entry["type"] == "x" else 0o640)
            os.utime(path, (12345, 12345))
    return dest


def golden(name: str, actual: bytes) -> bytes:
    """The golden file's bytes (written from ``actual`` when regenerating)."""
    path = GOLDEN / name
    if REGEN:
        path.write_bytes(actual)
    return path.read_bytes()


def store_path_of(manifest: Manifest, name: str) -> StorePath:
    return make_store_path(PathKind.SOURCE, manifest.mcid.rpartition("-")[2], STORE_DIR, name)


def vectors(tmp_path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for key, tree in SPEC["trees"].items():
        manifest = scan_tree(build_tree(key, tmp_path / f"v-{key}"))
        out[key] = {
            "mcid": manifest.mcid,
            "nar_size": manifest.nar_size,
            "store_path": f"{STORE_DIR}/{store_path_of(manifest, tree['name'])}",
        }
    return out


@pytest.mark.parametrize("tree", sorted(SPEC["trees"]))
def test_manifest_bytes_match_golden(tree: str, tmp_path: Path) -> None:
    manifest = scan_tree(build_tree(tree, tmp_path / "t"))
    assert manifest.to_bytes() == golden(f"{tree}.manifest", manifest.to_bytes())
    assert Manifest.from_bytes((GOLDEN / f"{tree}.manifest").read_bytes()) == manifest


def test_mcid_and_store_paths_match_golden(tmp_path: Path) -> None:
    actual = vectors(tmp_path)
    text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    assert json.loads(golden("vectors.json", text.encode())) == actual


@pytest.mark.integration
@pytest.mark.parametrize("tree", sorted(SPEC["trees"]))
def test_golden_manifest_agrees_with_b3sum(tree: str, tmp_path: Path) -> None:
    """The golden hashes are independently checkable with the reference blake3 tool."""
    root = build_tree(tree, tmp_path / "t")
    data = (GOLDEN / f"{tree}.manifest").read_bytes()
    manifest = Manifest.from_bytes(data)
    for entry in manifest.files():
        if entry.type is EntryType.SYMLINK:
            content = os.readlink(root / os.fsdecode(entry.path))
            out = subprocess.run(["b3sum", "--no-names"], input=content.encode(),
                                 capture_output=True, check=True)
        else:
            target = root / os.fsdecode(entry.path) if entry.path else root
            out = subprocess.run(["b3sum", "--no-names", str(target)], capture_output=True,
                                 check=True)
        assert out.stdout.decode().strip() == entry.blake3_hex
    whole = subprocess.run(["b3sum", "--no-names", str(GOLDEN / f"{tree}.manifest")],
                           capture_output=True, check=True)
    vector = json.loads((GOLDEN / "vectors.json").read_text())[tree]
    assert vector["mcid"] == "mcid1-manifest-blake3-" + whole.stdout.decode().strip()


def golden_metas(tmp_path: Path) -> list[tuple[PathMeta, Manifest, Path]]:
    export = SPEC["export"]
    built = {}
    for key in export["paths"]:
        root = build_tree(key, tmp_path / f"e-{key}")
        manifest = scan_tree(root)
        built[key] = (store_path_of(manifest, SPEC["trees"][key]["name"]), manifest, root)
    out = []
    for key in export["paths"]:
        sp, manifest, root = built[key]
        meta = PathMeta(
            store_dir=STORE_DIR, path=sp, kind=PathKind.SOURCE,
            hash_hex=manifest.mcid.rpartition("-")[2], mcid=manifest.mcid,
            nar_size=manifest.nar_size,
            references=tuple(sorted((built[r][0] for r in export["references"][key]), key=str)),
            signatures=tuple(export["signatures"][key]),
        )
        out.append((meta, manifest, root))
    return out


def test_export_stream_matches_golden(tmp_path: Path) -> None:
    out = io.BytesIO()
    writer = StreamWriter(out)
    for meta, manifest, root in golden_metas(tmp_path):
        write_path(writer, meta, manifest, root)
    writer.finish()
    assert out.getvalue() == golden("export.stream", out.getvalue())


def test_golden_stream_reads_back(tmp_path: Path) -> None:
    expected = golden_metas(tmp_path)
    data = (GOLDEN / "export.stream").read_bytes()
    reader = StreamReader(LimitedInput(io.BytesIO(data), "export.stream", len(data)))
    for meta, manifest, _root in expected:
        assert reader.next_path() == meta
        assert reader.read_tree(meta, NullSink()) == manifest
    assert reader.next_path() is None


def test_golden_path_meta_block_is_canonical(tmp_path: Path) -> None:
    for meta, _m, _r in golden_metas(tmp_path):
        assert PathMeta.from_bytes(meta.to_bytes()) == meta


def test_docs_quote_the_golden_vectors() -> None:
    """docs/formats.md shows the same bytes the code produces (no drift)."""
    docs = DOCS.read_text()
    for key, vector in json.loads((GOLDEN / "vectors.json").read_text()).items():
        assert vector["mcid"] in docs, key
        assert vector["store_path"] in docs, key
    hello = (GOLDEN / "hello.manifest").read_text()
    assert hello in docs
    assert (GOLDEN / "export.stream").read_text() in docs
