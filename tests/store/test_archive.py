"""Export and import of real store paths: round trips, determinism, order, the CLI."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from bstore.errors import BstoreError
from bstore.store.archive import export_order, export_paths, import_stream, path_meta, write_path
from bstore.store.archive_format import StreamWriter
from bstore.store.local import LocalStore
from bstore.store.manifest import scan_tree
from bstore.store.paths import PathKind, StorePath

BSTORE = str(Path(sys.executable).with_name("bstore"))


def make_tree(base: Path, files: dict[str, str | bytes]) -> Path:
    """Files by relative path; a value starting with '->' makes a symlink; a key ending
    in '*' an executable."""
    base.mkdir(parents=True)
    for rel, value in files.items():
        path = base / rel.rstrip("*")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, str) and value.startswith("->"):
            path.symlink_to(value[2:])
        else:
            path.write_bytes(value.encode() if isinstance(value, str) else value)
            path.chmod(0o755 if rel.endswith("*") else 0o644)
    return base


def add_with_refs(st: LocalStore, tree: Path, name: str, refs: tuple[StorePath, ...],
                  signatures: tuple[str, ...] = ()) -> StorePath:
    """Register a copy of ``tree`` as a source path that references ``refs``."""
    with st.staging_dir("test") as stage:
        shutil.copytree(tree, stage / "tree", symlinks=True)
        return st.register_tree(stage / "tree", name, kind=PathKind.SOURCE, references=refs,
                                signatures=signatures)


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[tuple[LocalStore, dict[str, StorePath]]]:
    """libc <- erts <- app, plus an unrelated path; one 3 MiB file crosses buffers."""
    root = tmp_path / "root"
    st = LocalStore.open(root)
    libc = st.add_path(make_tree(tmp_path / "libc", {"lib/libc.so": os.urandom(3 << 20)}),
                       "libc")
    erts = add_with_refs(st, make_tree(tmp_path / "erts", {
        "bin/erl*": "#!/bin/sh\nexec beam\n", "bin/current": "->erl",
        "lib/a.txt": "", "lib/a/b": "b\n"}), "erts-13", (libc,))
    app = add_with_refs(st, make_tree(tmp_path / "app", {"ebin/app.beam": b"\x00BEAM"}),
                        "app-1.0", (erts, libc), signatures=("key-1:c2ln",))
    other = st.add_path(make_tree(tmp_path / "other", {"x": "y"}), "other")
    try:
        yield st, {"libc": libc, "erts": erts, "app": app, "other": other}
    finally:
        with contextlib.suppress(BstoreError):  # some tests close it themselves
            st.close()


def export_bytes(st: LocalStore, paths: list[StorePath], closure: bool = True) -> bytes:
    out = io.BytesIO()
    export_paths(st, paths, out, closure=closure)
    return out.getvalue()


def wipe(root: Path) -> None:
    """Delete a store root completely (store paths are read-only)."""
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)
    shutil.rmtree(root)


def test_round_trip_into_an_empty_store_at_the_same_root(
        populated: tuple[LocalStore, dict[str, StorePath]]) -> None:
    st, p = populated
    data = export_bytes(st, [p["app"]])
    before = {sp: (st.query_info(sp), scan_tree(st.real_path(sp)))
              for sp in (p["libc"], p["erts"], p["app"])}
    root = st.root
    st.close()
    wipe(root)
    with LocalStore.open(root) as fresh:
        result = import_stream(fresh, io.BytesIO(data))
        assert [r.path for r in result] == [p["libc"], p["erts"], p["app"]]
        assert all(r.added for r in result)
        assert sorted(fresh.valid_paths(), key=str) == sorted(before, key=str)
        for sp, (info, manifest) in before.items():
            got = fresh.query_info(sp)
            assert (got.mcid, got.references, got.signatures, got.kind, got.nar_size) == (
                info.mcid, info.references, info.signatures, info.kind, info.nar_size)
            assert scan_tree(fresh.real_path(sp)) == manifest
            assert fresh.query_manifest(sp) == manifest
        assert os.listdir(root / "tmp") == []
        # Exported again from the new store (other registration times): same bytes.
        assert export_bytes(fresh, [p["app"]]) == data


def test_export_is_deterministic_and_independent_of_argument_order(
        populated: tuple[LocalStore, dict[str, StorePath]]) -> None:
    st, p = populated
    first = export_bytes(st, [p["app"], p["other"]])
    assert export_bytes(st, [p["other"], p["app"]]) == first
    assert export_bytes(st, [p["other"], p["app"], p["libc"]]) == first
    assert first[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    params = zstandard.get_frame_parameters(first)
    assert params.window_size <= 1 << 23
    assert params.has_checksum


def test_closure_order_is_dependencies_first(
        populated: tuple[LocalStore, dict[str, StorePath]]) -> None:
    st, p = populated
    out = io.BytesIO()
    order = export_paths(st, [p["app"], p["other"]], out)
    assert order.index(p["libc"]) < order.index(p["erts"]) < order.index(p["app"])
    assert set(order) == set(p.values())
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.getvalue())) as reader:
        lines = reader.read().split(b"\n")
    names = [line.split(b"/")[-1].decode() for line in lines if b"StorePath: " in line]
    assert names == [str(sp) for sp in order]


def test_no_closure_exports_only_the_given_paths(
        populated: tuple[LocalStore, dict[str, StorePath]], tmp_path: Path) -> None:
    st, p = populated
    out = io.BytesIO()
    assert export_paths(st, [p["app"], p["libc"]], out, closure=False) == [p["libc"], p["app"]]
    root = st.root
    st.close()
    wipe(root)
    with LocalStore.open(root) as fresh:
        with pytest.raises(BstoreError) as info:
            import_stream(fresh, io.BytesIO(out.getvalue()))
        assert f"reference {root}/store/{p['erts']} is neither valid" in info.value.message
        assert fresh.valid_paths() == []


def test_export_order_is_topological_with_name_ties() -> None:
    a, b, c = (StorePath.parse(f"{d * 32}-{n}") for d, n in (("0", "a"), ("1", "b"), ("2", "c")))
    refs = {a: [], b: [a], c: [a, c]}
    assert export_order(lambda sp: refs[sp], [c, b, a]) == [a, b, c]
    assert export_order(lambda sp: refs[sp], [c, b]) == [b, c]
    cyc = {a: [b], b: [a]}
    with pytest.raises(BstoreError, match="reference cycle"):
        export_order(lambda sp: cyc[sp], [a, b])


def test_store_export_matches_the_pure_writer(
        populated: tuple[LocalStore, dict[str, StorePath]]) -> None:
    """What the store writes is exactly the documented framing of its metadata and
    manifest (the golden vectors check the framing itself)."""
    st, p = populated
    expected = io.BytesIO()
    writer = StreamWriter(expected)
    for sp in st.closure([p["app"]]):
        write_path(writer, path_meta(st, sp), st.query_manifest(sp), st.real_path(sp))
    writer.finish()
    data = export_bytes(st, [p["app"]])
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
        assert reader.read() == expected.getvalue()


def test_importing_valid_paths_writes_nothing(
        populated: tuple[LocalStore, dict[str, StorePath]]) -> None:
    st, p = populated
    data = export_bytes(st, [p["app"]])
    inode = (st.real_path(p["libc"]) / "lib" / "libc.so").stat().st_ino
    result = import_stream(st, io.BytesIO(data))
    assert [r.added for r in result] == [False, False, False]
    assert (st.real_path(p["libc"]) / "lib" / "libc.so").stat().st_ino == inode


def test_export_refuses_a_damaged_path(
        populated: tuple[LocalStore, dict[str, StorePath]]) -> None:
    st, p = populated
    target = st.real_path(p["erts"]) / "lib" / "a" / "b"
    target.chmod(0o644)
    target.write_text("B\n")
    with pytest.raises(BstoreError) as info:
        export_bytes(st, [p["app"]])
    assert f"refusing to export {st.real_path(p['erts'])}/lib/a/b: expected blake3" in \
        info.value.message
    assert "--repair" in (info.value.hint or "")


def test_export_refuses_an_unknown_path(
        populated: tuple[LocalStore, dict[str, StorePath]]) -> None:
    st, _ = populated
    ghost = StorePath.parse("0" * 32 + "-ghost")
    with pytest.raises(BstoreError, match=r"cannot export \S+-ghost: it is not a valid path"):
        export_bytes(st, [ghost])


@pytest.mark.integration
def test_cli_export_and_import_through_pipes(
        populated: tuple[LocalStore, dict[str, StorePath]], tmp_path: Path) -> None:
    st, p = populated
    env = {**os.environ, "BSTORE_ROOT": str(st.root)}
    app = st.full_path(p["app"])
    exported = subprocess.run([BSTORE, "store", "export", app], env=env, capture_output=True,
                              check=True)
    assert "exported 3 path(s)" in exported.stderr.decode()
    assert exported.stdout == export_bytes(st, [p["app"]])
    out_file = tmp_path / "app.bst"
    subprocess.run([BSTORE, "store", "export", "--no-closure", "-o", str(out_file),
                    st.full_path(p["other"])], env=env, check=True)
    assert out_file.read_bytes() == export_bytes(st, [p["other"]], closure=False)
    root = st.root
    st.close()
    wipe(root)
    imported = subprocess.run([BSTORE, "store", "import"], env=env, input=exported.stdout,
                              capture_output=True, check=True)
    lines = imported.stdout.decode().splitlines()
    assert lines == [f"{root}/store/{p[k]}" for k in ("libc", "erts", "app")]
    again = subprocess.run([BSTORE, "--json", "store", "import", str(out_file)], env=env,
                           capture_output=True, check=True, text=True)
    assert f'"path": "{root}/store/{p["other"]}"' in again.stdout
    assert '"added": true' in again.stdout
    bad = subprocess.run([BSTORE, "store", "import"], env=env, input="garbage",
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "error: <stdin>: not a valid zstd stream" in bad.stderr


def test_output_path_with_deriver_round_trips(
        populated: tuple[LocalStore, dict[str, StorePath]], tmp_path: Path) -> None:
    """An OUTPUT path is named by its derivation hash, which the stream carries."""
    st, p = populated
    drv_hash = "5a" * 32
    tree = make_tree(tmp_path / "out", {"ebin/x.beam": b"BEAM", "bin/start*": "#!/bin/sh\n"})
    with st.staging_dir("test") as stage:
        shutil.copytree(tree, stage / "tree", symlinks=True)
        out_path = st.register_tree(stage / "tree", "x-1.0", kind=PathKind.OUTPUT,
                                    hash_hex=drv_hash, references=(p["erts"],),
                                    deriver=str(p["other"]))
    data = export_bytes(st, [out_path])
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
        text = reader.read()
    assert f"Kind: output\nHash: blake3:{drv_hash}\n".encode() in text
    assert f"Deriver: {p['other']}\n".encode() in text
    root = st.root
    st.close()
    wipe(root)
    with LocalStore.open(root) as fresh:
        result = import_stream(fresh, io.BytesIO(data))
        assert result[-1].path == out_path
        info = fresh.query_info(out_path)
        assert (info.kind, info.hash_hex, info.references) == (
            PathKind.OUTPUT, drv_hash, (p["erts"],))
        assert info.deriver is not None and info.deriver.endswith(str(p["other"]))


def test_built_outputs_and_generations_round_trip(tmp_path: Path) -> None:
    """An output registered with a derivation hash as deriver, and a generation whose
    lib/ link leads into it, export and import like any other path."""
    root = tmp_path / "root"
    drv = "ab" * 32
    with LocalStore.open(root) as st:
        with st.staging_dir("out") as stage:
            make_tree(stage / "o", {"lib/web-1.0/ebin/web.beam": b"\x00BEAM"})
            out = st.register_tree(stage / "o", "web-1.0", kind=PathKind.OUTPUT,
                                   hash_hex=drv, deriver=drv)
        with st.staging_dir("gen") as stage:
            (stage / "g" / "lib").mkdir(parents=True)
            os.symlink(f"../../{out}/lib/web-1.0", stage / "g" / "lib" / "web-1.0")
            gen = st.register_tree(stage / "g", "generation", kind=PathKind.GENERATION,
                                   hash_hex="cd" * 32, references=[out])
        data = export_bytes(st, [gen])
    wipe(root)
    with LocalStore.open(root) as fresh:
        assert [r.path for r in import_stream(fresh, io.BytesIO(data))] == [out, gen]
        assert fresh.query_info(out).deriver == drv
        assert (fresh.real_path(gen) / "lib" / "web-1.0" / "ebin" / "web.beam").exists()
