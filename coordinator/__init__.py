"""The coordinator: the consortium lead's CLI and Flower server app. Thin wiring over :mod:`pixcell_fed`."""
