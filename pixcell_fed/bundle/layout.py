"""The bundle's file layout, ``bundle.json``, the signed statement and the signature files.

``bundle.json`` has an immutable part (format, site, run id, creation time, tile size, counts, verdict, the
conditioning claim (mode and, for dp, its per-tile and per-slide guarantee; the same record as the audit's) and the
sha256 of ``manifest.parquet``, ``audit.json`` and ``audit_summary.html``) and a mutable part (``state`` and
``decision``). Every file name of a bundle is a constant here.
The site signs a *statement*: canonical JSON binding the site name, the run id, the sha256 of the immutable part
and the sha256 of the manifest, audit and summary. Approval changes only the mutable part, so the site's
signature stays valid; the officer signs the same statement with ``role: officer`` and the approval decision
(state, time, officer fingerprint), so that every byte of ``bundle.json`` is covered by a signature.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pixcell_fed.bundle.manifest import canonical_json, check_run_id
from pixcell_fed.bundle.png import MAX_TILE_SIZE, MIN_TILE_SIZE
from pixcell_fed.errors import BundleError, VerificationError
from pixcell_fed.privacy.conditioning import ClaimError, ConditioningClaim

FORMAT = "pixcell-fed-bundle"
FORMAT_VERSION = 3  # 3: bundle.json carries the conditioning claim
BUNDLE_JSON = "bundle.json"
MANIFEST = "manifest.parquet"
AUDIT = "audit.json"
SUMMARY_HTML = "audit_summary.html"
TILES = "tiles"
SIGNATURES = "signatures"
SITE_SIG = f"{SIGNATURES}/site.sig"
OFFICER_SIG = f"{SIGNATURES}/officer.sig"
STATEMENT_TYPE = "pixcell-fed-bundle-statement"

STATE_AWAITING = "awaiting_approval"
STATE_APPROVED = "approved"
STATE_REJECTED = "rejected"
STATES = (STATE_AWAITING, STATE_APPROVED, STATE_REJECTED)

IMMUTABLE_KEYS = (
    "format",
    "format_version",
    "site",
    "run_id",
    "created",
    "tile_size",
    "counts",
    "verdict",
    "conditioning",
    "files",
)
MUTABLE_KEYS = ("state", "decision")
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00$")


@contextlib.contextmanager
def bundle_lock(bundle_dir: Path) -> Iterator[None]:
    """Exclusive lock for building or deciding on ``bundle_dir``; a file beside it, so nothing extra is inside."""
    import fcntl

    from pixcell_fed.errors import LockedError

    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(bundle_dir.parent / f".{bundle_dir.name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(
                f"another process is building or deciding on {bundle_dir}", hint="wait for it to finish"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def utc_now() -> str:
    """The current UTC time as written in bundles: ISO 8601 to the second, ``+00:00``."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def parse_time(text: Any) -> _dt.datetime | None:
    """A time written by :func:`utc_now` as an aware UTC datetime; ``None`` for anything else (fail closed)."""
    if not isinstance(text, str) or not _TIME_RE.match(text):
        return None
    try:
        return _dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def check_site_name(name: Any, where: str = "site name") -> str:
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        raise BundleError(
            f"{where}: {name!r} is not a valid site name", hint="site names are letters, digits, '-' or '_'"
        )
    return name


def bundle_json_text(info: dict) -> str:
    """The one way ``bundle.json`` is written (sorted keys, indent 2, ASCII): verification demands these bytes."""
    return json.dumps(info, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def immutable_part(info: dict) -> dict:
    return {k: info[k] for k in IMMUTABLE_KEYS}


def immutable_sha256(info: dict) -> str:
    return hashlib.sha256(canonical_json(immutable_part(info)).encode("ascii")).hexdigest()


def _bad(message: str, *, verifying: bool) -> BundleError:
    cls = VerificationError if verifying else BundleError
    return cls(
        f"bundle.json: {message}",
        hint="the bundle was modified or is not a pixcell-fed bundle; ask the site for a fresh copy",
    )


def read_bundle_json(bundle_dir: Path, *, verifying: bool = False) -> dict:
    """Read and strictly validate ``bundle.json`` (exact bytes, keys, types, state)."""
    path = bundle_dir / BUNDLE_JSON
    if not path.is_file():
        raise (VerificationError if verifying else BundleError)(
            f"{bundle_dir} is not a bundle: {BUNDLE_JSON} is missing", hint="pass the bundle folder built by site-agent"
        )
    data = path.read_bytes()
    try:
        info = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"not valid JSON ({exc})", verifying=verifying) from exc
    if not isinstance(info, dict):
        raise _bad("not a JSON object", verifying=verifying)
    keys = set(info)
    if keys != set(IMMUTABLE_KEYS) | set(MUTABLE_KEYS):
        extra = sorted(keys - set(IMMUTABLE_KEYS) - set(MUTABLE_KEYS))
        missing = sorted((set(IMMUTABLE_KEYS) | set(MUTABLE_KEYS)) - keys)
        raise _bad(f"unexpected keys {extra} / missing keys {missing}", verifying=verifying)
    try:
        canonical = bundle_json_text(info)
    except ValueError as exc:
        raise _bad(f"invalid values ({exc})", verifying=verifying) from exc
    if canonical.encode("ascii") != data:
        raise _bad("its bytes differ from the canonical form (edited by hand?)", verifying=verifying)
    if info["format"] != FORMAT or info["format_version"] != FORMAT_VERSION:
        raise _bad(f"unsupported format {info['format']!r} version {info['format_version']!r}", verifying=verifying)
    try:
        check_site_name(info["site"], "bundle.json: site")
        check_run_id(info["run_id"], "bundle.json: run_id")
    except BundleError as exc:
        raise _bad(str(exc), verifying=verifying) from exc
    if parse_time(info["created"]) is None:
        raise _bad(f"invalid 'created' time {str(info['created'])[:40]!r} (expected UTC ISO 8601)", verifying=verifying)
    size = info["tile_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_TILE_SIZE <= size <= MAX_TILE_SIZE:
        raise _bad(
            f"invalid 'tile_size' {size!r} (expected {MIN_TILE_SIZE} to {MAX_TILE_SIZE} px)", verifying=verifying
        )
    if info["verdict"] not in ("PASS", "WARN", "INCONCLUSIVE", "FAIL"):
        raise _bad(f"invalid verdict {info['verdict']!r}", verifying=verifying)
    try:
        ConditioningClaim.from_record(info["conditioning"])
    except ClaimError as exc:
        raise _bad(f"invalid 'conditioning' claim: {exc}", verifying=verifying) from exc
    files = info["files"]
    if not isinstance(files, dict) or set(files) != {MANIFEST, AUDIT, SUMMARY_HTML}:
        raise _bad("invalid 'files' record", verifying=verifying)
    for name, digest in files.items():
        if not (digest is None and name == SUMMARY_HTML) and not (isinstance(digest, str) and _SHA_RE.match(digest)):
            raise _bad(f"invalid sha256 for {name}", verifying=verifying)
    counts = info["counts"]
    if (
        not isinstance(counts, dict)
        or set(counts) != {"tiles", "labels"}
        or not isinstance(counts["tiles"], int)
        or not isinstance(counts["labels"], dict)
    ):
        raise _bad("invalid 'counts'", verifying=verifying)
    if info["state"] not in STATES:
        raise _bad(f"invalid state {info['state']!r}", verifying=verifying)
    decision = info["decision"]
    expected_keys = {
        STATE_AWAITING: None,
        STATE_APPROVED: {"state", "time", "officer"},
        STATE_REJECTED: {"state", "time", "reason", "officer"},
    }[info["state"]]
    if expected_keys is None:
        if decision is not None:
            raise _bad("a bundle awaiting approval has no decision", verifying=verifying)
    elif (
        not isinstance(decision, dict)
        or set(decision) != expected_keys
        or decision["state"] != info["state"]
        or not all(isinstance(v, str) for v in decision.values())
    ):
        raise _bad(f"invalid 'decision' for state {info['state']}", verifying=verifying)
    return info


def write_bundle_json(bundle_dir: Path, info: dict) -> None:
    from pixcell_fed.atomic import write_text_atomic

    write_text_atomic(bundle_dir / BUNDLE_JSON, bundle_json_text(info))


def statement(info: dict, *, role: str) -> bytes:
    """The canonical bytes signed by the site (``role='site'``) or the officer (``role='officer'``)."""
    body = {
        "type": STATEMENT_TYPE,
        "format_version": FORMAT_VERSION,
        "role": role,
        "site": info["site"],
        "run_id": info["run_id"],
        "bundle_sha256": immutable_sha256(info),
        "manifest_sha256": info["files"][MANIFEST],
        "audit_sha256": info["files"][AUDIT],
        "summary_html_sha256": info["files"][SUMMARY_HTML],
    }
    if role == "officer":
        if info["state"] != STATE_APPROVED or not isinstance(info["decision"], dict):
            raise ValueError("the officer signs an approved bundle's statement only")
        body["decision"] = dict(info["decision"])  # state, time and officer fingerprint: every byte is signed
    elif role != "site":
        raise ValueError(f"unknown signer role {role!r}")
    return canonical_json(body).encode("ascii")


def signature_record(private_key, message: bytes, *, role: str) -> dict:
    """The signature of ``message`` by ``private_key`` as written in a signature file (or a refusal notice)."""
    from pixcell_fed.keys import public_key_text

    return {
        "algorithm": "ed25519",
        "role": role,
        "public_key": public_key_text(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(message)).decode("ascii"),
    }


def write_signature(bundle_dir: Path, rel: str, private_key, message: bytes, *, role: str) -> None:
    from pixcell_fed.atomic import write_text_atomic

    write_text_atomic(bundle_dir / rel, canonical_json(signature_record(private_key, message, role=role)) + "\n")


def read_signature(bundle_dir: Path, rel: str, *, role: str):
    """``(public key, signature bytes)`` from a signature file; :class:`VerificationError` when malformed."""
    path = bundle_dir / rel
    hint = "the signature file was modified or damaged; ask the site for a fresh copy"
    try:
        record = json.loads(path.read_bytes().decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(f"{rel}: not a valid signature file ({exc})", hint=hint) from exc
    key, signature = signature_from_record(record, rel, role=role, hint=hint)
    if canonical_json(record) + "\n" != path.read_text(encoding="ascii"):
        raise VerificationError(f"{rel}: its bytes differ from the canonical form", hint=hint)
    return key, signature


def signature_from_record(record: Any, rel: str, *, role: str, hint: str):
    """``(public key, signature bytes)`` from a :func:`signature_record`; :class:`VerificationError` when malformed."""
    from pixcell_fed.errors import KeyFileError
    from pixcell_fed.keys import parse_public_key

    if not isinstance(record, dict) or set(record) != {"algorithm", "role", "public_key", "signature"}:
        raise VerificationError(f"{rel}: not a valid signature file (unexpected fields)", hint=hint)
    if record["algorithm"] != "ed25519" or record["role"] != role:
        raise VerificationError(
            f"{rel}: expected an ed25519 {role} signature, got {record['algorithm']!r} {record['role']!r}", hint=hint
        )
    try:
        key = parse_public_key(record["public_key"], source=f"{rel}: public_key")
        signature = base64.b64decode(record["signature"], validate=True)
    except (KeyFileError, binascii.Error, ValueError, TypeError) as exc:
        raise VerificationError(f"{rel}: malformed key or signature ({exc})", hint=hint) from exc
    return key, signature


def signature_valid(public_key, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
