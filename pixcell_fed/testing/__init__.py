"""Test and demo material built from real pixels: the real CMU Aperio slide, slide writers, tiny model twins.

Used by the tests, the benchmarks and the demo consortium; never by a real deployment's data path.
"""
