"""The audit's data roles, enforced: S (synthetic), T (the real tiles that conditioned S, with s -> t(s)) and H
(real tiles of slides never used for conditioning), and the seeded split of slides or patients that makes T and H.

Roles are checked before any statistic: S, T and H must be non-empty and pairwise disjoint (by resolved path, and T
and H also by content), H large enough to be a null (``|H| >= min_holdout_ratio * |T|`` and at least
``min_holdout`` tiles), and every entry of the mapping must name a tile of S and a tile of T. A violation raises
:class:`~pixcell_fed.errors.AuditError`: the audit refuses rather than report numbers that mean nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pixcell_fed.errors import AuditError, UsageError
from pixcell_fed.hashing import sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_tiles(folder: str | Path, *, role: str) -> list[Path]:
    """PNG/JPEG files under ``folder`` (recursively), sorted; UsageError when the folder is missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(
            f"{role} folder {folder} does not exist or is not a folder",
            hint=f"pass a folder of PNG or JPEG tiles as the {role} set",
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(
            f"{role} folder {folder} holds no PNG or JPEG tiles",
            hint=f"the {role} set must contain at least one .png/.jpg tile",
        )
    return files


@dataclass(frozen=True)
class DataRoles:
    """The three sets of an audit and the mapping of each synthetic tile to the index of its source in T."""

    synthetic: tuple[Path, ...]
    reference: tuple[Path, ...]
    holdout: tuple[Path, ...]
    source_index: Mapping[int, int] = field(default_factory=dict)

    @property
    def has_mapping(self) -> bool:
        return bool(self.source_index)

    def sizes(self) -> dict[str, int]:
        return {"S": len(self.synthetic), "T": len(self.reference), "H": len(self.holdout)}


def _lookup_table(paths: Sequence[Path]) -> dict[str, int]:
    """Index of each path by full string, by file name and by stem; ambiguous names are left out."""
    table: dict[str, int] = {}
    seen: dict[str, int] = {}
    for i, p in enumerate(paths):
        for key in {str(p), str(p.resolve()), p.name, p.stem}:
            seen[key] = seen.get(key, 0) + 1
            table[key] = i
    return {k: v for k, v in table.items() if seen[k] == 1 or k in (str(paths[v]), str(paths[v].resolve()))}


def build_roles(
    synthetic: Sequence[str | Path],
    reference: Sequence[str | Path],
    holdout: Sequence[str | Path],
    *,
    source_of: Mapping[str, str] | None,
    min_holdout: int,
    min_holdout_ratio: float,
) -> DataRoles:
    """Check the roles and resolve the mapping s -> t(s) (keys and values: path, file name or stem)."""
    s = tuple(Path(p) for p in synthetic)
    t = tuple(Path(p) for p in reference)
    h = tuple(Path(p) for p in holdout)
    for role, paths in (("synthetic (S)", s), ("reference (T)", t), ("holdout (H)", h)):
        if not paths:
            raise AuditError(f"the {role} set is empty", hint="the audit needs tiles in all three roles S, T and H")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise AuditError(
                f"{len(missing)} {role} file(s) do not exist, e.g. {missing[0]}", hint="pass existing tile files"
            )
    resolved = {name: {p.resolve() for p in paths} for name, paths in (("S", s), ("T", t), ("H", h))}
    for a, b in (("S", "T"), ("S", "H"), ("T", "H")):
        both = resolved[a] & resolved[b]
        if both:
            raise AuditError(
                f"{len(both)} file(s) are in both {a} and {b}, e.g. {sorted(both)[0]}",
                hint="each tile has exactly one role: synthetic, conditioning (T) or held out (H)",
            )
    t_hashes = {sha256_file(p): p for p in t}
    dup = [p for p in h if sha256_file(p) in t_hashes]
    if dup:
        raise AuditError(
            f"{len(dup)} held-out tile(s) are byte-identical to conditioning tiles, e.g. {dup[0]}",
            hint="H must come from slides never used for conditioning; split by slide, not by tile",
        )
    if len(h) < min_holdout:
        raise AuditError(
            f"the holdout set has {len(h)} tiles; the audit needs at least {min_holdout} for its null",
            hint="hold out more slides (split.holdout_fraction) or lower audit.min_holdout",
        )
    if len(h) < min_holdout_ratio * len(t):
        raise AuditError(
            f"the holdout set ({len(h)} tiles) is smaller than {min_holdout_ratio:g} x the conditioning set ({len(t)})",
            hint="hold out more slides, subsample T, or lower audit.min_holdout_ratio (audit.md asks |H| >= |T|/2)",
        )
    index: dict[int, int] = {}
    if source_of:
        s_table, t_table = _lookup_table(s), _lookup_table(t)
        for key, value in source_of.items():
            si, ti = s_table.get(str(key)), t_table.get(str(value))
            if si is None:
                raise AuditError(
                    f"the mapping names synthetic tile {key!r}, which is not in S",
                    hint="map every synthetic tile (path, name or stem) to its source tile in T",
                )
            if ti is None:
                raise AuditError(
                    f"the mapping sends {key!r} to {value!r}, which is not in T (or is ambiguous)",
                    hint="the source of a synthetic tile must be one of the conditioning tiles",
                )
            index[si] = ti
    return DataRoles(s, t, h, index)


def split_slides(
    slide_keys: Sequence[str], holdout_fraction: float, seed: int, *, unit: str = "slide"
) -> tuple[list[str], list[str]]:
    """Split slides (or patients: ``unit``) into (conditioning T, held-out H), deterministically for a given seed.

    Both sides get at least one; the order of ``slide_keys`` does not matter.
    """
    keys = sorted(set(slide_keys))
    if len(keys) != len(slide_keys):
        raise AuditError(f"duplicate {unit} keys given to split_slides", hint=f"pass each {unit} once")
    if len(keys) < 2:
        raise AuditError(
            f"the audit needs at least 2 {unit}s to split into T and H (got {len(keys)})",
            hint=f"add {unit}s: held-out tiles must come from {unit}s never used for conditioning",
        )
    if not 0.0 < holdout_fraction < 1.0:
        raise AuditError(
            f"holdout_fraction must be strictly between 0 and 1 (got {holdout_fraction})",
            hint="set split.holdout_fraction, e.g. 0.34",
        )
    order = np.random.default_rng(seed).permutation(len(keys))
    n_h = min(len(keys) - 1, max(1, int(round(holdout_fraction * len(keys)))))
    holdout = sorted(keys[i] for i in order[:n_h])
    conditioning = sorted(keys[i] for i in order[n_h:])
    return conditioning, holdout
