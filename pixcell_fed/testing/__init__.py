"""Test material built from real pixels: the real CMU Aperio slide (fetched into the cache when missing), and the
slide writers, tiny model twins and simulated sites of :mod:`pixcell_fed.simulation` (re-exported here).

Used by the tests and the benchmarks; never by the demo or a real deployment's data path.
"""
