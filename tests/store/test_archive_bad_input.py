"""Hostile export streams: each is refused before anything is registered, the error
names the entry (or record), and nothing is left in ``store/`` or ``tmp/``."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest
import zstandard

from bstore.errors import BstoreError
from bstore.store.archive import import_stream
from bstore.store.archive_format import (
    STREAM_HEADER,
    ArchiveError,
    LimitedInput,
    NullSink,
    StreamReader,
)
from bstore.store.archive_meta import PathMeta
from bstore.store.local import LocalStore
from bstore.store.manifest import MANIFEST_HEADER, Mcid
from bstore.store.paths import PathKind, StorePath, make_store_path

MIB = 1 << 20


@dataclass
class Entry:
    """One raw entry line plus body; fields may lie on purpose."""

    type: str
    path: bytes
    body: bytes | None = None
    size: int | None = None
    digest: str | None = None
    stream_body: bytes | None = None  # what is actually written after the line

    def line(self) -> bytes:
        if self.type == "d":
            return b"d 0 - %d:" % len(self.path) + self.path + b"\n"
        body = self.body or b""
        size = len(body) if self.size is None else self.size
        digest = self.digest or blake3.blake3(body).hexdigest()
        return f"{self.type} {size} {digest} {len(self.path)}:".encode() + self.path + b"\n"

    def framed(self) -> bytes:
        if self.type == "d":
            return self.line()
        body = self.body if self.stream_body is None else self.stream_body
        return self.line() + (body or b"") + b"\n"


@dataclass
class Record:
    """One path record. The metadata is honest about the entries unless overridden."""

    entries: list[Entry]
    name: str = "bad"
    references: tuple[StorePath, ...] = ()
    mcid: str | None = None
    hash_hex: str | None = None
    nar_size: int | None = None
    meta_override: Callable[[bytes], bytes] | None = None
    path: StorePath | None = field(default=None, init=False)

    def honest_mcid(self) -> str:
        data = MANIFEST_HEADER + b"".join(e.line() for e in self.entries)
        return "mcid1-manifest-blake3-" + blake3.blake3(data).hexdigest()

    def meta_block(self, store_dir: str) -> bytes:
        mcid = self.mcid or self.honest_mcid()
        hash_hex = self.hash_hex or mcid.rpartition("-")[2]
        sp = make_store_path(PathKind.SOURCE, hash_hex, store_dir, self.name)
        self.path = sp
        size = sum(len(e.body or b"") if e.size is None else e.size for e in self.entries
                   if e.type != "d")
        block = (
            f"StorePath: {store_dir}/{sp}\nKind: source\nHash: blake3:{hash_hex}\n"
            f"MCID: {mcid}\nNarSize: {size if self.nar_size is None else self.nar_size}\n"
            "References:" + "".join(f" {r}" for r in self.references) + "\n"
        ).encode()
        return self.meta_override(block) if self.meta_override else block


def build_stream(store_dir: str, records: list[Record], *, header: bytes = STREAM_HEADER,
                 trailer: bytes | None = None) -> bytes:
    """The uncompressed stream bytes."""
    out = [header]
    for rec in records:
        block = rec.meta_block(store_dir)
        out.append(b"path %d:" % len(block) + block + b"\n")
        out.extend(e.framed() for e in rec.entries)
        out.append(b"end\n")
    out.append(b"done %d\n" % len(records) if trailer is None else trailer)
    return b"".join(out)


def compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(data)


ROOT = Entry("d", b"")


def good(name: str = "good", text: bytes = b"fine\n") -> Record:
    return Record([ROOT, Entry("f", b"ok.txt", text)], name=name)


def deep_dirs(depth: int) -> list[Entry]:
    return [ROOT] + [Entry("d", b"/".join([b"d"] * n)) for n in range(1, depth + 1)]


@dataclass
class Case:
    """A hostile stream: builder(store_dir, valid_path) -> compressed bytes."""

    build: Callable[[str, StorePath], bytes]
    message: str  # regex the error message must match
    max_bytes: int | None = None


def plain(*records: Record, **kw: bytes) -> Callable[[str, StorePath], bytes]:
    return lambda sd, _valid: compress(build_stream(sd, list(records), **kw))


def with_record(make: Callable[[str, StorePath], list[Record]]
                ) -> Callable[[str, StorePath], bytes]:
    return lambda sd, valid: compress(build_stream(sd, make(sd, valid)))


def wrong_mcid(sd: str, _v: StorePath) -> bytes:
    rec = Record([ROOT, Entry("f", b"a", b"real\n")], name="liar")
    other = Record([ROOT, Entry("f", b"a", b"claimed\n")]).honest_mcid()
    rec.mcid = other
    return compress(build_stream(sd, [rec]))


def store_path_lies(sd: str, _v: StorePath) -> bytes:
    rec = Record([ROOT, Entry("f", b"a", b"x\n")], name="liar")

    def swap(block: bytes) -> bytes:
        fake = make_store_path(PathKind.SOURCE, "ab" * 32, sd, "liar")
        return re.sub(rb"StorePath: \S+", f"StorePath: {sd}/{fake}".encode(), block)

    rec.meta_override = swap
    return compress(build_stream(sd, [rec]))


def hash_not_mcid(sd: str, _v: StorePath) -> bytes:
    rec = Record([ROOT, Entry("f", b"a", b"x\n")], name="liar", hash_hex="cd" * 32)
    return compress(build_stream(sd, [rec]))


def foreign_store_dir(_sd: str, _v: StorePath) -> bytes:
    return compress(build_stream("/elsewhere/store", [good()]))


def unknown_reference(sd: str, _v: StorePath) -> bytes:
    ghost = make_store_path(PathKind.SOURCE, "ef" * 32, sd, "ghost")
    return compress(build_stream(sd, [good("first"), Record(
        [ROOT, Entry("f", b"a", b"x\n")], name="app", references=(ghost,))]))


def later_reference(sd: str, _v: StorePath) -> bytes:
    dep = good("dep")
    dep.meta_block(sd)
    assert dep.path is not None
    app = Record([ROOT, Entry("f", b"a", b"x\n")], name="app", references=(dep.path,))
    return compress(build_stream(sd, [app, dep]))


def twice(sd: str, _v: StorePath) -> bytes:
    return compress(build_stream(sd, [good(), good()]))


def not_canonical(sd: str, _v: StorePath) -> bytes:
    rec = good()
    rec.meta_override = lambda b: b.replace(b"References:\n", b"References: \n")
    return compress(build_stream(sd, [rec]))


def unknown_key(sd: str, _v: StorePath) -> bytes:
    rec = good()
    rec.meta_override = lambda b: b + b"Evil: yes\n"
    return compress(build_stream(sd, [rec]))


def truncated_zstd(sd: str, _v: StorePath) -> bytes:
    body = os.urandom(300_000)
    data = compress(build_stream(sd, [good(), Record([ROOT, Entry("f", b"big", body)])]))
    return data[: len(data) // 2]


def huge_window(sd: str, _v: StorePath) -> bytes:
    params = zstandard.ZstdCompressionParameters(window_log=27, compression_level=1)
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
            out, closefd=False) as w:
        w.write(build_stream(sd, [good()]))
    return out.getvalue()


def bomb(sd: str, _v: StorePath) -> bytes:
    """A 64 MiB file of zeros: a few KiB compressed."""
    zeros = bytes(64 * MIB)
    data = compress(build_stream(sd, [Record([ROOT, Entry("f", b"zeros", zeros)])]))
    assert len(data) < 100_000
    return data


def bomb_in_framing(sd: str, _v: StorePath) -> bytes:
    """Megabytes of padding where a short header line is expected."""
    return compress(STREAM_HEADER + b"path " + b"0" * (8 * MIB))


def garbage(_sd: str, _v: StorePath) -> bytes:
    return b"this is not a zstd frame at all\n" * 10


def already_valid_then_bad(sd: str, valid: StorePath) -> bytes:
    """A record of a path the store has, whose contents lie: still refused."""
    return compress(build_stream(sd, [good("first"), Record(
        [ROOT, Entry("f", b"a", b"x\n", digest="0" * 64)], name="second")]))


DEEP = b"/".join([b"d"] * 100_000)
CASES: dict[str, Case] = {
    "unsorted": Case(plain(Record([ROOT, Entry("f", b"b", b"1"), Entry("f", b"a", b"2")])),
                     r"unsorted entry 'a' \(after 'b'\)"),
    "duplicate": Case(plain(Record([ROOT, Entry("f", b"a", b"1"), Entry("f", b"a", b"1")])),
                      r"duplicate entry 'a'"),
    "empty name": Case(plain(Record([ROOT, Entry("d", b"d"), Entry("f", b"d/", b"1")])),
                       r"'d/' has an empty, '\.' or '\.\.' component"),
    "second root": Case(plain(Record([ROOT, Entry("f", b"", b"1")])),
                        r"duplicate entry '\.'"),
    "dot": Case(plain(Record([ROOT, Entry("f", b".", b"1")])),
                r"'\.' has an empty, '\.' or '\.\.' component"),
    "dotdot": Case(plain(Record([ROOT, Entry("f", b"..", b"1")])),
                   r"'\.\.' has an empty, '\.' or '\.\.' component"),
    "dotdot inside": Case(plain(Record([ROOT, Entry("d", b"a"), Entry("f", b"a/..", b"1")])),
                          r"'a/\.\.' has an empty"),
    "slash without parent": Case(plain(Record([ROOT, Entry("f", b"a/b", b"1")])),
                                 r"entry 'a/b' is not inside a directory entry"),
    "slash under a file": Case(plain(Record([ROOT, Entry("f", b"a", b"1"),
                                             Entry("f", b"a/b", b"2")])),
                               r"entry 'a/b' is not inside a directory entry"),
    "nul": Case(plain(Record([ROOT, Entry("f", b"a\0b", b"1")])),
                r"'a\\x00b' contains a NUL byte"),
    "long name": Case(plain(Record([ROOT, Entry("f", b"n" * 256, b"1")])),
                      r"'n{80}.*name longer than 255 bytes"),
    "100k deep path": Case(plain(Record([ROOT, Entry("d", DEEP)])),
                           r"after '\.' has a path of 199999 bytes, more than 4096"),
    "deep nesting": Case(plain(Record(deep_dirs(2100))),
                         r"after 'd(/d){2047}' has a path of 4097 bytes, more than 4096"),
    "not root first": Case(plain(Record([Entry("f", b"a", b"1")])),
                           r"first entry 'a' is not the root"),
    "file under file root": Case(plain(Record([Entry("f", b"", b"1"), Entry("f", b"a", b"2")])),
                                 r"entry 'a' follows a root that is not a directory"),
    "root symlink": Case(plain(Record([Entry("l", b"", b"x")])),
                         r"root entry is a symlink"),
    "symlink up": Case(plain(Record([ROOT, Entry("l", b"l", b"../escape")])),
                       r"symlink 'l' -> '\.\./escape' points outside the path"),
    "symlink absolute": Case(plain(Record([ROOT, Entry("l", b"l", b"/etc/passwd")])),
                             r"symlink 'l' -> '/etc/passwd' points outside"),
    "symlink deep up": Case(plain(Record([ROOT, Entry("d", b"a"),
                                          Entry("l", b"a/l", b"x/../../../b")])),
                            r"symlink 'a/l' -> 'x/\.\./\.\./\.\./b' points outside"),
    "hardlink": Case(plain(Record([ROOT, Entry("h", b"hl", b"x")])),
                     r"entry 'hl' has unsupported type 'h'"),
    "char device": Case(plain(Record([ROOT, Entry("c", b"tty", b"x")])),
                        r"entry 'tty' has unsupported type 'c'"),
    "block device": Case(plain(Record([ROOT, Entry("b", b"sda", b"x")])),
                         r"entry 'sda' has unsupported type 'b'"),
    "fifo": Case(plain(Record([ROOT, Entry("p", b"pipe", b"x")])),
                 r"entry 'pipe' has unsupported type 'p'"),
    "socket": Case(plain(Record([ROOT, Entry("s", b"sock", b"x")])),
                   r"entry 'sock' has unsupported type 's'"),
    "unknown type": Case(plain(Record([ROOT, Entry("z", b"what", b"x")])),
                         r"entry 'what' has unsupported type 'z'"),
    "size larger than body (end)": Case(
        plain(Record([ROOT, Entry("f", b"f", b"short", size=1000)])),
        r"middle of the contents of 'f' \(1000 bytes declared, only \d+ present\)"),
    "size larger than body (middle)": Case(
        plain(Record([ROOT, Entry("f", b"a", b"short", size=8), Entry("f", b"b", b"next")])),
        r"'a': expected blake3 [0-9a-f]{64}, got [0-9a-f]{64}"),
    "size smaller than body": Case(
        plain(Record([ROOT, Entry("f", b"a", b"abc", stream_body=b"abcdef")])),
        r"'a': contents are longer than the declared 3 bytes"),
    "contents do not match hash": Case(
        plain(Record([ROOT, Entry("f", b"a", b"abc", stream_body=b"abd")])),
        r"'a': expected blake3 [0-9a-f]{64}, got [0-9a-f]{64}"),
    "symlink target does not match hash": Case(
        plain(Record([ROOT, Entry("l", b"l", b"x", digest="1" * 64)])),
        r"'l': expected blake3 1{64}, got"),
    "contents do not match MCID": Case(wrong_mcid,
                                       r"liar: contents have MCID mcid1-\S+, the metadata"
                                       r" records mcid1-"),
    "NarSize lies": Case(plain(Record([ROOT, Entry("f", b"a", b"abc")], nar_size=2)),
                         r"contents are 3 bytes, NarSize says 2"),
    "store path does not match hash": Case(store_path_lies,
                                           r"store path \S+-liar does not match its source"
                                           r" hash"),
    "source hash is not the MCID": Case(hash_not_mcid, r"-liar: hash c?d?(cd)+ is not its MCID"),
    "foreign store dir": Case(foreign_store_dir, r"is for store dir '/elsewhere/store'"),
    "reference unknown": Case(unknown_reference,
                              r"-app: reference \S+-ghost is neither valid in the store nor"
                              r" earlier in the stream"),
    "reference only later": Case(later_reference,
                                 r"-app: reference \S+-dep is neither valid"),
    "path twice": Case(twice, r"-good: the path appears twice"),
    "record without entries": Case(plain(Record([])), r"-bad: the record has no entries"),
    "metadata not canonical": Case(not_canonical, r"metadata of \S+-good is not in canonical"
                                                  r" form"),
    "metadata unknown key": Case(unknown_key, r"unknown or malformed line 'Evil: yes'"),
    "garbage": Case(garbage, r"not a valid zstd stream \(.*Unknown frame descriptor"),
    "wrong magic": Case(lambda sd, v: compress(b"tar-export-1\n" + b"x" * 100),
                        r"not a bstore export stream \(header b'tar-export-1\\n'"),
    "future version": Case(plain(good(), header=b"bstore-export-2\n"),
                           r"not a bstore export stream \(header b'bstore-export-2\\n'"),
    "empty input": Case(lambda sd, v: b"", r"stream ends in the middle of the stream header"),
    "truncated zstd": Case(truncated_zstd, r"stream ends in the middle of the contents of"
                                           r" 'big'"),
    "missing trailer": Case(plain(good(), trailer=b""), r"ends in the middle of a path record"),
    "wrong trailer count": Case(plain(good(), trailer=b"done 7\n"),
                                r"bad trailer b'done 7\\n' after 1 paths"),
    "data after trailer": Case(plain(good(), trailer=b"done 1\nmore"),
                               r"data after the end of the stream"),
    "zstd window too large": Case(huge_window, r"not a valid zstd stream \(.*too much memory"),
    "zstd bomb": Case(bomb, r"expands beyond the limit of 1048576 bytes", max_bytes=MIB),
    "bomb in framing": Case(bomb_in_framing, r"a path record at byte 16 is malformed: b'path 000"),
    "second record lies": Case(already_valid_then_bad, r"-second: 'a': expected blake3 0{64}"),
}


@pytest.fixture
def bad_store(tmp_path: Path) -> Iterator[tuple[LocalStore, StorePath]]:
    """A store holding one valid path (so 'nothing changed' is a real check)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "keep.txt").write_text("keep me\n")
    with LocalStore.open(tmp_path / "root") as st:
        yield st, st.add_path(tree, "kept")


def listing(root: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(root / sub)) for sub in ("store", "tmp")}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_stream_is_refused_and_leaves_nothing(
        case: str, bad_store: tuple[LocalStore, StorePath]) -> None:
    st, kept = bad_store
    spec = CASES[case]
    data = spec.build(str(st.store_dir), kept)
    before = listing(st.root)
    valid_before = st.valid_paths()
    kwargs = {} if spec.max_bytes is None else {"max_bytes": spec.max_bytes}
    with pytest.raises(BstoreError) as info:
        import_stream(st, io.BytesIO(data), source="evil.bst", **kwargs)
    assert re.search(spec.message, info.value.message), info.value.message
    assert st.valid_paths() == valid_before
    assert listing(st.root) == before
    assert before["tmp"] == []


def test_bomb_is_stopped_before_its_body_is_decompressed(tmp_path: Path) -> None:
    """The declared size is checked against the limit before any of the body is read."""
    data = build_stream("/s/store", [Record([ROOT, Entry("f", b"zeros", bytes(64 * MIB))])])
    inp = LimitedInput(io.BytesIO(data), "bomb", MIB)
    reader = StreamReader(inp)
    meta = reader.next_path()
    assert meta is not None
    with pytest.raises(ArchiveError, match="expands beyond the limit of 1048576 bytes"):
        reader.read_tree(meta, NullSink())
    assert inp.position < 1024  # header lines only, not a byte of the 64 MiB body


def test_good_stream_built_by_the_test_helpers_imports(
        bad_store: tuple[LocalStore, StorePath]) -> None:
    """The hostile cases differ from an accepted stream only in what they break."""
    st, _kept = bad_store
    dep = good("dep")
    records = [dep]
    dep.meta_block(str(st.store_dir))
    assert dep.path is not None
    records.append(Record([ROOT, Entry("d", b"a"), Entry("f", b"a.txt", b""),
                           Entry("f", b"a/b", b"b\n"), Entry("x", b"run", b"#!/bin/sh\n"),
                           Entry("l", b"z", b"a/b")], name="app", references=(dep.path,)))
    data = compress(build_stream(str(st.store_dir), records))
    result = import_stream(st, io.BytesIO(data))
    assert [r.path.name for r in result] == ["dep", "app"]
    assert all(r.added for r in result)
    app = st.real_path(result[1].path)
    assert os.readlink(app / "z") == "a/b"
    assert os.access(app / "run", os.X_OK)
    assert st.query_info(result[1].path).references == (dep.path,)
    assert st.query_info(result[1].path).mcid == Mcid(records[1].honest_mcid())
    assert os.listdir(st.root / "tmp") == []


def test_path_meta_rejects_what_the_stream_helpers_can_forge() -> None:
    """Sanity check of the forging helpers against the real codec."""
    rec = good()
    block = rec.meta_block("/s/store")
    assert PathMeta.from_bytes(block).mcid == rec.honest_mcid()
