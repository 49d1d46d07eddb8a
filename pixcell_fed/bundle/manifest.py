"""``manifest.parquet``: one row per shipped tile, allow-listed columns only, validated fail-closed.

Columns: ``file_name`` (random ``<32 hex>.png``), ``sha256``, ``size`` (bytes), ``label`` (only when the site labels
its slides; then on every row), ``generator`` and ``encoder`` (canonical JSON of the model identities) and
``run_id``. Any other column, a wrong type, a missing value, a path-like or non-random file name, a duplicate,
or parquet key-value metadata is a :class:`BundleError`.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pixcell_fed.bundle.png import TILE_NAME_RE
from pixcell_fed.bundle.shareable import validate_identity
from pixcell_fed.errors import BundleError

REQUIRED_COLUMNS = ("file_name", "sha256", "size", "generator", "encoder", "run_id")
OPTIONAL_COLUMNS = ("label",)
COLUMN_ORDER = ("file_name", "sha256", "size", "label", "generator", "encoder", "run_id")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+\-]{0,63}$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(obj: Any) -> str:
    """The one JSON serialisation that is hashed and signed: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def check_label(label: Any, where: str) -> str:
    if not isinstance(label, str) or not LABEL_RE.match(label):
        raise BundleError(
            f"{where}: class label {label!r} is not a short plain name",
            hint="labels are 1-64 letters, digits, spaces, '_', '.', '+' or '-' (no paths)",
        )
    return label


def check_run_id(run_id: Any, where: str = "run id") -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise BundleError(
            f"{where}: {run_id!r} is not a valid run id", hint="run ids are 1-64 letters, digits, '_', '.' or '-'"
        )
    return run_id


def manifest_frame(rows: Sequence[dict]):
    """A validated manifest DataFrame from row dicts (keys: the manifest's columns)."""
    import pandas as pd

    if not rows:
        raise BundleError("a bundle needs at least one tile", hint="check that synthesis produced tiles")
    has_label = any(r.get("label") is not None for r in rows)
    columns = [c for c in COLUMN_ORDER if c != "label" or has_label]
    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    if has_label:
        frame["label"] = frame["label"].astype(object)
    frame["size"] = frame["size"].astype("int64")
    return validate_manifest(frame)


def validate_manifest(frame, *, source: str = "manifest.parquet"):
    """Fail-closed validation of a manifest DataFrame; returns it unchanged."""
    import pandas as pd
    from pandas.api import types as ptypes

    columns = list(frame.columns)
    extra = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        raise BundleError(
            f"{source}: columns not allowed: {', '.join(map(str, extra))}",
            hint=f"a manifest may hold only: {', '.join(COLUMN_ORDER)}",
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise BundleError(f"{source}: missing columns: {', '.join(missing)}", hint="rebuild the bundle")
    if len(set(columns)) != len(columns):
        raise BundleError(f"{source}: duplicate column names", hint="rebuild the bundle")
    if len(frame) == 0:
        raise BundleError(f"{source}: no tiles", hint="a bundle needs at least one tile")
    if not isinstance(frame.index, pd.RangeIndex):
        raise BundleError(f"{source}: unexpected index", hint="rebuild the bundle")
    for column in columns:
        series = frame[column]
        if series.isna().any():
            raise BundleError(f"{source}: missing values in column '{column}'", hint="every row needs every column")
        if column == "size":
            if not ptypes.is_integer_dtype(series.dtype) or ptypes.is_bool_dtype(series.dtype):
                raise BundleError(
                    f"{source}: column 'size' must be integers, got {series.dtype}", hint="rebuild the bundle"
                )
            if (series <= 0).any():
                raise BundleError(f"{source}: non-positive sizes", hint="rebuild the bundle")
            continue
        if not (ptypes.is_object_dtype(series.dtype) or ptypes.is_string_dtype(series.dtype)) or not all(
            isinstance(v, str) for v in series
        ):
            raise BundleError(
                f"{source}: column '{column}' must be text, got {series.dtype}", hint="rebuild the bundle"
            )
    for i, name in enumerate(frame["file_name"]):
        if not TILE_NAME_RE.match(name):
            raise BundleError(
                f"{source}: row {i}: file name {name[:80]!r} is not a random '<32 hex>.png' name",
                hint="tiles are shipped under random names only (no paths, no source names)",
            )
    if frame["file_name"].duplicated().any():
        raise BundleError(f"{source}: duplicate file names", hint="rebuild the bundle")
    for i, digest in enumerate(frame["sha256"]):
        if not _SHA256_RE.match(digest):
            raise BundleError(
                f"{source}: row {i}: sha256 {digest[:80]!r} is not a lowercase hex digest", hint="rebuild the bundle"
            )
    if "label" in columns:
        for i, label in enumerate(frame["label"]):
            check_label(label, f"{source}: row {i}")
    if frame["run_id"].nunique() != 1:
        raise BundleError(f"{source}: more than one run id", hint="a bundle holds the tiles of one run")
    check_run_id(frame["run_id"].iloc[0], f"{source}: run_id")
    for column in ("generator", "encoder"):
        for text in frame[column].unique():
            try:
                identity = json.loads(text)
            except ValueError as exc:
                raise BundleError(f"{source}: column '{column}' is not JSON", hint="rebuild the bundle") from exc
            validate_identity(identity, f"{source}: {column}")
            if canonical_json(identity) != text:
                raise BundleError(f"{source}: column '{column}' is not canonical JSON", hint="rebuild the bundle")
    return frame


def label_counts(frame) -> dict[str, int]:
    """Tiles per class label of a manifest (empty when it has no labels), as ``bundle.json`` records them."""
    if "label" not in frame.columns:
        return {}
    return {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}


def manifest_bytes(frame) -> bytes:
    """Serialise a validated manifest as parquet without key-value metadata (deterministic for the same rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    validate_manifest(frame)
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    fields = [pa.field(c, pa.int64() if c == "size" else pa.string(), nullable=False) for c in frame.columns]
    table = table.cast(pa.schema(fields))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", store_schema=False)
    return buf.getvalue()


def read_manifest(path: str | Path):
    """Read and validate ``manifest.parquet`` (parquet types and metadata checked too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise BundleError(f"{path.name}: not a readable parquet file ({exc})", hint="the manifest is corrupt") from exc
    if table.schema.metadata:
        keys = ", ".join(k.decode("utf-8", "replace") for k in table.schema.metadata)
        raise BundleError(f"{path.name}: unexpected parquet metadata ({keys})", hint="manifests carry no metadata")
    for field in table.schema:
        expected = pa.int64() if field.name == "size" else pa.string()
        if field.name in COLUMN_ORDER and field.type != expected:
            raise BundleError(
                f"{path.name}: column '{field.name}' has type {field.type}, expected {expected}",
                hint="rebuild the bundle",
            )
    frame = table.to_pandas()
    return validate_manifest(frame, source=path.name)
