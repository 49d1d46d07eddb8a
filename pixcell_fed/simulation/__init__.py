"""Simulated hospitals for the demo consortium, the benchmarks and the tests, built from real pixels.

``real_slide`` (the real Aperio slide CMU-1-Small-Region from a local cache, never fetched at run time),
``slide_writer`` (whole-slide images in scanner layouts from its H&E pixels, in any stain), ``twins`` (tiny untrained
models in the published folder layouts) and ``sites`` (a site folder made by ``site-agent init``'s own code, with
slides, labels and twins). Part of the product: the demo uses it; ``pixcell_fed.testing`` re-uses it.
"""
