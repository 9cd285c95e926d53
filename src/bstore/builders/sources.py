"""Fetching app sources into the store: one registered strategy per source type.

Every source becomes a SOURCE store path (a fixed output: its digest is its content's
MCID) through the same lifecycle, modelled on Spack's fetch strategies::

    identify (what exactly is wanted: a git commit, a hex release, a url + sha256)
      → cache lookup by identity (hit: done, nothing fetched)
      → fetch (bytes into a private work dir) → check (hashes, signatures)
      → unpack (a safe extraction into a staging dir) → register in the store

Strategies are keyed by :class:`~bstore.specs.model.SourceType` in :data:`STRATEGIES`
(``git``, ``hex``, ``release``, ``mesh``); a :class:`Fetcher` holds what they share
(the store, one HTTP client, the git cache, the hex repositories) and is passed in, never
a global. The identity → store path cache is a directory of symlinks
``<root>/fetch-cache/<blake3(identity)>`` → the store path, each written atomically
(temp link + rename). It is only a hint: a dangling link, or one to a path that is no
longer valid, is ignored and the source fetched again.

The store is not thread-safe, so every call into it goes through :attr:`Fetcher.lock`
(fetching and unpacking run outside it, so N fetches still overlap).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import httpx

from bstore.builders.download import DEFAULT_POLICY, DownloadPolicy, download, fetch_bytes, redact
from bstore.builders.fetch_git import GitFetcher
from bstore.builders.hex.repos import Repos
from bstore.builders.hex.tarball import MAX_TARBALL_SIZE, check_outer_checksum, unpack_tarball
from bstore.builders.hex.versions import Version
from bstore.builders.safe_tar import extract_archive
from bstore.errors import BstoreError
from bstore.specs.model import SourceSpec, SourceType
from bstore.store.local import LocalStore
from bstore.store.mesh import fetch_mcid
from bstore.store.paths import InvalidStorePath, PathKind, StorePath

__all__ = [
    "STRATEGIES",
    "FetchStrategy",
    "FetchedSource",
    "Fetcher",
    "MeshUnavailable",
    "SourceError",
    "identity_key",
]

#: A full git object id given as a ref is already an identity: no network needed.
_FULL_COMMIT = frozenset("0123456789abcdef")


class SourceError(BstoreError):
    """A source that cannot be identified, fetched, checked or unpacked."""


class MeshUnavailable(SourceError):
    """A mesh source, while no mesh peers are configured."""


def identity_key(identity: Mapping[str, str]) -> str:
    """The fetch-cache key of a source identity: blake3 of its canonical JSON."""
    data = json.dumps(dict(identity), sort_keys=True, separators=(",", ":")).encode()
    return str(blake3.blake3(data).hexdigest())


@dataclass(frozen=True, slots=True)
class FetchedSource:
    """A source in the store: its identity, its path, and whether it was fetched now."""

    identity: Mapping[str, str]
    path: StorePath
    fetched: bool

    def __post_init__(self) -> None:
        if self.identity.get("type") not in {t.value for t in SourceType}:
            raise SourceError(f"source identity {dict(self.identity)!r} has no valid type")


@dataclass
class Fetcher:
    """What every strategy shares. ``lock`` serialises store access across threads."""

    store: LocalStore
    client: httpx.Client
    hex_repos: Repos = field(default_factory=Repos)
    policy: DownloadPolicy = DEFAULT_POLICY
    log: Callable[[str], None] = lambda _m: None
    lock: threading.RLock = field(default_factory=threading.RLock)
    git: GitFetcher | None = None
    #: Cache servers asked for ``mesh`` sources by content id (``Config.mesh_peers``).
    mesh_peers: tuple[str, ...] = ()
    #: Identities fetched (not served from the cache) by this fetcher, in order.
    fetched: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.git is None:
            self.git = GitFetcher(self.store.root / "git-cache", log=self.log)
        self._url_locks: dict[str, threading.Lock] = {}

    @property
    def cache_dir(self) -> Path:
        """``<root>/fetch-cache``: identity → store path links."""
        return self.store.root / "fetch-cache"

    def url_lock(self, url: str) -> threading.Lock:
        """One lock per git URL: libgit2 must not fetch into one cache repo twice at once."""
        with self.lock:
            return self._url_locks.setdefault(url, threading.Lock())

    @contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """A store staging dir, entered under the store lock (removed on exit)."""
        with self.lock:
            manager = self.store.staging_dir(label)
            path = manager.__enter__()
        try:
            yield path
        finally:
            manager.__exit__(None, None, None)

    # -- the identity cache ----------------------------------------------------------------

    def cached(self, identity: Mapping[str, str]) -> StorePath | None:
        """The valid store path recorded for ``identity``, if any (else ``None``)."""
        link = self.cache_dir / identity_key(identity)
        try:
            target = os.readlink(link)
        except OSError:
            return None
        try:
            with self.lock:
                sp = self.store.parse_path(target)
                if not self.store.is_valid(sp):
                    return None
                # From here on a concurrent GC keeps it: the build will rely on it.
                self.store.add_temp_root(sp)
                return sp
        except InvalidStorePath:
            return None

    def remember(self, identity: Mapping[str, str], sp: StorePath) -> None:
        """Record ``identity`` → ``sp`` (temp symlink + rename: readers never see half)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        link = self.cache_dir / identity_key(identity)
        tmp = link.with_name(f".{link.name}.tmp-{secrets.token_hex(4)}")
        try:
            os.symlink(self.store.full_path(sp), tmp)
            os.replace(tmp, link)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            # Only a hint: losing it costs a refetch, never a wrong build.
            self.log(f"cannot record fetch-cache link {str(link)!r}: {exc.strerror}")

    # -- the lifecycle ---------------------------------------------------------------------

    def fetch(self, source: SourceSpec, *, name: str, version: str,
              extra: Mapping[str, str] | None = None) -> FetchedSource:
        """Identify ``source`` (of app/package ``name`` at ``version``), then return its
        store path: from the cache, or fetched, checked, unpacked and registered.

        ``extra`` adds strategy inputs known from elsewhere (a hex release's checksums
        from the verified registry entry).
        """
        strategy = STRATEGIES.get(source.type)
        if strategy is None:
            raise SourceError(f"no fetch strategy for source type {source.type!r}")
        identity = strategy.identify(self, source, name=name, version=version,
                                     extra=extra or {})
        hit = self.cached(identity)
        if hit is not None:
            return FetchedSource(identity, hit, fetched=False)
        label = f"{name}-{version}"
        direct = strategy.fetch_into_store(self, identity, f"{label}-source")
        if direct is not None:
            self.remember(identity, direct)
            with self.lock:
                self.fetched.append(dict(identity))
            return FetchedSource(identity, direct, fetched=True)
        with self.staging(f"src-{label}") as stage:
            work = stage / "fetch"
            work.mkdir()
            artefact = strategy.fetch(self, identity, work)
            strategy.check(self, identity, artefact)
            tree = stage / "tree"
            strategy.unpack(self, identity, artefact, tree)
            with self.lock:
                sp = self.store.register_tree(tree, f"{label}-source", kind=PathKind.SOURCE)
                self.store.add_temp_root(sp)
        self.remember(identity, sp)
        with self.lock:
            self.fetched.append(dict(identity))
        return FetchedSource(identity, sp, fetched=True)


class FetchStrategy(ABC):
    """One way of getting a source: identify → fetch → check → unpack."""

    source_type: SourceType

    def fetch_into_store(self, fetcher: Fetcher, identity: Mapping[str, str],
                         name: str) -> StorePath | None:
        """Register the source straight in the store (a strategy whose transport
        already verifies and registers, like mesh), or ``None`` to go through
        fetch → check → unpack."""
        return None

    @abstractmethod
    def identify(self, fetcher: Fetcher, source: SourceSpec, *, name: str, version: str,
                 extra: Mapping[str, str]) -> dict[str, str]:
        """The exact identity of what ``source`` names now (may ask the network)."""

    @abstractmethod
    def fetch(self, fetcher: Fetcher, identity: Mapping[str, str], work: Path) -> Path:
        """Bring the bytes into ``work`` (a private dir); return what :meth:`unpack` reads."""

    def check(self, fetcher: Fetcher, identity: Mapping[str, str], artefact: Path) -> None:
        """Verify the fetched artefact against the identity (default: done while fetching)."""
        return None

    @abstractmethod
    def unpack(self, fetcher: Fetcher, identity: Mapping[str, str], artefact: Path,
               dest: Path) -> None:
        """Write the source tree into the new directory ``dest``."""


class GitStrategy(FetchStrategy):
    """git (pygit2): identity = url + commit; export the commit's tree, no ``.git``."""

    source_type = SourceType.GIT

    def identify(self, fetcher: Fetcher, source: SourceSpec, *, name: str, version: str,
                 extra: Mapping[str, str]) -> dict[str, str]:
        assert source.url is not None and fetcher.git is not None
        ref = source.ref
        if ref is not None and len(ref) in (40, 64) and set(ref) <= _FULL_COMMIT:
            # A full commit id names the content already; the cache can answer alone.
            identity = {"type": "git", "url": source.url, "commit": ref}
            if fetcher.cached(identity) is not None:
                return identity
        with fetcher.url_lock(source.url):
            commit = fetcher.git.resolve(source.url, ref)
        return {"type": "git", "url": source.url, "commit": commit}

    def fetch(self, fetcher: Fetcher, identity: Mapping[str, str], work: Path) -> Path:
        # identify() resolved the ref by fetching into the per-URL cache repository, so
        # the commit is there already; export() fails clearly if it is not.
        return work

    def unpack(self, fetcher: Fetcher, identity: Mapping[str, str], artefact: Path,
               dest: Path) -> None:
        assert fetcher.git is not None
        with fetcher.url_lock(identity["url"]):
            fetcher.git.export(identity["url"], identity["commit"], dest)


class HexStrategy(FetchStrategy):
    """A Hex release: identity = repository + package + version + the registry's
    checksums; the tarball's outer sha256 is checked before anything is unpacked."""

    source_type = SourceType.HEX

    def identify(self, fetcher: Fetcher, source: SourceSpec, *, name: str, version: str,
                 extra: Mapping[str, str]) -> dict[str, str]:
        repository = source.repo or "hexpm"
        fetcher.hex_repos[repository]  # an unknown repository fails here, naming it
        outer = extra.get("outer_checksum")
        if not outer:
            raise SourceError(
                f"hex package {name} {version} from {repository!r} has no outer checksum",
                hint="resolve it through the verified registry first",
            )
        return {"type": "hex", "repository": repository, "package": name,
                "version": str(Version.parse(source.ref or version)),
                "outer_checksum": outer, "inner_checksum": extra.get("inner_checksum", "")}

    def fetch(self, fetcher: Fetcher, identity: Mapping[str, str], work: Path) -> Path:
        repo = fetcher.hex_repos[identity["repository"]]
        url = repo.tarball_url(identity["package"], identity["version"])
        policy = dataclasses.replace(
            fetcher.policy, max_size=min(fetcher.policy.max_size, MAX_TARBALL_SIZE))
        artefact = work / "package.tar"
        artefact.write_bytes(fetch_bytes(fetcher.client, url, policy=policy))
        return artefact

    def check(self, fetcher: Fetcher, identity: Mapping[str, str], artefact: Path) -> None:
        """The registry's outer sha256 before anything is read from inside the tarball."""
        repo = fetcher.hex_repos[identity["repository"]]
        check_outer_checksum(artefact.read_bytes(), bytes.fromhex(identity["outer_checksum"]),
                             source=repo.tarball_url(identity["package"], identity["version"]))

    def unpack(self, fetcher: Fetcher, identity: Mapping[str, str], artefact: Path,
               dest: Path) -> None:
        repo = fetcher.hex_repos[identity["repository"]]
        inner = identity.get("inner_checksum") or ""
        unpack_tarball(
            artefact.read_bytes(), dest, name=identity["package"], version=identity["version"],
            outer_checksum=bytes.fromhex(identity["outer_checksum"]),
            inner_checksum=bytes.fromhex(inner) if inner else None,
            source=repo.tarball_url(identity["package"], identity["version"]),
        )


class ReleaseStrategy(FetchStrategy):
    """A release tarball: identity = url + sha256, checked on the stream before unpacking."""

    source_type = SourceType.RELEASE

    def identify(self, fetcher: Fetcher, source: SourceSpec, *, name: str, version: str,
                 extra: Mapping[str, str]) -> dict[str, str]:
        assert source.url is not None and source.sha256 is not None
        return {"type": "release", "url": source.url, "sha256": source.sha256}

    def fetch(self, fetcher: Fetcher, identity: Mapping[str, str], work: Path) -> Path:
        got = download(fetcher.client, identity["url"], work, sha256=identity["sha256"],
                       policy=fetcher.policy)
        return got.path

    def unpack(self, fetcher: Fetcher, identity: Mapping[str, str], artefact: Path,
               dest: Path) -> None:
        extract_archive(artefact, dest, label=redact(identity["url"]))


class MeshStrategy(FetchStrategy):
    """A tree by MCID from mesh peers; until peers exist, a clear error."""

    source_type = SourceType.MESH

    def identify(self, fetcher: Fetcher, source: SourceSpec, *, name: str, version: str,
                 extra: Mapping[str, str]) -> dict[str, str]:
        assert source.mcid is not None
        return {"type": "mesh", "mcid": source.mcid}

    def fetch_into_store(self, fetcher: Fetcher, identity: Mapping[str, str],
                         name: str) -> StorePath | None:
        # The mesh transport checks every blob and the manifest against the MCID and
        # registers the SOURCE path itself: nothing is left to unpack.
        if not fetcher.mesh_peers:
            self.fetch(fetcher, identity, Path())
        with fetcher.lock:
            sp, peer, _stats = fetch_mcid(fetcher.store, identity["mcid"],
                                          fetcher.mesh_peers, name=name)
            fetcher.store.add_temp_root(sp)
        fetcher.log(f"mesh: {identity['mcid']} from {peer}")
        return sp

    def fetch(self, fetcher: Fetcher, identity: Mapping[str, str], work: Path) -> Path:
        raise MeshUnavailable(
            f"cannot fetch mesh source {identity['mcid']}: no mesh peers configured",
            hint="set mesh_peers in bstore.toml (cache servers that answer by content id)",
        )

    def unpack(self, fetcher: Fetcher, identity: Mapping[str, str], artefact: Path,
               dest: Path) -> None:
        raise MeshUnavailable(f"cannot unpack mesh source {identity['mcid']}")


#: The registered strategies, by source type.
STRATEGIES: Mapping[SourceType, FetchStrategy] = {
    s.source_type: s for s in (GitStrategy(), HexStrategy(), ReleaseStrategy(), MeshStrategy())
}
