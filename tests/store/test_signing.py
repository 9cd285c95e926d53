"""Signing keys, the documented fingerprint, signatures and trusted key sets."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from storehelpers import invoke

from bstore.store.paths import StorePath
from bstore.store.signing import (
    PublicKey,
    SecretKey,
    SignatureError,
    SigningKeyError,
    TrustedKeys,
    fingerprint,
    generate_key,
    load_secret_key,
    write_key_pair,
)

A = StorePath.parse("0" * 32 + "-app")
LIB = StorePath.parse("1" * 32 + "-lib")
ZLIB = StorePath.parse("2" * 32 + "-zlib")
MCID = "mcid1-manifest-blake3-" + "ab" * 32


def test_fingerprint_is_the_documented_line() -> None:
    got = fingerprint("/s/store", A, MCID, 42, [ZLIB, LIB])
    assert got == (f"1;/s/store/{A};{MCID};42;/s/store/{LIB},/s/store/{ZLIB}").encode()
    assert fingerprint("/s/store", A, MCID, 0, []) == f"1;/s/store/{A};{MCID};0;".encode()


def test_sign_and_verify_with_cryptography_directly() -> None:
    key = generate_key("cache-1")
    data = fingerprint("/s/store", A, MCID, 1, [])
    sig = key.sign(data)
    name, _, b64 = sig.partition(":")
    assert name == "cache-1"
    # An independent check with the library: the signature is plain ed25519.
    Ed25519PublicKey.from_public_bytes(key.public_key.raw).verify(base64.b64decode(b64), data)
    assert key.public_key.verify(data, sig)
    assert not key.public_key.verify(data + b"x", sig)
    assert not generate_key("cache-1").public_key.verify(data, sig)


def test_key_texts_round_trip() -> None:
    key = generate_key("k.1")
    assert SecretKey.from_text(key.to_text()) == key
    assert PublicKey.from_text(key.public_key.to_text()) == key.public_key
    assert "seed" not in repr(key) or key.seed.hex() not in repr(key)


def test_key_files_mode_and_no_overwrite(tmp_path: Path) -> None:
    key = generate_key("host-a")
    secret, public = write_key_pair(key, tmp_path / "keys")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert public.read_text().strip() == key.public_key.to_text()
    assert load_secret_key(secret) == key
    with pytest.raises(SigningKeyError, match="already exists"):
        write_key_pair(key, tmp_path / "keys")
    secret.chmod(0o644)
    with pytest.raises(SigningKeyError, match="accessible by group or others"):
        load_secret_key(secret)


@pytest.mark.parametrize("text, message", [
    ("nocolon", "is not '<name>:<base64>'"),
    ("bad name:AAAA", "is not '<name>:<base64>'"),
    ("k:not-base64!", "is not base64 of 64 bytes"),
    ("k:" + base64.b64encode(b"x" * 63).decode(), "is not base64 of 64 bytes"),
    ("k:" + base64.b64encode(b"\x01" * 64).decode(), "public half does not match"),
])
def test_bad_secret_keys(text: str, message: str) -> None:
    with pytest.raises(SigningKeyError, match=message):
        SecretKey.from_text(text)


@pytest.mark.parametrize("text, message", [
    ("k:" + base64.b64encode(b"x" * 31).decode(), "is not base64 of 32 bytes"),
    (":AAAA", "is not '<name>:<base64>'"),
])
def test_bad_public_keys(text: str, message: str) -> None:
    with pytest.raises(SigningKeyError, match=message):
        PublicKey.from_text(text)


def _sigs(*keys: SecretKey) -> list[str]:
    data = fingerprint("/s/store", A, MCID, 1, [LIB])
    return [k.sign(data) for k in keys]


K1, K2, K3 = generate_key("k1"), generate_key("k2"), generate_key("k3")
EVIL = generate_key("evil")
DATA = fingerprint("/s/store", A, MCID, 1, [LIB])


@pytest.mark.parametrize("trusted, threshold, sigs, ok, message", [
    ([K1], 1, _sigs(K1), ["k1"], None),
    ([K1, K2], 1, _sigs(K2), ["k2"], None),
    ([K1, K2, K3], 2, _sigs(K1, K3), ["k1", "k3"], None),
    ([K1, K2, K3], 2, _sigs(K1), None, "only 1 of 2 required trusted signatures"),
    ([K1, K2], 2, _sigs(K1, K1), None, "only 1 of 2"),
    ([K1], 1, [], None, "it has no signature"),
    ([K1], 1, _sigs(EVIL), None, "signed by untrusted key evil"),
    ([K1], 1, ["k1:" + base64.b64encode(b"\0" * 64).decode()], None,
     "signature by k1 does not verify"),
    ([K1], 1, ["k1:%%%"], None, "signature by k1 does not verify"),
    ([], 1, _sigs(K1), None, "no trusted public keys are configured"),
])
def test_trusted_key_sets(trusted: list[SecretKey], threshold: int, sigs: list[str],
                          ok: list[str] | None, message: str | None) -> None:
    keys = TrustedKeys.parse([k.public_key.to_text() for k in trusted], threshold)
    if ok is not None:
        assert keys.check(DATA, sigs, "path X") == ok
    else:
        assert message is not None
        with pytest.raises(SignatureError, match="path X is not signed by a trusted key") as e:
            keys.check(DATA, sigs, "path X")
        assert message in e.value.message


def test_threshold_out_of_range() -> None:
    with pytest.raises(SigningKeyError, match="threshold 3 is not between 1 and the 2"):
        TrustedKeys.parse([K1.public_key.to_text(), K2.public_key.to_text()], 3)


def test_cli_key_generate_and_store_sign(tmp_path: Path) -> None:
    root = tmp_path / "root"
    res = invoke(root, "--json", "key", "generate", "ci-key", "--dir", str(tmp_path / "k"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "k" / "ci-key.secret").stat().st_mode & 0o077 == 0
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("x")
    added = invoke(root, "store", "add", str(tree))
    path = added.output.strip().splitlines()[-1]
    res = invoke(root, "store", "sign", path, "--key", str(tmp_path / "k" / "ci-key.secret"))
    assert res.exit_code == 0, res.output
    info = invoke(root, "--json", "store", "info", path)
    assert "ci-key:" in info.output
    from bstore.store.local import LocalStore
    with LocalStore.open(root) as st:
        sp = st.parse_path(path)
        pi = st.query_info(sp)
        pub = PublicKey.from_text((tmp_path / "k" / "ci-key.public").read_text())
        keys = TrustedKeys((pub,))
        assert keys.check(fingerprint(str(st.store_dir), sp, pi.mcid, pi.nar_size,
                                      pi.references), pi.signatures, "p") == ["ci-key"]
