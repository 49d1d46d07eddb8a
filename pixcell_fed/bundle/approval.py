"""The privacy officer's decision on a bundle: approve (sign) or reject (record the refusal).

Both first check the bundle's integrity against its own site signature, so the officer signs exactly what the
site built and the audit covered. Decisions change only the mutable part of ``bundle.json`` (state, decision),
which keeps the site's signature valid. A rejected bundle can never be approved or verified afterwards.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from pixcell_fed.bundle import layout as L
from pixcell_fed.errors import BundleError, PrivacyGateRefused, UsageError, VerificationError

MAX_REASON = 2000


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _checked_info(bundle_dir: Path) -> dict:
    from pixcell_fed.bundle.verify import inspect_bundle

    try:
        inspect_bundle(bundle_dir, None)
    except VerificationError as exc:
        raise BundleError(f"bundle {bundle_dir} is damaged: {exc.message}",
                          hint="do not approve it; rebuild the bundle from the run") from exc
    return L.read_bundle_json(bundle_dir)


def bundle_overview(bundle_dir: str | Path) -> dict:
    """What the officer sees before deciding: site, run, state, verdict, tile counts, report paths."""
    bundle_dir = Path(bundle_dir)
    info = L.read_bundle_json(bundle_dir)
    reports = [bundle_dir / L.SUMMARY_HTML] if info["files"][L.SUMMARY_HTML] else []
    # the full on-site report (with real tiles) lives in the run folder, beside the bundle
    candidates = [bundle_dir.parent / "audit.html", *sorted(bundle_dir.parent.glob("audit*/audit.html"))]
    reports += [p for p in candidates if p.is_file()]
    return {"bundle": str(bundle_dir), "site": info["site"], "run_id": info["run_id"], "state": info["state"],
            "verdict": info["verdict"], "tiles": info["counts"]["tiles"], "labels": info["counts"]["labels"],
            "reports": [str(p) for p in reports]}


def approve_bundle(bundle_dir: str | Path, officer_key, *, trail: str | Path | None = None) -> dict:
    """Sign the bundle's statement with the officer's key (``signatures/officer.sig``); state becomes approved.

    Refuses a FAIL verdict or a rejected bundle (:class:`PrivacyGateRefused`), an already approved or damaged
    bundle (:class:`BundleError`), and an officer key equal to the site's signing key. Returns the overview.
    """
    from pixcell_fed.bundle.trail import append_event
    from pixcell_fed.keys import fingerprint, public_key_raw

    bundle_dir = Path(bundle_dir)
    with L.bundle_lock(bundle_dir):
        info = L.read_bundle_json(bundle_dir)
        if info["state"] == L.STATE_REJECTED:
            raise PrivacyGateRefused(f"bundle {bundle_dir} was rejected; it can never be approved",
                                     hint="run synthesize again to make a new bundle")
        if info["state"] == L.STATE_APPROVED:
            raise BundleError(f"bundle {bundle_dir} is already approved", hint="nothing to do")
        if info["verdict"] == "FAIL":
            raise PrivacyGateRefused(f"bundle {bundle_dir} has audit verdict FAIL; it cannot be approved",
                                     hint="reject it; nothing from this run may leave the site")
        info = _checked_info(bundle_dir)
        site_key, _ = L.read_signature(bundle_dir, L.SITE_SIG, role="site")
        if public_key_raw(site_key) == public_key_raw(officer_key.public_key()):
            raise UsageError("the officer key is the site's own signing key",
                             hint="the privacy officer approves with a key of their own ('site-agent officer-key')")
        info["state"] = L.STATE_APPROVED
        info["decision"] = {"state": L.STATE_APPROVED, "time": _now(), "officer": fingerprint(officer_key.public_key())}
        # signature first: if killed in between, the bundle still reads "awaiting approval" and approve can rerun
        L.write_signature(bundle_dir, L.OFFICER_SIG, officer_key, L.statement(info, role="officer"), role="officer")
        L.write_bundle_json(bundle_dir, info)
    if trail is not None:
        append_event(trail, "approve", run_id=info["run_id"], bundle=bundle_dir.name,
                     officer=fingerprint(officer_key.public_key()), verdict=info["verdict"],
                     tiles=info["counts"]["tiles"])
    return bundle_overview(bundle_dir)


def reject_bundle(bundle_dir: str | Path, reason: str, *, trail: str | Path | None = None) -> dict:
    """Record the officer's refusal: state becomes rejected, any approval signature is removed. Returns the overview."""
    from pixcell_fed.bundle.trail import append_event

    bundle_dir = Path(bundle_dir)
    reason = (reason or "").strip()
    if not reason:
        raise UsageError("a rejection needs a reason", hint="pass --reason 'what is wrong'")
    if len(reason) > MAX_REASON or "\n" in reason:
        raise UsageError("the reason must be one line of at most 2000 characters", hint="shorten the reason")
    with L.bundle_lock(bundle_dir):
        info = L.read_bundle_json(bundle_dir)  # a damaged bundle can still be rejected
        if info["state"] == L.STATE_REJECTED:
            raise BundleError(f"bundle {bundle_dir} is already rejected", hint="nothing to do")
        info["state"] = L.STATE_REJECTED
        info["decision"] = {"state": L.STATE_REJECTED, "time": _now(), "reason": reason}
        L.write_bundle_json(bundle_dir, info)
        officer_sig = bundle_dir / L.OFFICER_SIG
        if officer_sig.exists():
            officer_sig.unlink()
    if trail is not None:
        append_event(trail, "reject", run_id=info["run_id"], bundle=bundle_dir.name, reason=reason)
    return bundle_overview(bundle_dir)
