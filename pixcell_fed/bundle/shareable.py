"""What may leave the site inside a bundle: allow-lists for the shareable audit summary and model identities.

Everything here fails closed: an unknown key, a key naming files, folders, slides, patients, sources or
embeddings, a path-like string, a tile identifier or a long unsorted vector of numbers (which could be an
embedding) is refused with the exact location of the offending value.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from pixcell_fed.errors import BundleError

#: top-level keys of a shareable audit summary (``audit_summary.json`` written by the audit, ``audit.json`` in a bundle)
SHAREABLE_AUDIT_KEYS = frozenset(
    {
        "schema",
        "format_version",  # version of the summary's layout
        "created",
        "verdict",  # "PASS" | "WARN" | "INCONCLUSIVE" | "FAIL"
        "sizes",  # sizes of S, T and H
        "config",  # the audit's thresholds and settings
        "thresholds",
        "provenance",  # where each threshold comes from
        "identities",  # generator, encoder and audit identities with weight hashes
        "rounds",  # audit rounds when flagged tiles were dropped
        "tests",  # per test: status, statistic, thresholds, provenance, plain sentence
        "null",  # the holdout null's statistics
        "statistics",  # further dataset-level numbers
        "figures",  # binned figure data (histograms, percentiles, ROC)
        "fidelity",  # conditioning-encoder fidelity numbers
        "identifier_findings_by_kind",  # counts only
        "tiles",  # per audited synthetic tile: sha256, kept, flagged, reasons, nearest similarity
        "kept_sha256",  # sha256 of the synthetic tiles the audit kept: exactly what may be shipped
        "conditioning",  # how synthesis was conditioned and its guarantee (pixcell_fed.privacy.conditioning)
    }
)
HASHES_KEY = "kept_sha256"
REQUIRED_AUDIT_KEYS = ("verdict", HASHES_KEY)
VERDICTS = ("PASS", "WARN", "INCONCLUSIVE", "FAIL")
#: key-name tokens whose values may only be numbers (counts): names, paths and identifiers hide behind them
NAME_KEY_TOKENS = frozenset(
    {
        "path",
        "paths",
        "file",
        "files",
        "filename",
        "filenames",
        "dir",
        "directory",
        "folder",
        "slide",
        "slides",
        "patient",
        "patients",
        "source",
        "sources",
        "tile_id",
        "tileid",
        "barcode",
        "macro",
        "properties",
        "mrn",
        "accession",
    }
)
#: key-name tokens that never appear at all (embeddings, coordinates and seeds tied to source tiles)
FORBIDDEN_KEY_TOKENS = frozenset({"embedding", "embeddings", "coords", "coordinates", "seeds"})
MAX_NUMBERS_PER_LIST = 256  # figure data is binned or sorted; a longer unsorted vector could be an embedding
MAX_STRING = 2000
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SCHEMA_RE = re.compile(r"^pixcell-fed/audit-summary/\d{1,3}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.%:+<>\- ]{1,80}$")
_PATH_EXT_RE = re.compile(
    r"\.(svs|tif|tiff|ndpi|mrxs|scn|vms|vmu|bif|czi|dcm|isyntax|qptiff|svslide|png|jpe?g|bmp|gif|webp|parquet|npy|npz"
    r"|pt|pth|bin|safetensors|ckpt|yaml|yml|csv|json|html|txt|log|h5|zip)\b",
    re.IGNORECASE,
)
_TILE_ID_RE = re.compile(r"r\d{5}-c\d{5}")
_ABS_PATH_RE = re.compile(r"(?:^|[\s(\[\"'=:])(?:/|~/)[A-Za-z0-9_.~\-]")  # /data, ~/x anywhere in a text
_MULTI_SEGMENT_RE = re.compile(r"[^\s/]+/[^\s/]+/[^\s/]*")  # a/b/c (one slash alone: 'TPR/FPR', 'org/model')


def path_like_reason(text: str) -> str | None:
    """Why ``text`` looks like a path, URL, file name or tile identifier, or ``None`` when it does not."""
    if "\\" in text:
        return "contains a backslash"
    if text.startswith(("/", "~", "./", "../")) or "/./" in text or "/../" in text or _ABS_PATH_RE.search(text):
        return "looks like a file path"
    if re.match(r"^[A-Za-z]:[\\/]", text):
        return "looks like a Windows path"
    if "://" in text or text.lower().startswith("file:"):
        return "looks like a URL"
    if _MULTI_SEGMENT_RE.search(text):
        return "looks like a file path"
    if _PATH_EXT_RE.search(text):
        return "looks like a file name"
    if _TILE_ID_RE.search(text):
        return "looks like a tile identifier"
    return None


def _key_tokens(key: str) -> set[str]:
    return {t for t in re.split(r"[^a-z0-9]+", key.lower()) if t} | {key.lower()}


def check_shareable_value(value: Any, where: str) -> None:
    """Recursively refuse anything that must not ship: see the module docstring."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BundleError(f"{where}: non-finite number {value!r}", hint="write null instead of NaN or infinity")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise BundleError(
                f"{where}: string of {len(value)} characters (at most {MAX_STRING})",
                hint="shareable summaries hold short texts only",
            )
        reason = path_like_reason(value)
        if reason:
            raise BundleError(
                f"{where}: value {value[:80]!r} {reason}; nothing path-like may leave the site",
                hint="remove file names, folders, URLs and tile identifiers from the shareable summary",
            )
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise BundleError(
                    f"{where}: key {str(key)[:80]!r} is not a plain name", hint="use short plain key names"
                )
            bad = _key_tokens(key) & FORBIDDEN_KEY_TOKENS
            if not (item is None or isinstance(item, (bool, int, float))):
                bad |= _key_tokens(key) & NAME_KEY_TOKENS
            if bad:
                raise BundleError(
                    f"{where}.{key}: key names {', '.join(sorted(bad))}, which may not leave the site",
                    hint="drop file, folder, slide, patient, source and embedding fields from shared data",
                )
            check_shareable_value(item, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        monotone = len(numbers) == len(value) and (
            all(a <= b for a, b in itertools.pairwise(numbers)) or all(a >= b for a, b in itertools.pairwise(numbers))
        )
        if len(numbers) > MAX_NUMBERS_PER_LIST and not monotone:  # curves and bin edges are sorted; embeddings are not
            raise BundleError(
                f"{where}: an unsorted list of {len(numbers)} numbers (at most {MAX_NUMBERS_PER_LIST}); "
                "it could be an embedding",
                hint="bin figure data (histograms, ROC) before sharing it",
            )
        for i, item in enumerate(value):
            check_shareable_value(item, f"{where}[{i}]")
        return
    raise BundleError(f"{where}: unsupported value of type {type(value).__name__}", hint="use JSON values only")


def audit_json_text(summary: Mapping) -> str:
    """How a shareable audit is written as a bundle's ``audit.json`` (verification demands these bytes)."""
    return json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def validate_identity(identity: Any, what: str) -> dict:
    """A generator or encoder identity: a flat mapping of plain names to scalars, nothing path-like."""
    if not isinstance(identity, Mapping) or not identity:
        raise BundleError(
            f"{what} identity must be a non-empty mapping, got {type(identity).__name__}",
            hint="pass the model's .identity dict",
        )
    for key, value in identity.items():
        if not (value is None or isinstance(value, (str, int, float, bool))):
            raise BundleError(
                f"{what} identity '{key}' must be a scalar, got {type(value).__name__}",
                hint="identities are flat: name, variant, weight hashes",
            )
    check_shareable_value(dict(identity), f"{what} identity")
    return dict(identity)


def validate_shareable_audit(summary: Any, *, source: str = "audit summary") -> dict:
    """Check a shareable audit summary against the allow-list; return it as a plain dict."""
    if not isinstance(summary, Mapping):
        raise BundleError(
            f"{source}: expected a JSON object, got {type(summary).__name__}", hint="pass audit_summary.json"
        )
    unknown = sorted(str(k) for k in summary if k not in SHAREABLE_AUDIT_KEYS)
    if unknown:
        raise BundleError(
            f"{source}: keys not allowed in a shareable audit: {', '.join(unknown)}",
            hint=f"a shareable audit may hold only: {', '.join(sorted(SHAREABLE_AUDIT_KEYS))}",
        )
    missing = [k for k in REQUIRED_AUDIT_KEYS if k not in summary]
    if missing:
        raise BundleError(f"{source}: missing {', '.join(missing)}", hint="pass the audit_summary.json the audit wrote")
    if summary["verdict"] not in VERDICTS:
        raise BundleError(
            f"{source}: verdict {summary['verdict']!r} is not one of {', '.join(VERDICTS)}",
            hint="pass the audit_summary.json the audit wrote",
        )
    hashes = summary[HASHES_KEY]
    if not isinstance(hashes, list) or not all(isinstance(h, str) and _SHA256_RE.match(h) for h in hashes):
        raise BundleError(
            f"{source}: {HASHES_KEY} must be a list of lowercase hex sha256 digests",
            hint="pass the audit_summary.json the audit wrote",
        )
    schema = summary.get("schema")
    if schema is not None and not (isinstance(schema, str) and _SCHEMA_RE.match(schema)):
        raise BundleError(
            f"{source}: unknown schema {str(schema)[:80]!r}", hint="pass the audit_summary.json the audit wrote"
        )
    check_shareable_value({k: v for k, v in summary.items() if k not in (HASHES_KEY, "schema")}, source)
    return dict(summary)
