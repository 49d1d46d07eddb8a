"""The site's slide table (``site.labels_csv``): per slide, an optional class label (synthetic tiles inherit their
source slide's label) and an optional patient (the T/H split holds out whole patients).

Columns: ``slide`` (file name in the slides folder) first, then ``label`` and/or ``patient`` (``case`` is read as
``patient``). Patient identifiers are used on site only, to group slides; they never reach a shipped file, and the
pipeline adds them to the strings the audit's identifier scan forbids.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pixcell_fed.bundle.manifest import LABEL_RE
from pixcell_fed.errors import ConfigError

LABEL_COLUMNS = ("slide", "label")
PATIENT_COLUMNS = ("patient", "case")


@dataclass(frozen=True)
class SlideTable:
    """Slide file name -> class label, and slide file name -> patient (either may be empty)."""

    labels: dict[str, str] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)


def _columns(path: Path, header: Sequence[str] | None) -> tuple[str | None, str | None]:
    """The label and patient column names of a header, refusing anything else."""
    names = [c.strip().lower() for c in header or []]
    extra = [c for c in names[1:] if c not in ("label", *PATIENT_COLUMNS)]
    patient = [c for c in names[1:] if c in PATIENT_COLUMNS]
    if not names or names[0] != "slide" or extra or len(patient) > 1 or len(names) < 2 or len(set(names)) < len(names):
        raise ConfigError(
            f"{path}: the header must be 'slide' followed by 'label' and/or 'patient' (or 'case'), "
            f"e.g. 'slide,label,patient' (got {header})",
            hint="write one row per slide: file name, class label, patient (or case) identifier",
        )
    return ("label" if "label" in names else None), (patient[0] if patient else None)


def _put(table: dict[str, str], slide: str, value: str, what: str, where: str) -> None:
    if slide in table and table[slide] != value:
        raise ConfigError(f"{where}: slide {slide!r} has two {what}s", hint=f"give each slide exactly one {what}")
    table[slide] = value


def load_slide_table(path: str | Path | None) -> SlideTable:
    """Read the slide table; None gives an empty one."""
    if path is None:
        return SlideTable()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}", hint="fix site.labels_csv, or set it to null")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        label_col, patient_col = _columns(path, reader.fieldnames)
        reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
        table = SlideTable()
        for line_no, row in enumerate(reader, start=2):
            where = f"{path}:{line_no}"
            slide = (row.get("slide") or "").strip()
            values = {c: (row.get(c) or "").strip() for c in (label_col, patient_col) if c}
            if not slide or not all(values.values()):
                raise ConfigError(f"{where}: empty value", hint="every row needs a slide and a value in every column")
            if label_col:
                if not LABEL_RE.match(values[label_col]):
                    raise ConfigError(
                        f"{where}: class label {values[label_col]!r} is not a short plain name",
                        hint="labels are 1-64 letters, digits, spaces, '_', '.', '+' or '-' (they are shipped)",
                    )
                _put(table.labels, slide, values[label_col], "label", where)
            if patient_col:
                _put(table.patients, slide, values[patient_col], "patient", where)
    return table


def load_slide_labels(path: str | Path | None) -> dict[str, str]:
    """Slide file name -> class label (empty when the table has no label column or there is no table)."""
    return load_slide_table(path).labels


def check_labels_cover(
    labels: dict[str, str], slide_files: list[str], source: str | Path | None, what: str = "label"
) -> None:
    """When labels (or patients) are given, every slide used must have one (fail closed)."""
    if not labels:
        return
    missing = sorted(set(slide_files) - set(labels))
    if missing:
        raise ConfigError(
            f"{source}: no {what} for {len(missing)} slide(s), e.g. {missing[0]!r}",
            hint="add a row for every slide in the slides folder, or remove the slide",
        )
