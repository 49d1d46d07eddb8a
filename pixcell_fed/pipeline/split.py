"""The T/H split of a site's slides: which condition synthesis (T) and which are held out (H) as the audit's null
and the site's evaluation set.

H must be new tissue to the generator and new patients to T: a patient's slides resemble each other, so a
patient with slides on both sides makes H look like T and hides leaks. The split therefore holds out whole
patients (``split.unit: patient``, from the slide table's patient column); splitting by slide must be chosen
explicitly (``split.unit: slide``), and the audit report then warns on its first page. With class labels the split
is stratified: each class with at least two patients (slides) is split on its own, so H covers the classes.
"""

from __future__ import annotations

from collections.abc import Mapping

from pixcell_fed.audit.roles import split_slides
from pixcell_fed.config.schema import SplitConfig
from pixcell_fed.errors import ConfigError
from pixcell_fed.pipeline.labels import SlideTable


def check_split_unit(split: SplitConfig, table: SlideTable, source: object) -> None:
    """Refuse a patient split without patients, before any work (fail closed)."""
    if split.unit == "patient" and not table.patients:
        raise ConfigError(
            f"split.unit is 'patient' but the slide table ({source or 'site.labels_csv is not set'}) has no patient "
            "column: the audit's held-out slides must come from patients who gave no conditioning slide",
            hint="add a 'patient' (or 'case') column to site.labels_csv, or set split.unit: slide to accept that one "
            "patient's slides may sit on both sides (the audit report will say so)",
        )


def split_by_unit(slide_of: Mapping[str, str], table: SlideTable, split: SplitConfig) -> tuple[list[str], list[str]]:
    """(conditioning slide keys, held-out slide keys); ``slide_of`` maps slide keys to slide file names."""
    group_of = {key: (table.patients[name] if split.unit == "patient" else key) for key, name in slide_of.items()}
    strata: dict[str, set[str]] = {}
    for key, group in group_of.items():
        strata.setdefault(table.labels.get(slide_of[key], ""), set()).add(group)
    if (
        table.labels
        and all(len(groups) >= 2 for groups in strata.values())
        and _one_label_per_group(group_of, slide_of, table)
    ):
        t_groups, h_groups = [], []
        for groups in strata.values():
            t, h = split_slides(sorted(groups), split.holdout_fraction, split.seed, unit=split.unit)
            t_groups += t
            h_groups += h
    else:
        t_groups, h_groups = split_slides(
            sorted(set(group_of.values())), split.holdout_fraction, split.seed, unit=split.unit
        )
    held = set(h_groups)
    return (
        sorted(k for k, g in group_of.items() if g not in held),
        sorted(k for k, g in group_of.items() if g in held),
    )


def _one_label_per_group(group_of: Mapping[str, str], slide_of: Mapping[str, str], table: SlideTable) -> bool:
    """Stratifying by class needs every patient's slides to share one class."""
    seen: dict[str, str] = {}
    for key, group in group_of.items():
        if seen.setdefault(group, table.labels.get(slide_of[key], "")) != table.labels.get(slide_of[key], ""):
            return False
    return True
