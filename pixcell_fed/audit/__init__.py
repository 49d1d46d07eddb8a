"""The memorisation and privacy audit: data roles, copy detection, statistics, gate and reports.

Heavy libraries (torch, cv2) are imported inside the modules that need them; importing this package is cheap.
The entry point is :func:`pixcell_fed.audit.run.run_audit`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_audit", "AuditResult", "split_slides", "scan_for_identifiers"]


def __getattr__(name: str) -> Any:  # lazy re-exports, so that `import pixcell_fed.audit` stays light
    if name in ("run_audit", "AuditResult"):
        from pixcell_fed.audit import run

        return getattr(run, name)
    if name == "split_slides":
        from pixcell_fed.audit.roles import split_slides

        return split_slides
    if name == "scan_for_identifiers":
        from pixcell_fed.audit.identifiers import scan_for_identifiers

        return scan_for_identifiers
    raise AttributeError(name)
