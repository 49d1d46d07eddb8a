"""Ed25519 key files: owner-only, optional passphrase, clear errors, one-line public keys."""

from __future__ import annotations

import os
import stat

import pytest

from pixcell_fed.errors import ExitCode, KeyFileError
from pixcell_fed.keys import (
    fingerprint,
    generate_private_key,
    load_private_key,
    load_public_key,
    parse_public_key,
    public_key_raw,
    public_key_text,
    write_key_pair,
    write_private_key,
)


def test_key_pair_written_owner_only_and_round_trips(tmp_path):
    private, public, pub = write_key_pair(tmp_path / "keys" / "site.key")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    assert public_key_raw(key.public_key()) == public_key_raw(pub)
    assert public_key_raw(load_public_key(public)) == public_key_raw(pub)
    assert public.read_text().startswith("ed25519:")
    assert not list(private.parent.glob(".*tmp"))  # atomic write left no temporary file


def test_unsafe_permissions_refused(tmp_path):
    private, _, _ = write_key_pair(tmp_path / "site.key")
    os.chmod(private, 0o644)
    with pytest.raises(KeyFileError, match="accessible by other users") as info:
        load_private_key(private)
    assert "chmod 600" in info.value.hint
    assert info.value.exit_code == ExitCode.USAGE


def test_passphrase_protected_key(tmp_path):
    key = generate_private_key()
    path = write_private_key(tmp_path / "officer.key", key, passphrase="correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_private_key(path, passphrase="correct horse")
    assert public_key_raw(loaded.public_key()) == public_key_raw(key.public_key())
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(path, passphrase="wrong horse")
    with pytest.raises(KeyFileError, match="passphrase-protected and no passphrase"):
        load_private_key(path)


def test_missing_file_and_no_overwrite(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        load_private_key(tmp_path / "nope.key")
    private, _, _ = write_key_pair(tmp_path / "site.key")
    before = private.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(private, generate_private_key())
    assert private.read_bytes() == before


def test_public_key_forms_and_fingerprint(tmp_path):
    from cryptography.hazmat.primitives import serialization

    pub = generate_private_key().public_key()
    text = public_key_text(pub)
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    for form in (text, text[len("ed25519:"):], pem):
        assert public_key_raw(parse_public_key(form)) == public_key_raw(pub)
    assert fingerprint(pub).startswith("SHA256:") and fingerprint(pub) != fingerprint(generate_private_key().public_key())
    with pytest.raises(KeyFileError, match="32 bytes"):
        parse_public_key("ed25519:AAAA")
    with pytest.raises(KeyFileError, match="base64"):
        parse_public_key("ed25519:not base64!")
