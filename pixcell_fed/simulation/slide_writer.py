"""Write realistic whole-slide images for the demo, benchmarks and tests, from real H&E pixels.

The pixels are the real Aperio slide CMU-1-Small-Region (see :mod:`pixcell_fed.simulation.real_slide`; by default
the cached copy, or any ``source`` file of it), rescaled to the slide's resolution and laid onto off-white glass.
The writers follow the layouts OpenSlide recognises (``/work/shared/reference/slides.md``):

* :func:`write_aperio_like` - an Aperio-style SVS: tiled level 0 with an ``Aperio`` ImageDescription carrying
  ``AppMag`` and ``MPP``, an untiled thumbnail, tiled reduced levels, a label and a macro image. Callers can put
  marker strings into the description and onto the label/macro (privacy tests check they never leave the site).
* :func:`write_generic_tiff` - a generic tiled pyramidal TIFF with or without resolution tags.
* :func:`write_untiled_tiff` - a single-level, untiled (strip) TIFF that OpenSlide cannot read by region.
* :func:`write_blank_slide` - glass only, no tissue.

:func:`he_canvas` makes level 0 (``stain=`` applies an H&E colour perturbation, :func:`perturb_stain`, so that a demo
can make sites that differ; ``full=`` covers the whole glass); :class:`Pyramid` and :class:`Identifiers` say how the
file stores it and which identifiers it carries.
Needs ``tifffile`` and ``imagecodecs``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "GLASS_RGB",
    "Identifiers",
    "Pyramid",
    "StainVariation",
    "he_canvas",
    "perturb_stain",
    "write_aperio_like",
    "write_blank_slide",
    "write_corrupted",
    "write_generic_tiff",
    "write_not_a_slide",
    "write_truncated",
    "write_untiled_tiff",
]

Compression = Literal["jpeg", "zlib", "none"]
GLASS_RGB = (235, 233, 237)  # slightly pinkish off-white, like an empty area of a scanned glass slide


@dataclass(frozen=True)
class StainVariation:
    """Multiplicative factors on the haematoxylin, eosin and DAB optical densities, and an additive OD bias."""

    hematoxylin: float = 1.0
    eosin: float = 1.0
    dab: float = 1.0
    bias: float = 0.0


# Ruifrok & Johnston's H&E-DAB stain vectors (rows: H, E, DAB) in optical-density space.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def perturb_stain(rgb: np.ndarray, stain: StainVariation) -> np.ndarray:
    """Scale the H, E and DAB optical densities of ``rgb`` (uint8 HxWx3): a stain/scanner colour variation."""
    od = -np.log10(np.maximum(rgb.astype(np.float32) + 1.0, 1.0) / 256.0)
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB.astype(np.float32)
    hed *= np.array([stain.hematoxylin, stain.eosin, stain.dab], dtype=np.float32)
    hed += np.float32(stain.bias) * (hed > 0.02)
    out = 256.0 * np.power(10.0, -(hed @ _RGB_FROM_HED.astype(np.float32))) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(rgb.shape)


@functools.lru_cache(maxsize=2)
def _real_he(source: str | None = None) -> tuple[np.ndarray, float]:
    """Level 0 of the real CMU slide (``source``, or the cached copy) as RGB, and its mpp."""
    import openslide

    from pixcell_fed.simulation.real_slide import cached_real_slide, check_real_slide

    path = check_real_slide(source) if source is not None else cached_real_slide()
    with openslide.OpenSlide(str(path)) as slide:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
        mpp = float(slide.properties["openslide.mpp-x"])
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    rgb = np.rint(rgb).astype(np.uint8)
    rgb.setflags(write=False)
    return rgb, mpp


@functools.lru_cache(maxsize=4)
def _real_he_at(mpp: float, source: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The real slide rescaled to ``mpp``, and its tissue (non-white) mask."""
    import cv2

    he, he_mpp = _real_he(source)
    scale = he_mpp / mpp
    he = cv2.resize(
        np.ascontiguousarray(he),
        (round(he.shape[1] * scale), round(he.shape[0] * scale)),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
    )
    foreground = cv2.bitwise_or(
        cv2.bitwise_or(cv2.inRange(he, (0, 0, 0), (215, 255, 255)), cv2.inRange(he, (0, 0, 0), (255, 215, 255))),
        cv2.inRange(he, (0, 0, 0), (255, 255, 215)),
    )
    he.setflags(write=False)
    foreground.setflags(write=False)
    return he, foreground


def _densest_window(foreground: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """Top-left corner of the ``height`` x ``width`` window with the most tissue (searched on a coarse grid)."""
    import cv2

    integral = cv2.integral((foreground > 0).astype(np.uint8))
    best, corner = -1, (0, 0)
    ys = np.linspace(0, foreground.shape[0] - height, 9).astype(int)
    xs = np.linspace(0, foreground.shape[1] - width, 9).astype(int)
    for y in ys:
        for x in xs:
            total = integral[y + height, x + width] - integral[y, x + width] - integral[y + height, x] + integral[y, x]
            if total > best:
                best, corner = total, (int(y), int(x))
    return corner


def he_canvas(
    size: tuple[int, int],
    mpp: float,
    *,
    seed: int = 0,
    tissue: bool = True,
    stain: StainVariation | None = None,
    source: str | Path | None = None,
    full: bool = False,
) -> np.ndarray:
    """Level-0 pixels (uint8 HxWx3) of a ``size=(width, height)`` slide at ``mpp``: real H&E on off-white glass.

    The real slide is rescaled to ``mpp`` and placed (flipped by ``seed``) in a band in the middle of the glass,
    so that tissue detection has both tissue and empty glass to separate. ``full=True`` instead covers the
    whole glass with mirrored copies of the real slide (many tissue tiles, for benchmarks). ``source``: the real
    slide's file (default: the cached copy).
    """
    import cv2

    width, height = size
    rng = np.random.default_rng(seed)
    # Glass: the background colour with faint noise in 8x8 blocks (made small, then enlarged: fast).
    small = np.empty((height // 8 + 1, width // 8 + 1, 3), dtype=np.int16)
    small[...] = GLASS_RGB
    small += rng.integers(-2, 3, size=small.shape[:2] + (1,), dtype=np.int16)
    canvas = cv2.resize(
        np.clip(small, 0, 255).astype(np.uint8),
        (small.shape[1] * 8, small.shape[0] * 8),
        interpolation=cv2.INTER_NEAREST,
    )[:height, :width].copy()
    if not tissue:
        return canvas
    he, foreground = _real_he_at(mpp, None if source is None else str(source))
    if seed % 2:
        he, foreground = he[:, ::-1], foreground[:, ::-1]
    if (seed // 2) % 2:
        he, foreground = he[::-1], foreground[::-1]
    if full:  # mirrored copies side by side, copied block by block (no full-size temporaries)
        bh, bw = he.shape[:2]
        for i, y in enumerate(range(0, height, bh)):
            for j, x in enumerate(range(0, width, bw)):
                h, w = min(bh, height - y), min(bw, width - x)
                block, mask = he, foreground
                if (i + j) % 2:
                    block, mask = block[:, ::-1], mask[:, ::-1]
                if i % 2:
                    block, mask = block[::-1], mask[::-1]
                block = np.ascontiguousarray(block[:h, :w])
                if stain is not None:
                    block = perturb_stain(block, stain)
                cv2.copyTo(block, np.ascontiguousarray(mask[:h, :w]), canvas[y : y + h, x : x + w])
        return canvas
    # Place the tissue in the middle 70 % of the glass, cropped to fit; the real slide's own white background
    # is replaced by glass so that the whole image has one background colour.
    box_w, box_h = max(1, int(width * 0.7)), max(1, int(height * 0.7))
    ch, cw = min(box_h, he.shape[0]), min(box_w, he.shape[1])
    cy, cx = _densest_window(foreground, ch, cw)
    crop = np.ascontiguousarray(he[cy : cy + ch, cx : cx + cw])
    mask = np.ascontiguousarray(foreground[cy : cy + ch, cx : cx + cw])
    if stain is not None:
        crop = perturb_stain(crop, stain)
    y0 = (height - crop.shape[0]) // 2
    x0 = (width - crop.shape[1]) // 2
    region = canvas[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
    cv2.copyTo(crop, mask, region)
    return canvas


def _label_image(text: str, size: tuple[int, int] = (400, 400)) -> np.ndarray:
    import cv2

    width, height = size
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, line in enumerate(text.splitlines() or [""]):
        cv2.putText(img, line, (12, 60 + 50 * i), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 2, cv2.LINE_AA)
    rng = np.random.default_rng(len(text))
    bars = rng.integers(0, 2, size=48).astype(bool)  # a fake barcode, as on real labels
    for j, bar in enumerate(bars):
        if bar:
            img[height - 120 : height - 20, 20 + 7 * j : 26 + 7 * j] = 0
    return img


def _pyramid(level0: np.ndarray, downsamples: Sequence[int]) -> list[np.ndarray]:
    """Reduced levels, each made from the previous one when the factors divide (fast, and the same pixels)."""
    import cv2

    levels: list[np.ndarray] = []
    prev, prev_d = level0, 1
    for d in downsamples:
        w, h = level0.shape[1] // d, level0.shape[0] // d
        src = prev if d % prev_d == 0 else level0
        levels.append(cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA))
        prev, prev_d = levels[-1], d
    return levels


@dataclass(frozen=True)
class Pyramid:
    """How a slide file stores its pixels: the reduced levels' downsample factors and the tile compression."""

    downsamples: Sequence[int] = (4, 16)
    compression: Compression = "jpeg"
    quality: int = 85


@dataclass(frozen=True)
class Identifiers:
    """Where real slides carry patient identifiers: ``description_fields`` are added to the ImageDescription as
    ``|Key = Value`` (as Aperio writes ``Filename``, ``User``, ``Date``); ``label_text`` and ``macro_text`` are drawn
    on the label and macro images (privacy tests check they never leave the site)."""

    description_fields: Mapping[str, str] | None = None
    label_text: str = "S-00-0000"
    macro_text: str | None = None


def _tiff_kwargs(compression: Compression, quality: int) -> dict:
    if compression == "jpeg":
        return {"compression": "jpeg", "compressionargs": {"level": quality}, "photometric": "rgb"}
    if compression == "zlib":
        return {"compression": "zlib", "photometric": "rgb"}
    return {"compression": None, "photometric": "rgb"}


def write_aperio_like(
    path: str | Path,
    *,
    size: tuple[int, int] = (8192, 6144),
    mpp: float = 0.25,
    app_mag: int = 40,
    pixels: np.ndarray | None = None,
    pyramid: Pyramid = Pyramid(),
    identifiers: Identifiers = Identifiers(),
    include_mpp: bool = True,
) -> Path:
    """Write an Aperio-like SVS: 40x (0.25 um/px) by default, with thumbnail, reduced levels, label and macro.

    ``pixels``: level 0 (uint8 HxWx3; default ``he_canvas(size, mpp)``: make it with :func:`he_canvas` for another
    seed, stain or full glass). ``include_mpp=False`` leaves ``MPP`` out (objective power only).
    """
    import cv2
    import tifffile

    path = Path(path)
    level0 = pixels if pixels is not None else he_canvas(size, mpp)
    height, width = level0.shape[:2]
    compression, quality = pyramid.compression, pyramid.quality
    fields = {"AppMag": str(app_mag)}
    if include_mpp:
        fields["MPP"] = f"{mpp:.4f}"
    fields.update(identifiers.description_fields or {})
    head = f"Aperio Image Library v12.0.0 \r\n{width}x{height} (256x256) {compression.upper()}/RGB Q={quality}"
    description = head + "".join(f"|{k} = {v}" for k, v in fields.items())
    kw = _tiff_kwargs(compression, quality)
    reduced = _pyramid(level0, pyramid.downsamples)
    smallest = reduced[-1] if reduced else level0
    thumb_w = min(smallest.shape[1], 768)
    thumbnail = cv2.resize(smallest, (thumb_w, max(1, round(thumb_w * height / width))), interpolation=cv2.INTER_AREA)
    label = _label_image(identifiers.label_text)
    macro_w = 1280
    macro_h = max(1, round(macro_w * height / width / 2.5))
    macro = np.full((macro_h, macro_w, 3), 250, dtype=np.uint8)

    small = cv2.resize(smallest, (macro_w - macro_h - 20, macro_h - 20), interpolation=cv2.INTER_AREA)
    macro[10 : 10 + small.shape[0], macro_h + 10 : macro_h + 10 + small.shape[1]] = small
    macro_text = identifiers.macro_text if identifiers.macro_text is not None else identifiers.label_text
    macro[:, :macro_h] = cv2.resize(_label_image(macro_text), (macro_h, macro_h), interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(level0, tile=(256, 256), description=description, metadata=None, **kw)
        tif.write(
            thumbnail,
            description=f"Aperio Image Library v12.0.0 \r\n{width}x{height} -> "
            f"{thumbnail.shape[1]}x{thumbnail.shape[0]}",
            metadata=None,
            **_tiff_kwargs("jpeg" if compression == "jpeg" else "none", quality),
        )
        for lvl in reduced:
            tif.write(lvl, tile=(256, 256), description=description, metadata=None, subfiletype=1, **kw)
        tif.write(
            label,
            description=f"Aperio Image Library v12.0.0\r\nlabel {label.shape[1]}x{label.shape[0]}",
            metadata=None,
            subfiletype=1,
            compression=None,
            photometric="rgb",
        )
        tif.write(
            macro,
            description=f"Aperio Image Library v12.0.0\r\nmacro {macro.shape[1]}x{macro.shape[0]}",
            metadata=None,
            subfiletype=9,
            compression=None,
            photometric="rgb",
        )
    return path


def write_generic_tiff(
    path: str | Path,
    *,
    size: tuple[int, int] = (4096, 3072),
    mpp: float | None = 0.5,
    resolution_unit: Literal["CENTIMETER", "INCH", "NONE"] = "CENTIMETER",
    pyramid: Pyramid = Pyramid(downsamples=(2, 4, 8)),
    pixels: np.ndarray | None = None,
) -> Path:
    """Write a generic tiled pyramidal TIFF; ``mpp=None`` writes no resolution tags (OpenSlide reports no mpp).

    ``resolution_unit`` chooses how the resolution is stored (pixels per centimeter or per inch; ``NONE`` stores
    a unitless ratio that must not be taken as a resolution). ``pixels``: level 0 (default ``he_canvas(size, mpp)``).
    """
    import tifffile

    path = Path(path)
    level0 = pixels if pixels is not None else he_canvas(size, mpp or 0.5)
    kw = _tiff_kwargs(pyramid.compression, pyramid.quality)

    def resolution(d: int) -> dict:
        if mpp is None:
            return {}
        per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0, "NONE": 1e4}[resolution_unit]
        res = per_unit / (mpp * d)
        return {"resolution": (res, res), "resolutionunit": resolution_unit}

    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(level0, tile=(256, 256), metadata=None, **resolution(1), **kw)
        for d, lvl in zip(pyramid.downsamples, _pyramid(level0, pyramid.downsamples)):
            tif.write(lvl, tile=(256, 256), metadata=None, subfiletype=1, **resolution(d), **kw)
    return path


def write_blank_slide(path: str | Path, *, size: tuple[int, int] = (2048, 1536), mpp: float = 0.5) -> Path:
    """A generic tiled TIFF of empty glass: a valid slide with no tissue."""
    return write_generic_tiff(
        path, mpp=mpp, pyramid=Pyramid(downsamples=(4,)), pixels=he_canvas(size, mpp, tissue=False)
    )


def write_untiled_tiff(path: str | Path, *, size: tuple[int, int] = (12000, 9000), mpp: float | None = 0.5) -> Path:
    """A single-level TIFF stored in strips (not tiles): OpenSlide would only open it by decoding it whole.

    The pixels are glass with a coarse pattern, written strip by strip so that writing needs little memory.
    """
    import tifffile

    path = Path(path)
    width, height = size
    rows_per_strip = 256

    def strips():  # already-compressed strips, so that the whole image is never in memory
        import zlib

        for y in range(0, height, rows_per_strip):
            block = np.empty((min(rows_per_strip, height - y), width, 3), dtype=np.uint8)
            block[...] = GLASS_RGB
            block[:, : width // 3] = (200, 120, 170)  # a pink band, so it is not empty
            yield zlib.compress(block.tobytes(), 1)

    extra: dict[str, Any] = (
        {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    )
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(
            strips(),
            shape=(height, width, 3),
            dtype=np.uint8,
            rowsperstrip=rows_per_strip,
            photometric="rgb",
            compression="zlib",
            metadata=None,
            **extra,
        )
    return path


def write_not_a_slide(path: str | Path) -> Path:
    """A text file with a slide's extension."""
    path = Path(path)
    path.write_text("this is a scanner log, not an image\n")
    return path


def write_truncated(source: str | Path, path: str | Path, *, keep: float = 0.5) -> Path:
    """A copy of ``source`` cut to ``keep`` of its bytes, like an interrupted transfer."""
    data = Path(source).read_bytes()
    path = Path(path)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_corrupted(source: str | Path, path: str | Path, *, tiles: int = 40) -> Path:
    """A copy of a tiled TIFF slide whose level-0 tiles in the middle end early (their JPEG data cut short).

    OpenSlide opens it; reading those tiles raises ``OpenSlideError`` ("Premature end of JPEG file"), as a
    slide damaged in transfer or storage does.
    """
    import tifffile

    with tifffile.TiffFile(source) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    data = bytearray(Path(source).read_bytes())
    start = len(offsets) // 2
    for i in range(start, min(len(offsets), start + tiles)):
        cut = offsets[i] + counts[i] // 3
        data[cut : offsets[i] + counts[i]] = b"\xff" * (offsets[i] + counts[i] - cut)
    path = Path(path)
    path.write_bytes(bytes(data))
    return path
