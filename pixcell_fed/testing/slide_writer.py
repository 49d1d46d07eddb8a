"""Slide writers for the tests: those of :mod:`pixcell_fed.simulation.slide_writer` (re-exported here)."""

from pixcell_fed.simulation.slide_writer import *  # noqa: F403
from pixcell_fed.simulation.slide_writer import __all__  # noqa: F401
