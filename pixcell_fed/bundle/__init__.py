"""Signed bundles of synthetic tiles: build, approve or reject, verify; the site audit trail.

Heavy modules (pandas, pyarrow, PIL, cryptography) are imported lazily by the functions that need them.
"""

from __future__ import annotations

from pixcell_fed.lazy import lazy_exports

_LAZY = {
    "BundleInfo": "pixcell_fed.bundle.build",
    "build_bundle": "pixcell_fed.bundle.build",
    "approve_bundle": "pixcell_fed.bundle.approval",
    "reject_bundle": "pixcell_fed.bundle.approval",
    "bundle_overview": "pixcell_fed.bundle.approval",
    "SiteAuthority": "pixcell_fed.bundle.approval",
    "VerifiedBundle": "pixcell_fed.bundle.verify",
    "check_signed_files": "pixcell_fed.bundle.verify",
    "check_approval": "pixcell_fed.bundle.verify",
    "check_tile": "pixcell_fed.bundle.verify",
    "check_tiles": "pixcell_fed.bundle.verify",
    "verify_before_transfer": "pixcell_fed.bundle.verify",
    "verify_bundle": "pixcell_fed.bundle.verify",
    "ConditioningRequirement": "pixcell_fed.bundle.conditioning_policy",
    "conditioning_refusal": "pixcell_fed.bundle.conditioning_policy",
    "TrustStore": "pixcell_fed.bundle.trust",
    "load_trust": "pixcell_fed.bundle.trust",
    "append_event": "pixcell_fed.bundle.trail",
    "verify_trail": "pixcell_fed.bundle.trail",
    "site_status": "pixcell_fed.bundle.state",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = list(_LAZY)
