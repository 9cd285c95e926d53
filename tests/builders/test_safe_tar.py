"""Safe extraction: hostile archives are refused with a named member and leave nothing."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bstore.builders.safe_tar import (
    ExtractLimits,
    UnsafeArchiveError,
    extract_archive,
    extract_bytes,
)

Member = tuple[str, str, bytes | str, int]  # (name, kind, data-or-linkname, mode)


def make_tar(members: list[Member], compress: str = "") -> bytes:
    """A tar archive built member by member, hostile names and types included."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = str(payload)
            elif kind == "hard":
                info.type = tarfile.LNKTYPE
                info.linkname = str(payload)
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = 1, 3
            elif kind == "blk":
                info.type = tarfile.BLKTYPE
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info)
    data = buf.getvalue()
    if compress == "gz":
        return gzip.compress(data)
    if compress == "bz2":
        return bz2.compress(data)
    if compress == "xz":
        return lzma.compress(data)
    return data


def tree(root: Path) -> dict[str, str]:
    """Every entry under root as path -> kind/target/content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = full.read_bytes().decode()
    return out


@pytest.mark.parametrize("compress", ["", "gz", "bz2", "xz"])
def test_extracts_files_dirs_and_inside_symlinks(tmp_path: Path, compress: str) -> None:
    data = make_tar(
        [
            ("./", "dir", b"", 0o755),
            ("pkg/", "dir", b"", 0o700),
            ("pkg/src/a.erl", "file", b"-module(a).", 0o644),
            ("pkg/bin/run", "file", b"#!/bin/sh", 0o755),
            ("pkg/lib", "sym", "src", 0o777),
            ("pkg/src/up", "sym", "../bin/run", 0o777),
            ("pkg/copy.erl", "hard", "pkg/src/a.erl", 0o644),
        ],
        compress,
    )
    dest = tmp_path / "out"
    report = extract_bytes(data, dest, label="ok.tar")
    assert tree(dest) == {
        "pkg": "dir",
        "pkg/src": "dir",
        "pkg/bin": "dir",
        "pkg/lib": "-> src",
        "pkg/src/a.erl": "-module(a).",
        "pkg/src/up": "-> ../bin/run",
        "pkg/bin/run": "#!/bin/sh",
        "pkg/copy.erl": "-module(a).",
    }
    assert report.members == 7
    assert report.bytes_written == len(b"-module(a).") * 2 + len(b"#!/bin/sh")
    assert stat.S_IMODE((dest / "pkg/bin/run").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "pkg").stat().st_mode) == 0o755
    # The hard link is a copy: no inode is shared inside the output.
    assert (dest / "pkg/copy.erl").stat().st_ino != (dest / "pkg/src/a.erl").stat().st_ino


def test_setuid_and_sticky_bits_are_normalised(tmp_path: Path) -> None:
    data = make_tar(
        [
            ("suid", "file", b"x", 0o4755),
            ("sgid", "file", b"x", 0o2640),
            ("sticky/", "dir", b"", 0o1777),
            ("world", "file", b"x", 0o666),
        ]
    )
    extract_bytes(data, tmp_path / "out", label="modes.tar")
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"suid": 0o755, "sgid": 0o644, "sticky": 0o755, "world": 0o644}


HOSTILE: list[tuple[str, list[Member], str]] = [
    ("absolute", [("/etc/x", "file", b"pwned", 0o644)], "'/etc/x' has an absolute path"),
    ("dotdot", [("../x", "file", b"pwned", 0o644)], "'../x' contains '..'"),
    ("inner-dotdot", [("a/../../x", "file", b"pwned", 0o644)], "'a/../../x' contains '..'"),
    (
        "symlink-abs",
        [("etc", "sym", "/etc", 0o777)],
        "symlink 'etc' -> '/etc' points outside",
    ),
    (
        "symlink-climb",
        [("a/b", "sym", "../../x", 0o777)],
        "symlink 'a/b' -> '../../x' points outside",
    ),
    (
        "symlink-dot-trick",
        [("x", "sym", ".", 0o777), ("y", "sym", "x/..", 0o777)],
        "symlink 'y' -> 'x/..' points outside",
    ),
    (
        "symlink-then-write",
        [("a", "sym", "b", 0o777), ("b/", "dir", b"", 0o755), ("a/x", "file", b"pwned", 0o644)],
        "'a/x' would be written through the symlink 'a'",
    ),
    (
        "hardlink-passwd",
        [("passwd", "hard", "/etc/passwd", 0o644)],
        "'/etc/passwd' has an absolute path",
    ),
    (
        "hardlink-unknown",
        [("p", "hard", "later", 0o644), ("later", "file", b"x", 0o644)],
        "hard link 'p' -> 'later' does not name an earlier regular file",
    ),
    (
        "hardlink-to-symlink",
        [("s", "sym", "f", 0o777), ("h", "hard", "s", 0o644)],
        "hard link 'h' -> 's' does not name an earlier regular file",
    ),
    ("chardev", [("null", "chr", b"", 0o666)], "'null' is a device or FIFO"),
    ("blockdev", [("sda", "blk", b"", 0o666)], "'sda' is a device or FIFO"),
    ("fifo", [("pipe", "fifo", b"", 0o666)], "'pipe' is a device or FIFO"),
    (
        "file-over-dir",
        [("d/", "dir", b"", 0o755), ("d/f", "file", b"x", 0o644), ("d", "file", b"x", 0o644)],
        "'d' would replace a directory",
    ),
]


@pytest.mark.parametrize(
    ("members", "message"), [(m, msg) for _, m, msg in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_members_are_refused_and_nothing_is_left(
    tmp_path: Path, members: list[Member], message: str
) -> None:
    # A first harmless member proves that partial output is cleaned up on failure.
    data = make_tar([("first.txt", "file", b"ok", 0o644), *members], "gz")
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError) as info:
        extract_bytes(data, dest, label="evil.tar.gz")
    assert "'evil.tar.gz'" in info.value.message
    assert message in info.value.message
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_empty_target_is_emptied_not_removed(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    data = make_tar([("ok", "file", b"x", 0o644), ("../x", "file", b"x", 0o644)])
    with pytest.raises(UnsafeArchiveError):
        extract_bytes(data, dest, label="evil.tar")
    assert dest.is_dir()
    assert list(dest.iterdir()) == []


def test_non_empty_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("mine")
    with pytest.raises(UnsafeArchiveError, match="is not empty"):
        extract_bytes(make_tar([("a", "file", b"x", 0o644)]), tmp_path, label="a.tar")
    assert (tmp_path / "keep").read_text() == "mine"


def test_target_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UnsafeArchiveError, match="is not a directory"):
        extract_bytes(make_tar([("a", "file", b"x", 0o644)]), tmp_path / "file", label="a.tar")
    assert (tmp_path / "file").read_text() == "mine"


def test_gzip_bomb_stops_at_the_stream_cap(tmp_path: Path) -> None:
    # 64 MiB of zeros compresses to ~64 KiB; the cap stops it after 1 MiB of output.
    zeros = b"\0" * (64 * 1024 * 1024)
    bomb = make_tar([("big", "file", zeros, 0o644)], "gz")
    assert len(bomb) < 1024 * 1024
    limits = ExtractLimits(max_total_size=1024 * 1024, max_member_size=1 << 40)
    with pytest.raises(UnsafeArchiveError, match="unpacks to more than 1048576 bytes") as info:
        extract_bytes(bomb, tmp_path / "out", label="bomb.tar.gz", limits=limits)
    assert "bomb.tar.gz" in info.value.message
    assert not (tmp_path / "out").exists()


def test_member_size_cap(tmp_path: Path) -> None:
    data = make_tar([("big", "file", b"x" * 2000, 0o644)])
    limits = ExtractLimits(max_member_size=1000)
    with pytest.raises(UnsafeArchiveError, match="member 'big' is 2000 bytes, over the 1000"):
        extract_bytes(data, tmp_path / "out", label="a.tar", limits=limits)


def test_member_count_cap(tmp_path: Path) -> None:
    data = make_tar([(f"f{i}", "file", b"", 0o644) for i in range(11)])
    with pytest.raises(UnsafeArchiveError, match="more than 10 members"):
        extract_bytes(data, tmp_path / "out", label="a.tar", limits=ExtractLimits(max_members=10))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is not a tar archive at all" * 40, "is not a tar archive: invalid header"),
        (gzip.compress(b"x" * 5000)[:-30], "cannot be decompressed: Compressed file ended"),
        (b"\x1f\x8b\x08\x00garbage-after-gzip-magic", "is not a tar archive: zlib error"),
    ],
    ids=["not-tar", "truncated-gzip", "corrupt-gzip"],
)
def test_garbage_is_refused(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(UnsafeArchiveError, match=message) as info:
        extract_bytes(data, tmp_path / "out", label="junk.tgz")
    assert "'junk.tgz'" in info.value.message
    assert not (tmp_path / "out").exists()


def test_truncated_member_is_refused(tmp_path: Path) -> None:
    data = make_tar([("f", "file", b"y" * 4096, 0o644)])
    with pytest.raises(UnsafeArchiveError) as info:
        extract_bytes(data[:1024], tmp_path / "out", label="short.tar")
    assert "short.tar" in info.value.message
    assert not (tmp_path / "out").exists()


def test_extract_archive_from_file_and_missing_file(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_tar([("src/x.erl", "file", b"-module(x).", 0o644)], "gz"))
    extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out/src/x.erl").read_bytes() == b"-module(x)."
    with pytest.raises(UnsafeArchiveError, match=r"cannot open archive .*missing\.tar"):
        extract_archive(tmp_path / "missing.tar", tmp_path / "out2")


def test_later_member_replaces_earlier_file_and_symlink(tmp_path: Path) -> None:
    data = make_tar(
        [
            ("f", "file", b"old", 0o644),
            ("f", "file", b"new", 0o644),
            ("l", "sym", "f", 0o777),
            ("l", "file", b"plain", 0o644),
        ]
    )
    extract_bytes(data, tmp_path / "out", label="dup.tar")
    assert tree(tmp_path / "out") == {"f": "new", "l": "plain"}


def test_hard_link_bomb_counts_every_copy(tmp_path: Path) -> None:
    # 1 KiB stored once, linked 100 times: 100 KiB written from a ~60 KiB stream.
    members: list[Member] = [("f", "file", b"x" * 1024, 0o644)]
    members += [(f"l{i}", "hard", "f", 0o644) for i in range(100)]
    data = make_tar(members)
    limits = ExtractLimits(max_total_size=80 * 1024)
    assert len(data) < 80 * 1024
    with pytest.raises(UnsafeArchiveError, match="writes more than 81920 bytes") as info:
        extract_bytes(data, tmp_path / "out", label="links.tar", limits=limits)
    assert "at member 'l" in info.value.message
    assert not (tmp_path / "out").exists()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from(["", "gz"]))
def test_random_bytes_fail_only_with_unsafe_archive_errors(data: bytes, compress: str) -> None:
    payload = gzip.compress(data) if compress else data
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "out"
        try:
            extract_bytes(payload, dest, label="fuzz.tar")
        except UnsafeArchiveError:
            assert not dest.exists()
