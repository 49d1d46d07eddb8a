"""Whole-slide images to 20x tiles: reading (OpenSlide), resolution (mpp), tissue, the tile grid and the tiler.

One module per job: ``reader`` (OpenSlide), ``mpp``, ``grid``, ``tissue``, ``records`` (TileRecord, SlidePlan,
SlideFailure), ``planning`` (plan a slide, read a tile), ``workers`` (the reader process pool), ``tiler`` (the
in-process tile stream), ``folder_job`` (``site-agent tiles``: PNGs, tiles.parquet, overviews), ``overview``.
Import the submodules you need; this package imports nothing heavy.
"""
