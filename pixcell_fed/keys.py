"""Ed25519 key pairs of sites and privacy officers: generate, store safely, load, print, fingerprint.

Private keys are PKCS#8 PEM files written atomically with owner-only permissions (0600), optionally encrypted with
a passphrase (``BestAvailableEncryption``). Loading refuses a key file that others can read. Public keys travel as
one line of text, ``ed25519:<base64 of the 32 raw bytes>`` (PEM is accepted too), so that they fit in the
consortium's trust file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from pixcell_fed.atomic import write_bytes_atomic
from pixcell_fed.errors import KeyFileError, UsageError

PUBLIC_KEY_PREFIX = "ed25519:"
PRIVATE_KEY_MODE = 0o600


def _ed25519():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def generate_private_key():
    """A fresh Ed25519 private key."""
    return _ed25519().Ed25519PrivateKey.generate()


def _passphrase_bytes(passphrase: str | bytes | None) -> bytes | None:
    if passphrase is None:
        return None
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not data:
        raise KeyFileError("the passphrase is empty", hint="set a non-empty passphrase, or use none at all")
    return data


def write_private_key(path: str | Path, key, *, passphrase: str | bytes | None = None, overwrite: bool = False) -> Path:
    """Write ``key`` as PKCS#8 PEM with mode 0600, atomically; encrypted when ``passphrase`` is given.

    An existing key file is never replaced unless ``overwrite`` is true: losing a signing key cannot be undone.
    """
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(
            f"key file already exists: {path}", hint="choose another file; an existing key is never overwritten"
        )
    secret = _passphrase_bytes(passphrase)
    encryption = serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, pem, mode=PRIVATE_KEY_MODE)


def public_key_text(public_key) -> str:
    """One-line text form of a public key: ``ed25519:<base64 raw>``."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def public_key_raw(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key) -> str:
    """``SHA256:<hex>`` of the raw public key (first 32 hex digits), for showing and comparing keys."""
    return "SHA256:" + hashlib.sha256(public_key_raw(public_key)).hexdigest()[:32]


def write_public_key(path: str | Path, public_key) -> Path:
    """Write the one-line text form of ``public_key`` (readable by anyone; it is public)."""
    return write_bytes_atomic(path, (public_key_text(public_key) + "\n").encode("ascii"), mode=0o644)


def parse_public_key(text: str, *, source: str = "public key"):
    """Parse ``ed25519:<base64>``, bare base64 of the 32 raw bytes, or a PEM ``PUBLIC KEY`` block."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _ed25519()
    if not isinstance(text, str):
        raise KeyFileError(
            f"{source}: expected text, got {type(text).__name__}", hint="write the key as 'ed25519:<base64>'"
        )
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise KeyFileError(
                f"{source}: not a valid PEM public key ({exc})", hint="paste the whole .pub file"
            ) from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise KeyFileError(f"{source}: not an Ed25519 key", hint="pixcell-fed uses Ed25519 keys only")
        return key
    if stripped.startswith(PUBLIC_KEY_PREFIX):
        stripped = stripped[len(PUBLIC_KEY_PREFIX) :]
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(
            f"{source}: not valid base64", hint="write the key as 'ed25519:<base64>' as printed by site-agent"
        ) from exc
    if len(raw) != 32:
        raise KeyFileError(
            f"{source}: an Ed25519 public key has 32 bytes, got {len(raw)}",
            hint="copy the whole line printed by 'site-agent init' or 'site-agent officer-key'",
        )
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(path: str | Path):
    """Read a public key file (one-line text form or PEM)."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"public key file not found: {path}", hint="check the path")
    return parse_public_key(path.read_text(encoding="utf-8", errors="replace"), source=str(path))


def check_private_key_permissions(path: Path) -> None:
    """Refuse a private key file that its group or others can access, or that another user owns."""
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o})",
            hint=f"restrict it to its owner: chmod 600 {path}",
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise KeyFileError(
            f"private key {path} belongs to another user (uid {info.st_uid})",
            hint="use a key file that you own, with mode 0600",
        )


def load_private_key(path: str | Path, *, passphrase: str | bytes | None = None):
    """Load an Ed25519 private key; :class:`KeyFileError` if missing, unsafe, encrypted without passphrase or wrong."""
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    if not path.is_file():
        raise KeyFileError(
            f"private key file not found: {path}",
            hint="create one with 'site-agent init' (site key) or 'site-agent officer-key' (officer key)",
        )
    check_private_key_permissions(path)
    secret = _passphrase_bytes(passphrase)
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=secret)
    except TypeError as exc:
        if secret is None:
            raise KeyFileError(
                f"private key {path} is passphrase-protected and no passphrase was given",
                hint="pass --passphrase-env VAR with the passphrase in environment variable VAR",
            ) from exc
        raise KeyFileError(
            f"private key {path} is not encrypted, but a passphrase was given",
            hint="drop the passphrase option for this key",
        ) from exc
    except ValueError as exc:
        if secret is not None and b"ENCRYPTED" in data:
            raise KeyFileError(
                f"wrong passphrase for private key {path}", hint="check the passphrase and try again"
            ) from exc
        raise KeyFileError(
            f"{path} is not a readable private key ({exc})", hint="pass the .key file written by site-agent"
        ) from exc
    if not isinstance(key, _ed25519().Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key", hint="pixcell-fed signs with Ed25519 keys only")
    return key


def passphrase_from_env(var: str | None) -> str | None:
    """The passphrase held in environment variable ``var`` (``None`` when no variable is named)."""
    if not var:
        return None
    value = os.environ.get(var)
    if value is None or value == "":
        raise UsageError(
            f"environment variable {var} holding the key passphrase is not set or empty",
            hint=f"export {var}=... before running, or drop the passphrase option",
        )
    return value


def write_key_pair(private_path: str | Path, *, passphrase: str | bytes | None = None) -> tuple[Path, Path, object]:
    """Generate a key pair; write ``private_path`` (0600) and ``private_path`` with suffix ``.pub``.

    Returns the two paths and the public key.
    """
    private_path = Path(private_path)
    public_path = private_path.with_suffix(".pub")
    if public_path.exists():
        raise KeyFileError(f"public key file already exists: {public_path}", hint="choose another file name or folder")
    key = generate_private_key()
    write_private_key(private_path, key, passphrase=passphrase)
    write_public_key(public_path, key.public_key())
    return private_path, public_path, key.public_key()
