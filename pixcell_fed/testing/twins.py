"""Tiny untrained twins for the tests: those of :mod:`pixcell_fed.simulation.twins` (re-exported here)."""

from pixcell_fed.simulation.twins import *  # noqa: F403
from pixcell_fed.simulation.twins import __all__  # noqa: F401
