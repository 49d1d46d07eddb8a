"""Open a whole-slide image with OpenSlide and read regions as RGB composited on white.

Only what OpenSlide reads by region is accepted: an untiled TIFF (which ``openslide.open_slide`` would hand to
``ImageSlide``, decoding the whole image into memory) is refused with a clear :class:`SlideError`, as are files
that are not slides, unreadable files and damaged slides. After any ``OpenSlideError`` the handle is dead, so it
is closed before the error is raised.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pixcell_fed.errors import SlideError

CONVERT_HINT = (
    "convert it to a tiled pyramidal TIFF, e.g. 'vips tiffsave IN OUT.tif --tile --pyramid "
    "--compression jpeg', or remove it from the slides folder"
)
DAMAGED_HINT = "the file is damaged or incomplete: copy it again from the scanner or the archive"


def _tiff_summary(path: Path) -> dict | None:
    """What the first image directory of a TIFF says (tiled or not, size) and whether the file is cut short.

    Returns None when ``path`` is not a TIFF. Only the directory chain is read, never pixels.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
            if head[:2] not in (b"II", b"MM"):
                return None
            end = "<" if head[:2] == b"II" else ">"
            magic = struct.unpack(end + "H", head[2:4])[0]
            if magic == 42:
                offset, count_fmt, offset_fmt, entry = struct.unpack(end + "I", head[4:8])[0], "H", "I", 12
            elif magic == 43:
                offset, count_fmt, offset_fmt, entry = struct.unpack(end + "Q", head[8:16])[0], "Q", "Q", 20
            else:
                return None
            info: dict = {"tiled": None, "width": None, "height": None, "truncated": False, "images": 0}
            seen: set[int] = set()
            while offset and offset not in seen and len(seen) < 64:
                seen.add(offset)
                if offset + 2 > size:
                    info["truncated"] = True
                    break
                fh.seek(offset)
                count = struct.unpack(end + count_fmt, fh.read(struct.calcsize(count_fmt)))[0]
                table = fh.read(entry * count)
                nxt = fh.read(struct.calcsize(offset_fmt))
                if len(table) < entry * count or len(nxt) < struct.calcsize(offset_fmt):
                    info["truncated"] = True
                    break
                if info["images"] == 0:
                    tags: dict[int, int] = {}
                    for i in range(count):
                        raw = table[i * entry : (i + 1) * entry]
                        tag, typ = struct.unpack(end + "HH", raw[:4])
                        value = raw[4 + struct.calcsize(offset_fmt) :]
                        if typ == 3:
                            tags[tag] = struct.unpack(end + "H", value[:2])[0]
                        elif typ == 4:
                            tags[tag] = struct.unpack(end + "I", value[:4])[0]
                        elif typ == 16:
                            tags[tag] = struct.unpack(end + "Q", value[:8])[0]
                    info.update(tiled=322 in tags, width=tags.get(256), height=tags.get(257))
                info["images"] += 1
                offset = struct.unpack(end + offset_fmt, nxt)[0]
            return info
    except (OSError, struct.error):
        return {"tiled": None, "width": None, "height": None, "truncated": True, "images": 0}


def check_readable(path: Path) -> None:
    """Raise :class:`SlideError` unless ``path`` is a non-empty regular file this process can read."""
    name = path.name
    try:
        with open(path, "rb") as fh:
            first = fh.read(1)
    except FileNotFoundError as exc:
        raise SlideError(
            f"{name}: cannot read the file ({exc.strerror}{'; a broken link' if path.is_symlink() else ''})",
            hint="restore the file or the link's target, or remove it from the slides folder",
        ) from exc
    except IsADirectoryError as exc:
        raise SlideError(f"{name}: is a folder, not a slide file", hint="remove it from the slides folder") from exc
    except OSError as exc:
        raise SlideError(
            f"{name}: cannot read the file ({exc.strerror})",
            hint="give the user running site-agent read access to it, or remove it from the slides folder",
        ) from exc
    if not first:
        raise SlideError(f"{name}: the file is empty (0 bytes)", hint=DAMAGED_HINT)


class SlideReader:
    """One open OpenSlide handle. Not picklable: open one inside each worker process."""

    def __init__(self, path: str | Path) -> None:
        import openslide

        self.path = Path(path)
        self.name = self.path.name
        check_readable(self.path)
        vendor = openslide.OpenSlide.detect_format(str(self.path))
        if vendor is None:
            tiff = _tiff_summary(self.path)
            if tiff is not None:
                dims = f" {tiff['width']}x{tiff['height']} px" if tiff["width"] and tiff["height"] else ""
                if tiff["truncated"]:
                    raise SlideError(
                        f"{self.name}: a TIFF that ends before its image directories do (truncated: "
                        "an interrupted copy?)",
                        hint=DAMAGED_HINT,
                    )
                if tiff["tiled"] is False:
                    raise SlideError(
                        f"{self.name}: a single-level untiled{dims} TIFF; OpenSlide cannot read it by region and "
                        "decoding it whole would need all of it in memory",
                        hint=CONVERT_HINT,
                    )
                raise SlideError(
                    f"{self.name}: a TIFF{dims} that OpenSlide cannot read (damaged, a pyramid stored in SubIFDs, "
                    "or WebP/JPEG 2000 tiles in a generic TIFF)",
                    hint=CONVERT_HINT,
                )
            raise SlideError(
                f"{self.name}: not a whole-slide image OpenSlide can read (format not recognised)",
                hint="remove it from the slides folder, or convert it to a tiled pyramidal TIFF",
            )
        try:
            self._slide: openslide.OpenSlide | None = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:  # includes OpenSlideUnsupportedFormatError
            raise SlideError(
                f"{self.name}: OpenSlide recognised a {vendor} slide but cannot open it ({exc}); "
                "the file is probably truncated or corrupt",
                hint=DAMAGED_HINT,
            ) from exc
        self.vendor = vendor
        self.dimensions: tuple[int, int] = self._slide.dimensions
        self.level_dimensions: tuple[tuple[int, int], ...] = self._slide.level_dimensions
        self.level_downsamples: tuple[float, ...] = self._slide.level_downsamples
        self.properties: Mapping[str, str] = dict(self._slide.properties)

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """``read_region`` (level-0 ``location``, ``size`` at ``level``) as uint8 HxWx3 RGB composited on white."""
        import openslide

        if self._slide is None:
            raise SlideError(f"{self.name}: the slide was closed after an earlier read error", hint=DAMAGED_HINT)
        try:
            rgba = np.asarray(self._slide.read_region(location, level, size))
        except openslide.OpenSlideError as exc:
            self.close()  # after an OpenSlideError the handle is unusable
            raise SlideError(
                f"{self.name}: reading level {level} at ({location[0]}, {location[1]}) failed ({exc}); "
                "the file is probably truncated or corrupt",
                hint=DAMAGED_HINT,
            ) from exc
        return composite_on_white(rgba)

    def close(self) -> None:
        slide, self._slide = getattr(self, "_slide", None), None
        if slide is not None:
            slide.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self):  # handles do not survive pickling; fail loudly instead of in a worker
        raise TypeError("SlideReader cannot be pickled: open the slide inside each worker process")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (not premultiplied, as openslide-python returns it) over a white background, as RGB uint8."""
    import cv2

    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)  # 40x faster than numpy's strided copy of rgba[..., :3]
    a = alpha[..., None].astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


def open_slide(path: str | Path) -> SlideReader:
    """Open ``path`` for region reads, or raise :class:`SlideError` saying why not and what to do."""
    return SlideReader(path)


def is_candidate(path: Path) -> bool:
    """Files a slides folder scan considers: visible regular files (or links to them, checked when opened)."""
    return not path.name.startswith(".") and (path.is_symlink() or (path.is_file() and not path.is_dir()))


def list_slide_files(folder: Path) -> list[Path]:
    """The candidate slide files directly in ``folder``, sorted by name (folders such as MIRAX data are skipped)."""
    return sorted((p for p in folder.iterdir() if is_candidate(p)), key=lambda p: p.name)


__all__ = ["SlideReader", "check_readable", "composite_on_white", "list_slide_files", "open_slide"]
