"""The metadata of one store path as it travels between stores: a pure value and codec.

An export stream carries one such block per path, and the binary cache (issue 7) will
publish the same block next to its blobs, so the codec lives here on its own. The
canonical text form is (docs/formats.md, "Path metadata")::

    StorePath: <store_dir>/<digest>-<name>
    Kind: <source|output|generation>
    Hash: blake3:<64 hex>              what the digest is computed over
    MCID: mcid1-manifest-blake3-<64 hex>
    NarSize: <decimal bytes of contents and link targets>
    References: <base name> ...        sorted, space separated, may be empty
    Deriver: <base name>               only when there is one
    Sig: <signature>                   zero or more, sorted

Every line ends in ``\\n``; keys appear exactly once and in this order. Decoding is
strict: the block must re-encode to the same bytes, so one path has one encoding and
streams built from it are deterministic. Registration time is local to a store and is
deliberately not part of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bstore.errors import BstoreError
from bstore.store.layout import StoreError
from bstore.store.manifest import Mcid, validate_mcid
from bstore.store.paths import PathKind, StorePath, make_store_path

#: A derivation hash, a store path base name, or a full store path: no spaces or newlines.
_DERIVER_RE = re.compile(r"[A-Za-z0-9+._:=/?-]{1,400}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
#: Signatures are opaque here (``<key name>:<base64>`` once signing exists); they only
#: must fit on one line of the block.
_SIG_RE = re.compile(r"[\x21-\x7e]{1,1024}")
#: A block bigger than this is hostile: even thousands of references fit easily.
MAX_META_BYTES = 1 << 20
_KEYS = ("StorePath", "Kind", "Hash", "MCID", "NarSize", "References", "Deriver", "Sig")


class PathMetaError(StoreError):
    """Path metadata that is malformed or contradicts itself."""


@dataclass(frozen=True, slots=True)
class PathMeta:
    """Everything a store needs to register one path besides its contents.

    ``hash_hex`` is the blake3 the store path digest was computed over (the MCID's hex
    for ``source`` paths, the derivation hash for ``output`` paths), so the receiver can
    recompute the store path instead of trusting it.
    """

    store_dir: str
    path: StorePath
    kind: PathKind
    hash_hex: str
    mcid: Mcid
    nar_size: int
    references: tuple[StorePath, ...] = ()
    #: Opaque: what produced the path (the realiser records its derivation hash).
    deriver: str | None = None
    signatures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        shown = self.full_path
        if not self.store_dir.startswith("/") or "\n" in self.store_dir or \
                self.store_dir.endswith("/"):
            raise PathMetaError(f"{shown}: store dir {self.store_dir!r} is not an absolute path")
        validate_mcid(self.mcid)
        if not _HEX64_RE.fullmatch(self.hash_hex):
            raise PathMetaError(f"{shown}: hash {self.hash_hex!r} is not 64 lowercase hex digits")
        if self.nar_size < 0:
            raise PathMetaError(f"{shown}: negative NarSize {self.nar_size}")
        if self.deriver is not None and not _DERIVER_RE.fullmatch(self.deriver):
            raise PathMetaError(f"{shown}: deriver {self.deriver[:80]!r} is not a derivation id")
        expected = make_store_path(self.kind, self.hash_hex, self.store_dir, self.path.name)
        if expected != self.path:
            raise PathMetaError(
                f"store path {shown} does not match its {self.kind.value} hash"
                f" {self.hash_hex} (expected {self.store_dir}/{expected})",
                hint="the metadata was altered or produced by a broken store",
            )
        if self.kind is PathKind.SOURCE and self.mcid.rpartition("-")[2] != self.hash_hex:
            raise PathMetaError(
                f"source path {shown}: hash {self.hash_hex} is not its MCID {self.mcid}",
                hint="a source path is named by its content; the metadata was altered",
            )
        if list(self.references) != sorted(set(self.references), key=str):
            raise PathMetaError(f"{shown}: references are not sorted and unique")
        for sig in self.signatures:
            if not _SIG_RE.fullmatch(sig):
                raise PathMetaError(f"{shown}: malformed signature {sig[:60]!r}")
        if list(self.signatures) != sorted(set(self.signatures)):
            raise PathMetaError(f"{shown}: signatures are not sorted and unique")

    @property
    def full_path(self) -> str:
        """``<store_dir>/<digest>-<name>``."""
        return f"{self.store_dir}/{self.path}"

    def to_bytes(self) -> bytes:
        """The canonical text block (see the module docstring)."""
        lines = [
            f"StorePath: {self.full_path}",
            f"Kind: {self.kind.value}",
            f"Hash: blake3:{self.hash_hex}",
            f"MCID: {self.mcid}",
            f"NarSize: {self.nar_size}",
            "References:" + "".join(f" {r}" for r in self.references),
        ]
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver}")
        lines.extend(f"Sig: {s}" for s in self.signatures)
        return "".join(line + "\n" for line in lines).encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "path metadata") -> PathMeta:
        """Parse a canonical block strictly; errors name ``source`` and the line."""
        if len(data) > MAX_META_BYTES:
            raise PathMetaError(f"{source}: metadata block of {len(data)} bytes is too large")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PathMetaError(f"{source}: metadata is not UTF-8 ({exc})") from exc
        if not text.endswith("\n"):
            raise PathMetaError(f"{source}: metadata does not end in a newline")
        fields: dict[str, list[str]] = {}
        for number, line in enumerate(text[:-1].split("\n"), start=1):
            key, sep, value = line.partition(": ")
            if not sep and line == "References:":
                key, value = "References", ""
            elif not sep or key not in _KEYS:
                raise PathMetaError(f"{source}:{number}: unknown or malformed line {line[:80]!r}")
            if key != "Sig" and key in fields:
                raise PathMetaError(f"{source}:{number}: duplicate key {key!r}")
            fields.setdefault(key, []).append(value)
        meta = cls._from_fields(fields, source)
        if meta.to_bytes() != data:
            raise PathMetaError(
                f"{source}: metadata of {meta.full_path} is not in canonical form",
                hint="keys must appear once, in the documented order, with single spaces",
            )
        return meta

    @classmethod
    def _from_fields(cls, fields: dict[str, list[str]], source: str) -> PathMeta:
        missing = [k for k in _KEYS[:6] if k not in fields]
        if missing:
            raise PathMetaError(f"{source}: metadata lacks {', '.join(missing)}")

        def one(key: str) -> str:
            return fields[key][0]

        store_dir, _, base = one("StorePath").rpartition("/")
        hash_text = one("Hash")
        if not hash_text.startswith("blake3:"):
            raise PathMetaError(f"{source}: Hash {hash_text!r} is not a blake3 hash")
        if not one("NarSize").isdigit() or len(one("NarSize")) > 20:
            raise PathMetaError(f"{source}: NarSize {one('NarSize')!r} is not a number")
        try:
            kind = PathKind(one("Kind"))
        except ValueError:
            raise PathMetaError(
                f"{source}: unknown path kind {one('Kind')!r}",
                hint="kinds are " + ", ".join(k.value for k in PathKind),
            ) from None
        refs = one("References")
        deriver = fields.get("Deriver", [""])[0]
        try:
            return cls(
                store_dir=store_dir,
                path=StorePath.parse(base),
                kind=kind,
                hash_hex=hash_text.removeprefix("blake3:"),
                mcid=Mcid(one("MCID")),
                nar_size=int(one("NarSize")),
                references=tuple(StorePath.parse(r) for r in refs.split(" ")) if refs else (),
                deriver=deriver or None,
                signatures=tuple(fields.get("Sig", ())),
            )
        except PathMetaError:
            raise
        except BstoreError as exc:
            raise PathMetaError(f"{source}: {exc.message}", hint=exc.hint) from exc
