"""The site agent: the hospital-side CLI and Flower client app. Thin wiring over :mod:`pixcell_fed`."""
