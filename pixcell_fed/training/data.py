"""Tile data sets: the pooled synthetic set (``pool.parquet``) and a site's labelled folder of real tiles.

A labelled folder has one sub-folder per class (``eval_dir/<label>/*.png``), the layout torchvision's
ImageFolder reads. Images are resized to the model's input size and normalised with the spec's mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pixcell_fed.errors import UsageError

if TYPE_CHECKING:
    from pixcell_fed.training.models import ModelSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def labelled_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """``(path, label)`` for every image in ``folder/<label>/``, sorted for determinism."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(
            f"labelled tile folder not found: {folder}",
            hint="point eval-dir/train-dir to a folder with one sub-folder of tiles per class",
        )
    items = [
        (p, sub.name)
        for sub in sorted(folder.iterdir())
        if sub.is_dir()
        for p in sorted(sub.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise UsageError(f"no labelled tiles in {folder}", hint="expected <folder>/<label>/<tile>.png")
    return items


def pooled_items(pool_dir: str | Path) -> list[tuple[Path, str | None]]:
    """``(path, label)`` of every pooled tile listed in ``pool_dir/pool.parquet``."""
    import pandas as pd

    pool_dir = Path(pool_dir)
    table = pool_dir / "pool.parquet"
    if not table.is_file():
        raise UsageError(
            f"no pooled set at {pool_dir} (pool.parquet missing)", hint="run the pooling first ('coordinator run')"
        )
    frame = pd.read_parquet(table)
    return [
        (pool_dir / p, None if (lab is None or lab != lab) else str(lab))
        for p, lab in zip(frame["path"], frame["label"])
    ]


def load_image(path: Path, img_size: int):
    """An RGB image resized to ``img_size`` as a uint8 HxWx3 numpy array.

    An image larger than the largest tile a bundle may carry is refused from its header, before decoding: a
    decompression bomb never reaches memory.
    """
    import numpy as np
    from PIL import Image

    from pixcell_fed.bundle.png import MAX_TILE_SIZE, check_image_side

    check_image_side(path, MAX_TILE_SIZE)
    with Image.open(path) as src:
        im = src.convert("RGB")
        if im.size != (img_size, img_size):
            im = im.resize((img_size, img_size), Image.Resampling.BILINEAR)
        return np.array(im, dtype=np.uint8)


def to_tensor(images, spec: ModelSpec):
    """uint8 NHWC numpy -> normalised float NCHW tensor."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


class TileDataset:
    """A map-style data set of (normalised image tensor, class index) read lazily from disk."""

    def __init__(self, items: Sequence[tuple[Path, str | None]], classes: Sequence[str], spec: ModelSpec) -> None:
        self.items = list(items)
        self.index = {c: i for i, c in enumerate(classes)}
        self.spec = spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import torch

        path, label = self.items[i]
        x = to_tensor(load_image(path, self.spec.img_size)[None], self.spec)[0]
        y = self.index.get(label, -1) if label is not None else -1
        return x, torch.tensor(y, dtype=torch.long)


def load_arrays(items: Sequence[tuple[Path, str | None]], spec: ModelSpec):
    """All images of ``items`` as one normalised tensor (small sets only: evaluation, tests)."""
    import numpy as np

    images = np.stack([load_image(p, spec.img_size) for p, _ in items]) if items else np.zeros((0, 1, 1, 3), np.uint8)
    return to_tensor(images, spec)
