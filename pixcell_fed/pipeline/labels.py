"""Slide labels: a site may map its slides to class labels; synthetic tiles inherit their source slide's label."""

from __future__ import annotations

import csv
from pathlib import Path

from pixcell_fed.bundle.manifest import LABEL_RE
from pixcell_fed.errors import ConfigError

LABEL_COLUMNS = ("slide", "label")


def load_slide_labels(path: str | Path | None) -> dict[str, str]:
    """Read ``slide,label`` rows (slide = file name in the slides folder). None gives no labels."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}", hint="fix site.labels_csv, or set it to null")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or [c.strip() for c in reader.fieldnames[:2]] != list(LABEL_COLUMNS):
            raise ConfigError(f"{path}: the header must be 'slide,label' (got {reader.fieldnames})",
                              hint="write one row per slide: file name, class label")
        labels: dict[str, str] = {}
        for line_no, row in enumerate(reader, start=2):
            slide, label = (row.get("slide") or "").strip(), (row.get("label") or "").strip()
            if not slide or not label:
                raise ConfigError(f"{path}:{line_no}: empty slide or label", hint="every row needs both values")
            if not LABEL_RE.match(label):
                raise ConfigError(f"{path}:{line_no}: class label {label!r} is not a short plain name",
                                  hint="labels are 1-64 letters, digits, spaces, '_', '.', '+' or '-' (they are shipped)")
            if slide in labels and labels[slide] != label:
                raise ConfigError(f"{path}:{line_no}: slide {slide!r} has two labels",
                                  hint="give each slide exactly one label")
            labels[slide] = label
    return labels


def check_labels_cover(labels: dict[str, str], slide_files: list[str], source: str | Path | None) -> None:
    """When labels are given, every slide used must have one (fail closed: no unlabelled tiles in a labelled set)."""
    if not labels:
        return
    missing = sorted(set(slide_files) - set(labels))
    if missing:
        raise ConfigError(f"{source}: no label for {len(missing)} slide(s), e.g. {missing[0]!r}",
                          hint="add a row for every slide in the slides folder, or remove the slide")
