"""Hostile trees given to ``store add``, and trees that differ only in non-content."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from storehelpers import SAMPLE, invoke, write_tree

from bstore.store.atomic import remove_tree
from bstore.store.local import LocalStore
from bstore.store.manifest import InvalidTreeError, compute_mcid


def _escaping_absolute(t: Path) -> str:
    (t / "lib" / "evil").symlink_to("/etc/passwd")
    return "symlink 'lib/evil' -> '/etc/passwd' points outside the tree"


def _escaping_relative(t: Path) -> str:
    (t / "lib" / "evil").symlink_to("../../outside")
    return "symlink 'lib/evil' -> '../../outside' points outside the tree"


def _outside_hardlink(t: Path) -> str:
    os.link(t / "README", t.parent / "outside-link")
    return "hardlinked from outside it (2 links, 1 inside)"


def _fifo(t: Path) -> str:
    os.mkfifo(t / "lib" / "pipe")
    return "'lib/pipe' is a FIFO"


def _socket(t: Path) -> str:
    path = t / "lib" / "sock"
    # AF_UNIX paths are limited to ~108 bytes: bind relative to the directory.
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path.name)
        s.close()
    finally:
        os.chdir(cwd)
    return "'lib/sock' is a socket"


def _device(t: Path) -> str:
    try:
        os.mknod(t / "lib" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating device nodes needs root")
    return "'lib/null' is a device"


def _long_name(t: Path) -> str:
    # 255 bytes is the kernel's NAME_MAX too, so exceed PATH_MAX with nesting instead.
    _make_deep(t / "lib" / "long", 17, "n" * 250)
    return "is too long"


@pytest.mark.parametrize(
    "make",
    [_escaping_absolute, _escaping_relative, _outside_hardlink, _fifo, _socket, _device,
     _long_name],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_hostile_tree_rejected(store: LocalStore, tmp_path: Path,
                               make: Callable[[Path], str]) -> None:
    tree = write_tree(tmp_path / "src" / "tree", SAMPLE)
    expected = make(tree)
    request_cleanup = tree.parent
    try:
        _check_rejected(store, tree, expected)
    finally:
        remove_tree(request_cleanup)


def _check_rejected(store: LocalStore, tree: Path, expected: str) -> None:
    with pytest.raises(InvalidTreeError) as info:
        store.add_path(tree)
    assert expected in info.value.message
    assert str(tree) in info.value.message
    assert info.value.hint
    assert store.valid_paths() == []
    assert os.listdir(store.store_dir) == [] and os.listdir(store.layout.tmp_dir) == []
    # store hash refuses the same tree the same way
    with pytest.raises(InvalidTreeError, match=expected.split("'")[1] if "'" in expected
                       else "links|4096|too long"):
        compute_mcid(tree)


def test_hostile_tree_via_cli(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", SAMPLE)
    os.mkfifo(tree / "fifo")
    root = tmp_path / "root"
    result = invoke(root, "store", "add", str(tree))
    assert result.exit_code == 1
    assert "'fifo' is a FIFO" in result.output and "hint:" in result.output
    assert os.listdir(root / "store") == [] and os.listdir(root / "tmp") == []


def _make_deep(top: Path, depth: int, name: str = "d") -> None:
    # Relative mkdir through directory descriptors: absolute paths would exceed PATH_MAX.
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("bottom")
    finally:
        os.close(fd)


@pytest.mark.slow
def test_100k_deep_tree_rejected(store: LocalStore, fast_tmp: Path) -> None:
    deep = fast_tmp / "deep"
    _make_deep(deep, 100_000)
    try:
        with pytest.raises(InvalidTreeError) as info:
            store.add_path(deep)
        assert "'d/d/d/d" in info.value.message and "is too long" in info.value.message
        assert "4096" in (info.value.hint or "")
        assert store.valid_paths() == []
        assert os.listdir(store.store_dir) == [] and os.listdir(store.layout.tmp_dir) == []
        with pytest.raises(InvalidTreeError):
            compute_mcid(deep)
    finally:
        remove_tree(deep)  # shutil.rmtree (py3.11) recurses and would overflow
    assert not deep.exists()


def _variant_umask(src: Path, dst: Path) -> None:
    old = os.umask(0o077)
    try:
        write_tree(dst, SAMPLE)
    finally:
        os.umask(old)


def _variant_mtime(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(dst):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (12345, 12345), follow_symlinks=False)


def _variant_owner(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    for dirpath, dirnames, filenames in os.walk(dst):
        for name in dirnames + filenames:
            os.chown(Path(dirpath) / name, 4321, 4321, follow_symlinks=False)


def _variant_hardlinks(src: Path, dst: Path) -> None:
    spec = {**SAMPLE, "copy-of-readme": "hello\n"}
    write_tree(dst, spec)
    (dst / "copy-of-readme").unlink()
    os.link(dst / "README", dst / "copy-of-readme")
    # the reference tree has the same content as two separate files
    (src / "copy-of-readme").write_text("hello\n")


def _variant_modes(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
    (dst / "README").chmod(0o600)
    (dst / "lib").chmod(0o700)
    (dst / "bin" / "run").chmod(0o700)  # still executable by its owner


@pytest.mark.parametrize(
    "variant",
    [_variant_umask, _variant_mtime, _variant_owner, _variant_hardlinks, _variant_modes],
    ids=lambda f: f.__name__.removeprefix("_variant_"),
)
def test_same_content_same_path(tmp_path: Path, variant: Callable[[Path, Path], None]
                                ) -> None:
    src = write_tree(tmp_path / "a" / "tree", SAMPLE)
    other = tmp_path / "b" / "tree"
    other.parent.mkdir()
    variant(src, other)
    with LocalStore.open(tmp_path / "root") as st:
        sp = st.add_path(src)
        assert compute_mcid(other) == compute_mcid(src)
        assert st.add_path(other) == sp
        assert len(st.valid_paths()) == 1


def test_executable_bit_is_content(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "a", SAMPLE)
    other = write_tree(tmp_path / "b", SAMPLE)
    (other / "README").chmod(0o755)
    assert compute_mcid(src) != compute_mcid(other)


def test_umask_does_not_leak_into_store(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "tree", SAMPLE)
    root = tmp_path / "root"
    # a fresh process with a hostile umask creates the store and adds the tree
    code = ("import os,sys; os.umask(0o277); from pathlib import Path;"
            "from bstore.store.local import LocalStore;"
            "s=LocalStore.open(Path(sys.argv[1])); print(s.add_path(Path(sys.argv[2])))")
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(root), str(src)], check=True,
                         capture_output=True, text=True).stdout.strip()
    real = root / "store" / out
    assert stat.S_IMODE((real / "README").stat().st_mode) == 0o444
    assert stat.S_IMODE((real / "bin" / "run").stat().st_mode) == 0o555
    assert stat.S_IMODE((real / "lib").stat().st_mode) == 0o555
    assert stat.S_IMODE(root.stat().st_mode) == 0o755


def test_odd_but_valid_entry_names(store: LocalStore, tmp_path: Path) -> None:
    tree = tmp_path / "odd"
    tree.mkdir()
    names = [b"new\nline", b"\xff\xfe-not-utf8", b"sp ace", b"-dash", b"..dots"]
    for n in names:
        with open(os.path.join(os.fsencode(tree), n), "wb") as f:
            f.write(n)
    sp = store.add_path(tree)
    real = os.fsencode(store.real_path(sp))
    assert sorted(os.listdir(real)) == sorted(names)
    for n in names:
        with open(os.path.join(real, n), "rb") as f:
            assert f.read() == n
    assert store.query_info(sp).mcid == compute_mcid(tree)
