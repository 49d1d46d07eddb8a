"""Simulated sites for the tests: those of :mod:`pixcell_fed.simulation.sites` (re-exported here)."""

from pixcell_fed.simulation.sites import *  # noqa: F403
from pixcell_fed.simulation.sites import __all__  # noqa: F401
