"""Shims of the pixcell-fed Flower app: they import the installed package and nothing else."""
