"""A real, signed Hex v2 repository built by the tests and served on 127.0.0.1.

:class:`HexRepoBuilder` makes genuine package tarballs (``VERSION`` 3, ``CHECKSUM``,
``metadata.config``, ``contents.tar.gz`` holding ``src/<app>.erl``,
``src/<app>.app.src`` and ``rebar.config``: each package is a valid OTP application
that rebar3 compiles) and signed registry entries (``/packages/<name>``, ``/names``,
``/versions``) with its own RSA key. :meth:`HexRepoBuilder.write` lays the repository
out on disk; :meth:`HexRepoBuilder.serve` publishes it through a
:class:`localhttp.LocalServer`, where tests can then replace any route with a
hostile variant. The default chain (:func:`default_chain`) is::

    hexa_top 0.1.0  -> hexa_mid ~> 1.0, hexa_leaf >= 1.0.0
    hexa_mid 1.0.0  -> hexa_leaf ~> 1.0      hexa_mid 1.1.0 -> hexa_leaf ~> 1.1
    hexa_leaf 1.0.0, 1.1.0, 1.2.0-rc.1, 2.0.0

Each generated module exports ``chain/0`` returning its own app name followed by its
dependencies' chains, so a test can check that the right code was linked.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from localhttp import LocalServer, Route

from bstore.builders.hex.protobuf import (
    Dependency,
    Names,
    Package,
    Release,
    Retirement,
    Versions,
    VersionsEntry,
)
from bstore.builders.hex.registry import encode_signed
from bstore.builders.hex.repos import HexRepo
from bstore.builders.hex.versions import Version
from bstore.specs.terms import Atom, Term, format


def new_key() -> RSAPrivateKey:
    """A fresh RSA key for a test repository (2048 bits, as hex.pm uses)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: RSAPrivateKey) -> str:
    """The PEM (SubjectPublicKeyInfo) text of ``key``'s public half."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def tar_bytes(files: dict[str, bytes], *, gz: bool) -> bytes:
    """A deterministic tar (optionally gzipped) of ``files`` (sorted, mtime 0, mode 0644)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    data = buf.getvalue()
    return gzip.compress(data, mtime=0) if gz else data


def outer_tarball(
    version: bytes, metadata: bytes, contents: bytes, *, checksum: bytes | None = None
) -> bytes:
    """An outer hex tarball from its parts; ``checksum`` overrides the correct CHECKSUM."""
    inner = hashlib.sha256(version + metadata + contents).hexdigest().upper().encode()
    return tar_bytes(
        {
            "VERSION": version,
            "CHECKSUM": inner if checksum is None else checksum,
            "metadata.config": metadata,
            "contents.tar.gz": contents,
        },
        gz=False,
    )


@dataclass
class PackageRelease:
    """One release in the test repository, with everything needed to publish it."""

    name: str
    version: str
    deps: tuple[Dependency, ...] = ()
    retired: Retirement | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    # When set, published instead of the generated tarball (registry checksums follow).
    tarball_override: bytes | None = None

    def contents(self) -> dict[str, bytes]:
        """The package files: a compilable OTP app unless ``files`` replaces them."""
        return self.files or app_files(self.name, self.version, self.deps)

    def metadata_config(self) -> bytes:
        """The ``metadata.config`` text of this release."""
        requirements: list[Term] = [
            (
                dep.package.encode(),
                [
                    (b"app", (dep.app or dep.package).encode()),
                    (b"optional", Atom("true" if dep.optional else "false")),
                    (b"requirement", dep.requirement.encode()),
                    (b"repository", (dep.repository or "hexpm").encode()),
                ],
            )
            for dep in self.deps
        ]
        entries: list[Term] = [
            (b"name", self.name.encode()),
            (b"version", self.version.encode()),
            (b"app", self.name.encode()),
            (b"description", f"Test package {self.name}".encode()),
            (b"files", [name.encode() for name in sorted(self.contents())]),
            (b"licenses", [b"Apache-2.0"]),
            (b"requirements", requirements),
            (b"build_tools", [b"rebar3"]),
        ]
        return "".join(format(entry) + ".\n" for entry in entries).encode("utf-8")

    def tarball(self) -> bytes:
        """The outer tarball bytes as published."""
        if self.tarball_override is not None:
            return self.tarball_override
        contents = tar_bytes(self.contents(), gz=True)
        return outer_tarball(b"3", self.metadata_config(), contents)

    def release_message(self) -> Release:
        """The registry ``Release`` describing this tarball."""
        data = self.tarball()
        inner = b""
        if self.tarball_override is None:
            contents = tar_bytes(self.contents(), gz=True)
            inner = hashlib.sha256(b"3" + self.metadata_config() + contents).digest()
        return Release(
            version=self.version,
            inner_checksum=inner,
            dependencies=self.deps,
            retired=self.retired,
            outer_checksum=hashlib.sha256(data).digest(),
        )


def app_files(name: str, version: str, deps: tuple[Dependency, ...]) -> dict[str, bytes]:
    """A minimal valid OTP library application depending on ``deps``."""
    dep_apps = [d.app or d.package for d in deps if not d.optional]
    chain = " ++ ".join([f"[{name}]", *(f"{app}:chain()" for app in dep_apps)])
    module = (
        f"-module({name}).\n"
        f"-export([chain/0, version/0]).\n\n"
        f"%% This app and the chain of its dependencies, in order.\n"
        f"chain() -> {chain}.\n\n"
        f'version() -> "{version}".\n'
    )
    apps = ", ".join(["kernel", "stdlib", *dep_apps])
    app_src = (
        f"{{application, {name}, [\n"
        f'    {{description, "Test package {name}"}},\n'
        f'    {{vsn, "{version}"}},\n'
        f"    {{registered, []}},\n"
        f"    {{applications, [{apps}]}},\n"
        f"    {{env, []}},\n"
        f"    {{modules, []}},\n"
        f'    {{licenses, ["Apache-2.0"]}}\n'
        f"]}}.\n"
    )
    rebar_deps = ", ".join(f'{{{d.package}, "{d.requirement}"}}' for d in deps)
    rebar_config = f"{{erl_opts, [debug_info]}}.\n{{deps, [{rebar_deps}]}}.\n"
    return {
        f"src/{name}.erl": module.encode(),
        f"src/{name}.app.src": app_src.encode(),
        "rebar.config": rebar_config.encode(),
    }


class HexRepoBuilder:
    """Packages, their signed registry entries, and where they are published."""

    def __init__(self, key: RSAPrivateKey, *, name: str = "testrepo") -> None:
        self.key = key
        self.name = name
        self.releases: dict[str, list[PackageRelease]] = {}

    @property
    def public_key_pem(self) -> str:
        """PEM of the repository's public key."""
        return public_pem(self.key)

    def add(
        self,
        name: str,
        version: str,
        deps: tuple[tuple[str, str] | Dependency, ...] = (),
        **kwargs: object,
    ) -> PackageRelease:
        """Add a release; ``deps`` are ``(package, requirement)`` pairs or Dependencies."""
        dependencies = tuple(
            d if isinstance(d, Dependency) else Dependency(d[0], d[1]) for d in deps
        )
        release = PackageRelease(name, version, dependencies, **kwargs)  # type: ignore[arg-type]
        self.releases.setdefault(name, []).append(release)
        return release

    def release(self, name: str, version: str) -> PackageRelease:
        """The release ``name`` ``version`` added earlier."""
        return next(r for r in self.releases[name] if r.version == version)

    def package_message(self, name: str, *, repository: str | None = None) -> Package:
        """The ``Package`` registry message of ``name``."""
        ordered = sorted(self.releases[name], key=lambda r: Version.parse(r.version))
        return Package(
            name=name,
            repository=repository or self.name,
            releases=tuple(r.release_message() for r in ordered),
        )

    def signed(self, payload: bytes, key: RSAPrivateKey | None = None) -> bytes:
        """gzip(Signed) of ``payload`` with this repository's key (or ``key``)."""
        return encode_signed(payload, key or self.key)

    def files(self) -> dict[str, bytes]:
        """Every file of the repository by its path (``packages/x``, ``tarballs/x-1.0.0.tar``)."""
        out: dict[str, bytes] = {}
        for name, releases in sorted(self.releases.items()):
            out[f"packages/{name}"] = self.signed(self.package_message(name).encode())
            for release in releases:
                out[f"tarballs/{name}-{release.version}.tar"] = release.tarball()
        names = Names(self.name, tuple(sorted(self.releases)))
        versions = Versions(
            self.name,
            tuple(
                VersionsEntry(n, tuple(r.version for r in rs))
                for n, rs in sorted(self.releases.items())
            ),
        )
        out["names"] = self.signed(names.encode())
        out["versions"] = self.signed(versions.encode())
        return out

    def write(self, root: Path) -> Path:
        """Lay the repository out under ``root`` (what a static file server would serve)."""
        for rel, data in self.files().items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return root

    def serve(self, server: LocalServer) -> HexRepo:
        """Publish every file as a route of ``server``; returns the client-side config."""
        for rel, data in self.files().items():
            # rebar3 insists on an ETag (it caches tarballs by it), as S3 behind hex.pm sends.
            etag = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
            server.routes["/" + rel] = Route(data, headers={"ETag": etag})
        return HexRepo(self.name, server.base_url, self.public_key_pem)


def default_chain(builder: HexRepoBuilder) -> HexRepoBuilder:
    """Add the dependency chain described in the module doc."""
    builder.add("hexa_leaf", "1.0.0")
    builder.add("hexa_leaf", "1.1.0")
    builder.add("hexa_leaf", "1.2.0-rc.1")
    builder.add("hexa_leaf", "2.0.0")
    builder.add("hexa_mid", "1.0.0", (("hexa_leaf", "~> 1.0"),))
    builder.add("hexa_mid", "1.1.0", (("hexa_leaf", "~> 1.1"),))
    builder.add("hexa_top", "0.1.0", (("hexa_mid", "~> 1.0"), ("hexa_leaf", ">= 1.0.0")))
    return builder


@dataclass
class ServedHexRepo:
    """A test repository on disk and on a local server, with its client config."""

    builder: HexRepoBuilder
    server: LocalServer
    repo: HexRepo
    root: Path

    def republish(self) -> None:
        """Re-render every route (after changing the builder's releases)."""
        self.builder.write(self.root)
        self.repo = self.builder.serve(self.server)

    def rebar3_app(self, app: Path, *, applications: str, deps: str) -> dict[str, str]:
        """Write the rebar3 project ``app`` (an OTP app named after the directory, its
        ``applications`` beyond kernel and stdlib, its ``deps`` in rebar.config syntax)
        that fetches only from this repository; return the environment to run rebar3 in
        (its HOME and package cache next to ``app``)."""
        (app / "src").mkdir(parents=True)
        (app / f"src/{app.name}.app.src").write_text(
            f'{{application, {app.name}, [{{vsn, "0.1.0"}}, {{description, "t"}},'
            f" {{registered, []}},\n {{applications, [kernel, stdlib, {applications}]}},"
            " {env, []}, {modules, []}]}.\n"
        )
        pem = self.repo.public_key_pem.replace("\n", "\\n")
        (app / "rebar.config").write_text(
            f"{{deps, [{deps}]}}.\n"
            '{hex, [{repos, replace, [#{name => <<"testrepo">>, '
            f'repo_url => <<"{self.repo.url}">>, repo_public_key => <<"{pem}">>}}]}}]}}.\n'
        )
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(app.parent / "home"),
            "REBAR_CACHE_DIR": str(app.parent / "cache"),
        }
