"""Formal privacy of what a site releases: the Gaussian mechanism's exact guarantee and differentially private
conditioning of synthesis (``synthesis.conditioning``; docs/privacy.md).

Pure modules (numpy and scipy only); importing this package is cheap.
"""
