"""The memorisation and privacy audit: data roles, copy detection, statistics, gate and reports.

Heavy libraries (torch, cv2) are imported inside the modules that need them; importing this package is cheap.
The entry point is :func:`pixcell_fed.audit.run.run_audit`.
"""

from __future__ import annotations

from pixcell_fed.lazy import lazy_exports

_LAZY = {
    "run_audit": "pixcell_fed.audit.run",
    "AuditResult": "pixcell_fed.audit.run",
    "SiteFacts": "pixcell_fed.audit.run",
    "split_slides": "pixcell_fed.audit.roles",
    "scan_for_identifiers": "pixcell_fed.audit.identifiers",
}
__getattr__ = lazy_exports(__name__, _LAZY)
__all__ = list(_LAZY)
