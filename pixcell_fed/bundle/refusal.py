"""Refusal notices: what a site may tell the consortium when its own audit refused a run, and nothing more.

When the audit FAILs, no bundle is built and nothing of the run may leave the site. A site that wants the
consortium to know why it contributes nothing sends a *refusal notice* (``site-agent refusal-notice``): one JSON
file holding the run's shareable audit summary (verdicts, each test's statistics and plain sentence, thresholds,
set sizes, model identities; the audit's allow-list, checked fail-closed) with its per-tile list and tile hashes
left out (those tiles never leave, so nobody needs their hashes), the site's name, the run id and the time,
signed with the site's signing key. Sending it is the site's choice; the coordinator never asks for it.

The consortium lead puts the notices into the coordinator's ``<work-dir>/refusals/``; ``coordinator run`` accepts
a notice only when it is signed by the signing key the trust file holds for the site it names, its verdict is
FAIL and its summary passes the same allow-list as a bundle's audit (:func:`read_refusal_notices`). A notice
proves that the site's audit refused that run; it cannot add a site, a tile or a file to the pool.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.manifest import canonical_json, check_run_id
from pixcell_fed.bundle.shareable import HASHES_KEY, validate_shareable_audit
from pixcell_fed.bundle.verify import MAX_FUTURE_SKEW  # one clock-skew policy for bundles and notices
from pixcell_fed.errors import BundleError, UsageError, VerificationError

if TYPE_CHECKING:
    from pixcell_fed.bundle.trust import TrustStore

NOTICE_TYPE = "pixcell-fed-refusal-notice"
NOTICE_VERSION = 1
NOTICE_KEYS = frozenset({"type", "format_version", "site", "run_id", "created", "audit"})
MAX_NOTICE_BYTES = 8 << 20
#: what the notice leaves out of the shareable summary: the per-tile list (the tiles never leave)
DROPPED_AUDIT_KEYS = ("tiles",)
_HINT = "ask the site for a fresh notice ('site-agent refusal-notice'); a notice that does not verify is ignored"


@dataclass(frozen=True)
class RefusalNotice:
    """A verified refusal notice: which site, which run, when, and the audit's shareable summary."""

    site: str
    run_id: str
    created: str
    audit: Mapping[str, Any]

    @property
    def generator(self) -> str | None:
        """The generator's label as the audit names it ("PixCell-256", "untrained twin", "memorising twin")."""
        generator = (self.audit.get("identities") or {}).get("generator") or {}
        label = generator.get("label") if isinstance(generator, Mapping) else None
        return str(label) if label is not None else None

    def reasons(self) -> list[str]:
        """One line per failing test: its title and the audit's plain sentence."""
        return [
            f"{t.get('title', t.get('name'))}: {t.get('sentence', '')}"
            for t in self.audit.get("tests", [])
            if isinstance(t, Mapping) and t.get("status") == "FAIL"
        ]

    def to_report(self) -> dict[str, Any]:
        """What the consortium report shows of the notice."""
        return {
            "run_id": self.run_id,
            "created": self.created,
            "verdict": self.audit["verdict"],
            "generator": self.generator,
            "sizes": dict(self.audit.get("sizes") or {}),
            "reasons": self.reasons(),
        }


def notice_audit(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The shareable summary as a notice carries it: checked, FAIL only, without per-tile entries or tile hashes."""
    audit = {k: v for k, v in summary.items() if k not in DROPPED_AUDIT_KEYS}
    audit[HASHES_KEY] = []
    validate_shareable_audit(audit, source="refusal notice audit")
    if audit["verdict"] != "FAIL":
        raise UsageError(
            f"the audit's verdict is {audit['verdict']}, not FAIL: there is no refusal to report",
            hint="a run that passed builds a bundle for the officer to approve or reject",
        )
    return audit


def write_refusal_notice(
    path: str | Path, summary: Mapping[str, Any], *, site: str, run_id: str, site_key: Any
) -> RefusalNotice:
    """Write the signed notice of ``site``'s refused run ``run_id`` from its audit summary; returns what it says."""
    from pixcell_fed.atomic import write_text_atomic

    notice: dict[str, Any] = {
        "type": NOTICE_TYPE,
        "format_version": NOTICE_VERSION,
        "site": L.check_site_name(site),
        "run_id": check_run_id(run_id),
        "created": L.utc_now(),
        "audit": notice_audit(summary),
    }
    record = {
        "notice": notice,
        "signature": L.signature_record(site_key, canonical_json(notice).encode("ascii"), role="site"),
    }
    write_text_atomic(
        Path(path), json.dumps(record, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"
    )
    return RefusalNotice(site=notice["site"], run_id=notice["run_id"], created=notice["created"], audit=notice["audit"])


def _bad(path: Path, what: str) -> VerificationError:
    return VerificationError(f"refusal notice {path.name}: {what}", hint=_HINT)


def _check_notice(notice: Any, path: Path) -> dict:
    if not isinstance(notice, dict) or set(notice) != NOTICE_KEYS:
        raise _bad(path, f"the notice must hold exactly {', '.join(sorted(NOTICE_KEYS))}")
    if notice["type"] != NOTICE_TYPE or notice["format_version"] != NOTICE_VERSION:
        raise _bad(path, f"not a {NOTICE_TYPE} of version {NOTICE_VERSION}")
    try:
        L.check_site_name(notice["site"], "site")
        check_run_id(notice["run_id"])
        audit = validate_shareable_audit(notice["audit"], source="audit")
    except BundleError as exc:
        raise _bad(path, exc.message) from exc
    created = L.parse_time(notice["created"])
    if created is None or created > _dt.datetime.now(_dt.UTC) + MAX_FUTURE_SKEW:
        raise _bad(path, f"its time {str(notice['created'])[:40]!r} is not a past UTC time")
    if audit["verdict"] != "FAIL":
        raise _bad(path, f"its audit's verdict is {audit['verdict']}: a notice reports a FAIL only")
    if audit[HASHES_KEY] or any(k in audit for k in DROPPED_AUDIT_KEYS):
        raise _bad(path, "it carries tile hashes or per-tile entries, which a notice leaves out")
    return notice


def read_refusal_notice(path: str | Path, trust: TrustStore) -> RefusalNotice:
    """Verify one notice against the trust file; :class:`VerificationError` (exit 3) names what is wrong."""
    from pixcell_fed.keys import fingerprint, public_key_raw

    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise _bad(path, "not a plain file")
    if path.stat().st_size > MAX_NOTICE_BYTES:
        raise _bad(path, f"{path.stat().st_size} bytes, more than {MAX_NOTICE_BYTES}")
    try:
        record = json.loads(path.read_bytes().decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"not ASCII JSON ({exc})") from exc
    if not isinstance(record, dict) or set(record) != {"notice", "signature"}:
        raise _bad(path, "a notice file holds exactly 'notice' and 'signature'")
    notice = _check_notice(record["notice"], path)
    key, signature = L.signature_from_record(record["signature"], path.name, role="site", hint=_HINT)
    trusted = trust.site(notice["site"])
    if trusted is None:
        raise _bad(path, f"site {notice['site']!r} is not in the trust file {trust.source}")
    if public_key_raw(key) != public_key_raw(trusted.signing_key):
        raise _bad(path, f"signed by key {fingerprint(key)}, not by the signing key of site {notice['site']!r}")
    if not L.signature_valid(key, signature, canonical_json(notice).encode("ascii")):
        raise _bad(path, "the site's signature does not match the notice (it was modified after signing)")
    return RefusalNotice(site=notice["site"], run_id=notice["run_id"], created=notice["created"], audit=notice["audit"])


@dataclass(frozen=True)
class Refusals:
    """The verified notices of a folder (the newest per site) and why any others were ignored."""

    notices: Mapping[str, RefusalNotice]
    ignored: tuple[str, ...] = ()

    def to_report(self) -> dict[str, Any]:
        return {"sites": {s: n.to_report() for s, n in sorted(self.notices.items())}, "ignored": list(self.ignored)}


def read_refusal_notices(folder: str | Path, trust: TrustStore) -> Refusals:
    """Every ``*.json`` notice in ``folder`` (none when it does not exist), verified; the newest counts per site."""
    folder = Path(folder)
    found: dict[str, RefusalNotice] = {}
    ignored = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            notice = read_refusal_notice(path, trust)
        except VerificationError as exc:
            ignored.append(exc.message)
            continue
        if notice.site not in found or notice.created > found[notice.site].created:
            found[notice.site] = notice
    return Refusals(notices=found, ignored=tuple(ignored))


def refused_runs(work_dir: str | Path) -> list[str]:
    """Runs of a site's work folder whose audit FAILED (and so have no bundle), newest first."""
    from pixcell_fed.bundle.work_layout import AUDIT_SUMMARY, BUNDLE_DIR, RUNS_DIR, audit_dir

    found = []
    for run in Path(work_dir).glob(f"{RUNS_DIR}/*"):
        summary = audit_dir(run) / AUDIT_SUMMARY
        if not summary.is_file() or (run / BUNDLE_DIR).exists():
            continue
        try:
            verdict = json.loads(summary.read_text(encoding="utf-8")).get("verdict")
        except (OSError, ValueError, AttributeError):
            continue
        if verdict == "FAIL":
            found.append((summary.stat().st_mtime, run.name))
    return [name for _, name in sorted(found, reverse=True)]


def make_refusal_notice(
    work_dir: str | Path, out: str | Path, *, site: str, site_key: Any, run_id: str | None = None
) -> RefusalNotice:
    """Write the notice of a refused run of ``work_dir`` (default: the newest) to ``out`` and record it in the
    site's audit trail. :class:`UsageError` when there is no such run."""
    from pixcell_fed.bundle.trail import append_event
    from pixcell_fed.bundle.work_layout import AUDIT_SUMMARY, audit_dir, run_dir, trail_path
    from pixcell_fed.hashing import sha256_file

    runs = refused_runs(work_dir)
    if run_id is None and not runs:
        raise UsageError(f"no run in {work_dir} was refused by its audit", hint="a notice reports a FAILED audit only")
    if run_id is not None and run_id not in runs:
        raise UsageError(
            f"run {run_id!r} was not refused by its audit (or has a bundle)",
            hint=f"runs refused by their audit: {', '.join(runs) or 'none'}",
        )
    run_id = run_id or runs[0]
    summary = json.loads((audit_dir(run_dir(work_dir, run_id)) / AUDIT_SUMMARY).read_text(encoding="utf-8"))
    notice = write_refusal_notice(out, summary, site=site, run_id=run_id, site_key=site_key)
    append_event(trail_path(work_dir), "refusal_notice", run_id=run_id, sha256=sha256_file(Path(out)))
    return notice
