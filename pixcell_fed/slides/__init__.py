"""Whole-slide images to 20x tiles: reading (OpenSlide), resolution (mpp), tissue, the tile grid and the tiler.

Import the submodules you need (``pixcell_fed.slides.tiler`` etc.); this package imports nothing heavy.
"""
