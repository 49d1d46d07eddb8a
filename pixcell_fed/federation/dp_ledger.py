"""The site's privacy ledger: every DP-SGD step batch the site ever ran on its real tiles, append-only.

Layout (inside ``site.work_dir``, beside the audit trail)::

    privacy_ledger/ledger.jsonl        one entry per training round (``dp-steps``) or officer reset (``reset``)
    privacy_ledger/ledger.jsonl.head   count and hash of the last entry
    privacy_ledger/damaged-<time>/     a ledger an officer replaced, kept as it was

The ledger is chained exactly like the audit trail (:mod:`pixcell_fed.bundle.trail`: each line carries the hash of
the one before, a head file guards the end). Each round is written to the audit trail first (``dp-train``, with
the same step record and the ledger position it will take), then to the ledger; so the trail is a second copy of
every spend, and the ledger is checked against the trail's last DP entry each time it is read. A ledger that is
missing, edited, cut short, replaced by an older copy or behind the trail refuses all DP training
(:class:`~pixcell_fed.errors.PrivacyLedgerError`) until a privacy officer resets it: the reset, signed with the key
of an officer the site lists in ``keys.officers`` (the approve gate's check), moves the damaged ledger aside and
starts a new one that carries over every spend recorded in the trail, so a reset never forgets privacy already
spent.

Epsilon is always computed from the whole ledger (all rounds, runs, restarts and training sets, composed), at the
smallest delta the site has used.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.errors import PrivacyLedgerError, TrailError
from pixcell_fed.training.dp import DPSteps

if TYPE_CHECKING:
    from pixcell_fed.bundle.approval import SiteAuthority

LEDGER_DIR = "privacy_ledger"
LEDGER_FILE = "ledger.jsonl"
EVENT_STEPS = "dp-steps"
EVENT_RESET = "reset"
TRAIL_TRAIN = "dp-train"
TRAIL_REFUSED = "dp-refused"
TRAIL_RESET = "dp-ledger-reset"
RESET_STATEMENT = "pixcell-fed-privacy-ledger-reset"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_RESET_HINT = (
    "a privacy officer must check what happened, then reset the ledger: "
    "site-agent privacy-ledger-reset --config site.yaml --key OFFICER_KEY --reason '...'"
)


def ledger_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / LEDGER_DIR


def ledger_path(work_dir: str | Path) -> Path:
    return ledger_dir(work_dir) / LEDGER_FILE


@dataclass(frozen=True)
class StepRecord:
    """What one round spent: its DP-SGD steps, the delta it was accounted at, and which training set it used."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    train_set_sha256: str

    @property
    def dp_steps(self) -> DPSteps:
        return DPSteps(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)

    def to_fields(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_fields(cls, fields: Any, where: str) -> StepRecord:
        """Read back (and check) a record from a ledger or trail entry."""
        try:
            record = cls(
                round=int(fields["round"]),
                noise_multiplier=float(fields["noise_multiplier"]),
                sample_rate=float(fields["sample_rate"]),
                steps=int(fields["steps"]),
                delta=float(fields["delta"]),
                train_set_sha256=str(fields["train_set_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyLedgerError(f"{where}: not a valid DP step record ({exc})", hint=_RESET_HINT) from exc
        ok = (
            record.noise_multiplier > 0
            and math.isfinite(record.noise_multiplier)
            and 0 < record.sample_rate <= 1
            and record.steps >= 0
            and 0 < record.delta < 1
            and _SHA_RE.match(record.train_set_sha256)
        )
        if not ok:
            raise PrivacyLedgerError(f"{where}: DP step record out of range: {record}", hint=_RESET_HINT)
        return record


@dataclass(frozen=True)
class Ledger:
    """The verified ledger: every spend (including those a reset carried over), its length and last hash."""

    work_dir: Path
    records: tuple[StepRecord, ...]
    count: int

    def accounting_delta(self, delta: float) -> float:
        """The delta epsilon is given at: the smallest of ``delta`` and every delta the site used before."""
        return min([delta, *(r.delta for r in self.records)])

    def epsilon(self, delta: float, extra: StepRecord | None = None) -> float:
        """Epsilon of every recorded spend (plus ``extra``) at :meth:`accounting_delta`."""
        from pixcell_fed.training.dp_accounting import epsilon_spent

        records = [*self.records, *([extra] if extra else [])]
        return epsilon_spent([r.dp_steps for r in records], self.accounting_delta(delta))


# ------------------------------------------------------------------------------------------ reading


def _verify_chain(path: Path, what: str):
    from pixcell_fed.bundle.trail import verify_trail

    try:
        return verify_trail(path)
    except TrailError as exc:
        raise PrivacyLedgerError(f"the {what} is damaged: {exc.message}", hint=_RESET_HINT) from exc


def _reset_statement(fields: dict[str, Any]) -> bytes:
    keys = ("site", "reset_time", "reason", "previous", "restored")
    return json.dumps(
        {"type": RESET_STATEMENT, **{k: fields.get(k) for k in keys}},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")


def _check_reset_signature(entry: dict, where: str) -> None:
    from cryptography.exceptions import InvalidSignature

    from pixcell_fed.errors import PixcellFedError
    from pixcell_fed.keys import parse_public_key

    try:
        key = parse_public_key(str(entry["officer_key"]), source=where)
        key.verify(base64.b64decode(str(entry["signature"]), validate=True), _reset_statement(entry))
    except (KeyError, TypeError, ValueError, AttributeError, InvalidSignature, PixcellFedError) as exc:
        raise PrivacyLedgerError(f"{where}: the officer's reset signature does not verify", hint=_RESET_HINT) from exc


def _records_of(entries: list[dict], path: Path) -> list[StepRecord]:
    records: list[StepRecord] = []
    for entry in entries:
        where = f"{path}: entry {entry['seq']}"
        if entry["event"] == EVENT_STEPS:
            records.append(StepRecord.from_fields(entry, where))
        elif entry["event"] == EVENT_RESET and entry["seq"] == 0:
            _check_reset_signature(entry, where)
            records.extend(StepRecord.from_fields(f, where) for f in entry.get("restored", []))
        else:
            raise PrivacyLedgerError(f"{where}: unexpected event {entry['event']!r}", hint=_RESET_HINT)
    return records


def _check_against_trail(work_dir: Path, entries: list[dict]) -> None:
    """The ledger must hold the entry that the trail's last DP record points to, with the same content."""
    from pixcell_fed.bundle.state import trail_path

    trail = _verify_chain(trail_path(work_dir), "audit trail (it anchors the privacy ledger)")
    last = next((e for e in reversed(trail.entries) if e["event"] in (TRAIL_TRAIN, TRAIL_RESET)), None)
    if last is None:
        return
    seq = last.get("ledger_seq")
    if not isinstance(seq, int) or seq < 0:
        raise PrivacyLedgerError(f"audit trail entry {last['seq']} has no valid ledger position", hint=_RESET_HINT)
    if seq >= len(entries):
        raise PrivacyLedgerError(
            f"the privacy ledger has {len(entries)} entries but the audit trail records DP training up to entry "
            f"{seq + 1}: the ledger was lost, cut short or replaced by an older copy",
            hint=_RESET_HINT,
        )
    mine = entries[seq]
    if last["event"] == TRAIL_TRAIN:
        same = mine["event"] == EVENT_STEPS and StepRecord.from_fields(mine, "ledger") == StepRecord.from_fields(
            last, "trail"
        )
    else:
        same = mine["event"] == EVENT_RESET and mine.get("signature") == last.get("signature")
    if not same:
        raise PrivacyLedgerError(
            f"privacy ledger entry {seq} differs from what the audit trail recorded for it (trail entry {last['seq']})",
            hint=_RESET_HINT,
        )


def read_ledger(work_dir: str | Path) -> Ledger:
    """The verified ledger of the site whose work folder is ``work_dir`` (empty for a site that never trained).

    Raises :class:`PrivacyLedgerError` when the ledger or the trail is damaged, or they disagree.
    """
    work_dir = Path(work_dir)
    path = ledger_path(work_dir)
    check = _verify_chain(path, "privacy ledger")
    _check_against_trail(work_dir, check.entries)
    return Ledger(work_dir=work_dir, records=tuple(_records_of(check.entries, path)), count=check.count)


@contextlib.contextmanager
def locked_ledger(work_dir: str | Path) -> Iterator[Ledger]:
    """The verified ledger, with the ledger folder locked (one round or reset at a time, across processes)."""
    from pixcell_fed.atomic import folder_lock

    with folder_lock(ledger_dir(work_dir), what="DP training round or ledger reset"):
        yield read_ledger(work_dir)


# ------------------------------------------------------------------------------------------ writing


def record_round(ledger: Ledger, record: StepRecord, **summary: Any) -> None:
    """Write a round's spend: first to the audit trail (with ``summary``), then to the ledger. Call inside
    :func:`locked_ledger`, before training."""
    from pixcell_fed.bundle.state import trail_path
    from pixcell_fed.bundle.trail import append_event

    append_event(trail_path(ledger.work_dir), TRAIL_TRAIN, **record.to_fields(), ledger_seq=ledger.count, **summary)
    append_event(ledger_path(ledger.work_dir), EVENT_STEPS, **record.to_fields())


def record_refusal(work_dir: str | Path, reason: str, **fields: Any) -> None:
    """A refused round, in the audit trail (the ledger only holds spends)."""
    from pixcell_fed.bundle.state import trail_path
    from pixcell_fed.bundle.trail import append_event

    append_event(trail_path(work_dir), TRAIL_REFUSED, reason=reason, **fields)


def _spends_in_trail(work_dir: Path) -> list[dict[str, Any]]:
    from pixcell_fed.bundle.state import trail_path
    from pixcell_fed.bundle.trail import verify_trail

    entries = verify_trail(trail_path(work_dir)).entries  # a broken trail refuses the reset (TrailError)
    return [
        StepRecord.from_fields(e, f"audit trail entry {e['seq']}").to_fields()
        for e in entries
        if e["event"] == TRAIL_TRAIN
    ]


def reset_ledger(
    site: SiteAuthority, officer_key, *, reason: str, confirm: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """An officer's reset of the ledger of ``site`` (its name, work folder and officers, from its own site.yaml):
    move the current ledger aside, start a new one that carries over every spend the audit trail recorded, signed
    with ``officer_key`` (Ed25519), and record the reset in the trail. Returns a summary.

    Refused before anything is asked, moved or written: a key the site does not list in ``keys.officers``
    (:class:`~pixcell_fed.errors.PrivacyGateRefused`, exit 3; the approve gate's own check), a site that lists no
    officer (:class:`~pixcell_fed.errors.ConfigError`), a reason that is not one line, and (after the checks)
    ``confirm()`` returning False (:class:`~pixcell_fed.errors.UsageError`).
    """
    from pixcell_fed.atomic import folder_lock
    from pixcell_fed.bundle.state import trail_path
    from pixcell_fed.bundle.trail import append_event, head_path
    from pixcell_fed.errors import UsageError
    from pixcell_fed.keys import public_key_text

    if not reason.strip() or "\n" in reason:
        raise PrivacyLedgerError("a ledger reset needs a one-line reason", hint="pass --reason '...'")
    officer = site.officer_fingerprint(officer_key.public_key())
    if confirm is not None and not confirm():
        raise UsageError("reset not confirmed; nothing was changed", hint="type 'reset' at the prompt, or pass --yes")
    work_dir = site.work_dir
    with folder_lock(ledger_dir(work_dir), what="DP training round or ledger reset"):
        restored = _spends_in_trail(work_dir)
        path = ledger_path(work_dir)
        now = _dt.datetime.now(_dt.UTC)
        previous = None
        moved = [p for p in (path, head_path(path)) if p.exists()]
        if moved:
            aside = ledger_dir(work_dir) / f"damaged-{now.strftime('%Y%m%dT%H%M%S%fZ')}"
            aside.mkdir(parents=True)
            for p in moved:
                shutil.move(str(p), str(aside / p.name))
            previous = aside.name
        fields = {
            "site": site.name,
            "reset_time": now.isoformat(timespec="seconds"),
            "reason": reason.strip(),
            "previous": previous,
            "restored": restored,
        }
        signature = base64.b64encode(officer_key.sign(_reset_statement(fields))).decode("ascii")
        signed = {"officer": officer, "officer_key": public_key_text(officer_key.public_key()), "signature": signature}
        append_event(path, EVENT_RESET, **fields, **signed)
        append_event(
            trail_path(work_dir),
            TRAIL_RESET,
            reason=fields["reason"],
            previous=previous,
            restored_rounds=len(restored),
            ledger_seq=0,
            **signed,
        )
    return {"previous": previous, "restored_rounds": len(restored), "officer": officer}


def ledger_status(work_dir: str | Path, *, budget: float, delta: float | None) -> dict[str, Any]:
    """What an officer or the admin sees: whether the ledger verifies, rounds recorded, epsilon spent (at the site's
    delta, else the smallest delta recorded), the budget and what is left of it."""
    status: dict[str, Any] = {
        "ledger": str(ledger_path(work_dir)),
        "ok": True,
        "problem": None,
        "rounds": 0,
        "epsilon": 0.0,
        "delta": delta,
        "epsilon_budget": budget,
        "epsilon_remaining": budget,
    }
    try:
        ledger = read_ledger(work_dir)
    except PrivacyLedgerError as exc:
        return {**status, "ok": False, "problem": exc.message, "epsilon": None, "epsilon_remaining": None}
    if ledger.records:
        at = ledger.accounting_delta(delta if delta is not None else 1.0)
        eps = ledger.epsilon(at)
        status.update(rounds=len(ledger.records), epsilon=eps, delta=at, epsilon_remaining=max(budget - eps, 0.0))
    return status
