"""Real tiles by class label, as ``<folder>/<label>/<tile>.png``: the layout of a site's evaluation folder (the run's
held-out tiles) and of the labelled training folders that local fine-tunes read."""

from __future__ import annotations

from pathlib import Path


def link_tiles_by_label(tiles_dir: Path, tile_files, slide_files, labels: dict[str, str], folder: Path) -> Path:
    """Real tiles of labelled slides as ``folder/<label>/<tile>.png`` (hard links, copies where linking fails; tiles
    already there are kept): the layout a site's evaluation and training folders use."""
    import os
    import shutil

    for tile_file, slide_file in zip(tile_files, slide_files):
        source = Path(tiles_dir) / tile_file
        target = Path(folder) / labels[slide_file] / source.name
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return Path(folder)
