"""Microns per pixel of a slide's level 0, resolved by one documented chain; never a silent guess.

Order (``/work/shared/reference/slides.md``, with the operator's override first - see :func:`resolve_mpp`):

1. ``tiling.mpp_overrides[<file name>]`` from the site config;
2. ``openslide.mpp-x`` / ``openslide.mpp-y``;
3. vendor keys: ``aperio.MPP``, ``openslide.mirax.MPP``, ``hamamatsu.XResolution``;
4. ``tiff.XResolution`` / ``tiff.YResolution`` with ``tiff.ResolutionUnit`` (centimeter: 1e4/x, inch: 25400/x,
   none: not a physical resolution, ignored);
5. objective power (``openslide.objective-power``, ``aperio.AppMag``): mpp = 10 / power, an estimate, logged;
6. otherwise :class:`~pixcell_fed.errors.MppUnavailableError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pixcell_fed.errors import MppUnavailableError
from pixcell_fed.runlog import get_logger

log = get_logger("slides.mpp")

#: Resolutions outside this range (um/px) are taken as broken metadata and skipped: 0.05 is beyond any optical
#: scanner, 20 is below 0.5x.
PLAUSIBLE_MPP = (0.05, 20.0)


@dataclass(frozen=True)
class MppResolution:
    """The level-0 resolution of a slide and where it came from."""

    mpp_x: float
    mpp_y: float
    source: str

    @property
    def mpp(self) -> float:
        """The mean of x and y (they agree on every scanner we know; a mismatch is logged)."""
        return (self.mpp_x + self.mpp_y) / 2.0


def _number(value: object) -> float | None:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def _pair(props: Mapping[str, str], key_x: str, key_y: str | None, convert) -> tuple[float, float] | None:
    x = _number(props.get(key_x))
    if x is None:
        return None
    y = _number(props.get(key_y)) if key_y else None
    mx = convert(x)
    my = convert(y) if y is not None else mx
    if _plausible(mx) and _plausible(my):
        return mx, my
    log.debug("ignoring implausible %s=%s", key_x, props.get(key_x))
    return None


def _hamamatsu(value: float) -> float | None:
    # Tools disagree on this key's unit: some read it as um/px, others as pixels per centimeter. The plausible
    # ranges do not overlap (um/px <= 20, pixels/cm >= 500), so take whichever reading is plausible.
    if _plausible(value):
        return value
    if value > 0 and _plausible(1e4 / value):
        return 1e4 / value
    return None


def resolve_mpp(
    properties: Mapping[str, str], *, slide_file: str, overrides: Mapping[str, float] | None = None
) -> MppResolution:
    """The level-0 mpp of the slide named ``slide_file`` (its file name) with these OpenSlide ``properties``.

    The override comes first although the reference chain lists it after objective power: an operator who wrote
    an override for a file knows better than its metadata, and the override is the only way to correct a scanner
    that writes a wrong resolution. When it disagrees with the metadata by more than 5 % that is logged.
    Raises :class:`MppUnavailableError` when nothing in the chain gives a plausible value.
    """
    props = properties
    found: MppResolution | None = None
    pair = _pair(props, "openslide.mpp-x", "openslide.mpp-y", lambda v: v)
    if pair:
        found = MppResolution(*pair, source="openslide.mpp-x/y")
    if found is None:
        for key in ("aperio.MPP", "openslide.mirax.MPP"):
            pair = _pair(props, key, None, lambda v: v)
            if pair:
                found = MppResolution(*pair, source=key)
                break
    if found is None:
        pair = _pair(props, "hamamatsu.XResolution", "hamamatsu.YResolution", _hamamatsu)
        if pair:
            found = MppResolution(*pair, source="hamamatsu.XResolution")
    if found is None:
        unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
        per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
        if per_unit is not None:
            pair = _pair(props, "tiff.XResolution", "tiff.YResolution", lambda v: per_unit / v if v > 0 else None)
            if pair:
                found = MppResolution(*pair, source=f"tiff.XResolution ({unit})")
    estimate: MppResolution | None = None
    if found is None:
        for key in ("openslide.objective-power", "aperio.AppMag"):
            power = _number(props.get(key))
            if power is not None and power > 0 and _plausible(10.0 / power):
                estimate = MppResolution(10.0 / power, 10.0 / power, source=f"{key} (10 / {power:g}x, estimated)")
                break

    override = (overrides or {}).get(slide_file)
    if override is not None:
        metadata = found or estimate
        if metadata is not None and abs(metadata.mpp - override) > 0.05 * override:
            log.warning(
                "%s: mpp override %.4f differs from the slide's %s (%.4f); using the override",
                slide_file,
                override,
                metadata.source,
                metadata.mpp,
            )
        return MppResolution(float(override), float(override), source="config tiling.mpp_overrides")
    if found is not None:
        if abs(found.mpp_x - found.mpp_y) > 0.01 * found.mpp_x:
            log.warning(
                "%s: non-square pixels (mpp x %.4f, y %.4f); using their mean", slide_file, found.mpp_x, found.mpp_y
            )
        return found
    if estimate is not None:
        log.warning(
            "%s: no mpp in the metadata; estimated %.4f um/px from the objective power (%s)",
            slide_file,
            estimate.mpp,
            estimate.source,
        )
        return estimate
    raise MppUnavailableError(
        f"{slide_file}: no resolution (microns per pixel) in the file's metadata",
        hint=f"add the scanner's resolution for this file to the config, e.g. 'tiling: mpp_overrides: "
        f"{{{slide_file}: 0.25}}' for a 40x scan (0.5 for 20x)",
    )
