"""The one approve gate: a privacy officer listed in the site's own config approves (signs) or rejects a bundle.

Everything is checked before the officer is asked anything: the key is one of the officers the site lists in
``site.yaml`` (``keys.officers``), the bundle is undecided, belongs to this site, is still its run's (the run's
recorded verdict is not FAIL, the bundle carries exactly the run's audit and exactly its kept tiles, hash for
hash) and is intact (every file against the site's own signature, every tile canonical, the summary page
inert). Decisions change only the mutable part of ``bundle.json`` (state, decision), which keeps the site's
signature valid, and are appended to the site's audit trail with the officer's key fingerprint. A rejected
bundle can never be approved or verified afterwards. The CLI only parses, prints and asks; all of this is here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcell_fed.bundle import layout as L
from pixcell_fed.errors import BundleError, ConfigError, PrivacyGateRefused, UsageError, VerificationError

MAX_REASON = 2000
Confirm = Callable[[dict], bool]


@dataclass(frozen=True)
class SiteAuthority:
    """What the site's own config says about decisions: its name, its work folder (runs, trail), its officers."""

    name: str
    work_dir: Path
    officers: tuple[Any, ...]  # Ed25519 public keys (keys.officers)

    @classmethod
    def from_config(cls, cfg) -> SiteAuthority:
        """From a loaded :class:`~pixcell_fed.config.SiteConfig` (``keys.officers`` was validated on loading)."""
        from pixcell_fed.keys import parse_public_key

        officers = tuple(parse_public_key(k, source=f"keys.officers[{i}]") for i, k in enumerate(cfg.keys.officers))
        return cls(name=cfg.site.name, work_dir=Path(cfg.site.work_dir), officers=officers)

    @property
    def trail(self) -> Path:
        from pixcell_fed.bundle.state import trail_path

        return trail_path(self.work_dir)

    def run_dir(self, run_id: str) -> Path:
        from pixcell_fed.bundle.state import run_dir

        return run_dir(self.work_dir, run_id)

    def officer_fingerprint(self, officer_public_key) -> str:
        """The fingerprint of ``officer_public_key`` if the site lists it as an officer; refused otherwise."""
        from pixcell_fed.keys import fingerprint, public_key_raw

        if not self.officers:
            raise ConfigError(
                f"site {self.name}: site.yaml lists no privacy officer (keys.officers)",
                hint="add each officer's public key line ('site-agent officer-key' prints it) under "
                "keys.officers in site.yaml",
            )
        if public_key_raw(officer_public_key) not in {public_key_raw(k) for k in self.officers}:
            raise PrivacyGateRefused(
                f"key {fingerprint(officer_public_key)} is not one of the privacy officers of "
                f"site {self.name} (keys.officers in site.yaml); nothing was decided",
                hint="decide with your own officer key, or have the administrator add its "
                "public key line to keys.officers",
            )
        return fingerprint(officer_public_key)


def bundle_overview(bundle_dir: str | Path, site: SiteAuthority | None = None) -> dict:
    """What the officer sees before deciding: site, run, state, verdict, tile counts, conditioning privacy in
    plain words, report paths."""
    from pixcell_fed.bundle.state import AUDIT_REPORT, audit_dir

    bundle_dir = Path(bundle_dir)
    info = L.read_bundle_json(bundle_dir)
    reports = [bundle_dir / L.SUMMARY_HTML] if info["files"][L.SUMMARY_HTML] else []
    run = site.run_dir(info["run_id"]) if site is not None else bundle_dir.parent
    report = audit_dir(run) / AUDIT_REPORT  # the full on-site report (real tiles): it never leaves the site
    reports += [report] if report.is_file() else []
    return {
        "bundle": str(bundle_dir),
        "site": info["site"],
        "run_id": info["run_id"],
        "created": info["created"],
        "state": info["state"],
        "verdict": info["verdict"],
        "tiles": info["counts"]["tiles"],
        "tile_size": info["tile_size"],
        "labels": info["counts"]["labels"],
        "reports": [str(p) for p in reports],
        "conditioning": info["conditioning"]["statement"],
    }


def _check_undecided(bundle_dir: Path, info: dict) -> None:
    if info["state"] == L.STATE_REJECTED:
        raise PrivacyGateRefused(
            f"bundle {bundle_dir} was rejected; it can never be approved",
            hint="run synthesize again to make a new bundle",
        )
    if info["state"] == L.STATE_APPROVED:
        raise BundleError(f"bundle {bundle_dir} is already approved", hint="nothing to do")


def _check_approvable(bundle_dir: Path, info: dict, site: SiteAuthority, officer_public_key) -> None:
    """The gate: every check that must pass before an officer may be asked to approve (see the module docstring)."""
    from pixcell_fed.bundle.run_binding import binding_problem
    from pixcell_fed.bundle.verify import inspect_bundle
    from pixcell_fed.keys import public_key_raw

    _check_undecided(bundle_dir, info)
    if info["verdict"] == "FAIL":
        raise PrivacyGateRefused(
            f"bundle {bundle_dir} has audit verdict FAIL; it cannot be approved",
            hint=f"reject it: site-agent reject {bundle_dir} --reason 'audit FAIL'",
        )
    if info["site"] != site.name:
        raise PrivacyGateRefused(
            f"bundle {bundle_dir} is a bundle of site {info['site']}, not of this site {site.name}",
            hint="approve only your own site's bundles",
        )
    problem = binding_problem(bundle_dir, site.run_dir(info["run_id"]), info)
    if problem:
        raise PrivacyGateRefused(
            f"bundle {bundle_dir} is not what its run audited: {problem}",
            hint="reject it; only a run's own audited set may leave the site",
        )
    try:
        inspect_bundle(bundle_dir)
    except VerificationError as exc:
        raise BundleError(
            f"bundle {bundle_dir} is damaged: {exc.message}", hint="do not approve it; rebuild the bundle from the run"
        ) from exc
    site_key, _ = L.read_signature(bundle_dir, L.SITE_SIG, role="site")
    if public_key_raw(site_key) == public_key_raw(officer_public_key):
        raise UsageError(
            "the officer key is the site's own signing key",
            hint="the privacy officer approves with a key of their own ('site-agent officer-key')",
        )


def approve_bundle(bundle_dir: str | Path, officer_key, *, site: SiteAuthority, confirm: Confirm | None = None) -> dict:
    """Approve ``bundle_dir`` with ``officer_key``: all checks, then ``confirm(overview)``, then sign.

    Refuses an officer key the site does not list, a FAIL verdict, a rejected bundle or one that is not its
    run's (:class:`PrivacyGateRefused`, exit 3), an already approved or damaged bundle (:class:`BundleError`), the
    site's own key (:class:`UsageError`); an unconfirmed approval signs nothing (:class:`UsageError`). Writes
    ``signatures/officer.sig`` and the decision, appends ``approve`` to the site trail; returns the overview.
    """
    from pixcell_fed.bundle.trail import append_event

    bundle_dir = Path(bundle_dir)
    officer = site.officer_fingerprint(officer_key.public_key())
    with L.bundle_lock(bundle_dir):  # held while the officer reads: nobody else decides meanwhile
        info = L.read_bundle_json(bundle_dir)
        _check_approvable(bundle_dir, info, site, officer_key.public_key())
        overview = bundle_overview(bundle_dir, site)
        if confirm is not None and not confirm(overview):
            raise UsageError(
                "approval not confirmed; nothing was signed", hint="type 'approve' at the prompt, or pass --yes"
            )
        info["state"] = L.STATE_APPROVED
        info["decision"] = {"state": L.STATE_APPROVED, "time": L.utc_now(), "officer": officer}
        # signature first: if killed in between, the bundle still reads "awaiting approval" and approve can rerun
        L.write_signature(bundle_dir, L.OFFICER_SIG, officer_key, L.statement(info, role="officer"), role="officer")
        L.write_bundle_json(bundle_dir, info)
    append_event(
        site.trail,
        "approve",
        run_id=info["run_id"],
        bundle=bundle_dir.name,
        officer=officer,
        verdict=info["verdict"],
        tiles=info["counts"]["tiles"],
    )
    return bundle_overview(bundle_dir, site)


def reject_bundle(bundle_dir: str | Path, reason: str, officer_key, *, site: SiteAuthority) -> dict:
    """Record an officer's refusal: state becomes rejected (with the officer's fingerprint), any approval
    signature is removed, ``reject`` is appended to the site trail. Returns the overview."""
    from pixcell_fed.bundle.trail import append_event

    bundle_dir = Path(bundle_dir)
    reason = (reason or "").strip()
    if not reason:
        raise UsageError("a rejection needs a reason", hint="pass --reason 'what is wrong'")
    if len(reason) > MAX_REASON or "\n" in reason:
        raise UsageError("the reason must be one line of at most 2000 characters", hint="shorten the reason")
    officer = site.officer_fingerprint(officer_key.public_key())
    with L.bundle_lock(bundle_dir):
        info = L.read_bundle_json(bundle_dir)  # a damaged bundle, or one that is not its run's, can still be rejected
        if info["state"] == L.STATE_REJECTED:
            raise BundleError(f"bundle {bundle_dir} is already rejected", hint="nothing to do")
        info["state"] = L.STATE_REJECTED
        info["decision"] = {"state": L.STATE_REJECTED, "time": L.utc_now(), "reason": reason, "officer": officer}
        L.write_bundle_json(bundle_dir, info)
        officer_sig = bundle_dir / L.OFFICER_SIG
        if officer_sig.exists():
            officer_sig.unlink()
    append_event(site.trail, "reject", run_id=info["run_id"], bundle=bundle_dir.name, officer=officer, reason=reason)
    return bundle_overview(bundle_dir, site)
