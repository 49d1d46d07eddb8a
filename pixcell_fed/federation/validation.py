"""Every value a site's reply carries is checked here, against strict patterns, before the coordinator uses it.

Site names, run ids and tile names follow the bundle format's own rules (``bundle/layout.py``,
``bundle/manifest.py``, ``bundle/png.py``); the signed files of a manifest reply are exactly the names of
:data:`~pixcell_fed.federation.protocol.SIGNED_FILES`. A value that fails is a :class:`ReplyRejected`: the whole
reply is refused and nothing of it is written anywhere.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pixcell_fed.bundle.layout import BUNDLE_JSON, SITE_NAME_RE
from pixcell_fed.bundle.manifest import RUN_ID_RE
from pixcell_fed.bundle.png import TILE_NAME_RE
from pixcell_fed.errors import FederationError
from pixcell_fed.federation import protocol as P

MAX_SIGNED_BYTES = 256 << 20  # manifest, audit, summary and signatures of one bundle together
MAX_COUNT = 100_000_000  # tiles in a bundle


class ReplyRejected(FederationError):
    """A reply value failed validation: the reply is refused as a whole."""


def _show(value: Any) -> str:
    return repr(value)[:80]


def site_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not SITE_NAME_RE.match(value):
        raise ReplyRejected(f"{where}: {_show(value)} is not a valid site name")
    return value


def run_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not RUN_ID_RE.match(value) or value in (".", ".."):
        raise ReplyRejected(f"{where}: {_show(value)} is not a valid run id")
    return value


def tile_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not TILE_NAME_RE.match(value):
        raise ReplyRejected(f"{where}: {_show(value)} is not a tile name ('<32 hex>.png')")
    return value


def count(value: Any, where: str, *, maximum: int = MAX_COUNT) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ReplyRejected(f"{where}: {_show(value)} is not a count in [0, {maximum}]")
    return value


def signed_files(items: Sequence[tuple[str, bytes]], where: str) -> dict[str, bytes]:
    """The signed files of a manifest reply: known names only, each once, the required ones present, bounded size."""
    files: dict[str, bytes] = {}
    for name, blob in items:
        if name not in P.SIGNED_FILES:
            raise ReplyRejected(
                f"{where}: unexpected file {_show(name)} (a manifest reply carries only {', '.join(P.SIGNED_FILES)})"
            )
        if name in files:
            raise ReplyRejected(f"{where}: file {name} sent twice")
        files[name] = blob
    missing = [n for n in P.REQUIRED_SIGNED_FILES if n not in files]
    if missing:
        raise ReplyRejected(f"{where}: missing {', '.join(missing)}")
    if sum(len(b) for b in files.values()) > MAX_SIGNED_BYTES:
        raise ReplyRejected(f"{where}: the signed files exceed {MAX_SIGNED_BYTES >> 20} MB")
    return files


def bundle_identity(files: Mapping[str, bytes], where: str) -> tuple[str, str]:
    """``(site, run id)`` named by the sent ``bundle.json``, both validated (the signature is checked later)."""
    try:
        info = json.loads(files[BUNDLE_JSON].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ReplyRejected(f"{where}: {BUNDLE_JSON} is not ASCII JSON ({exc})") from exc
    if not isinstance(info, dict):
        raise ReplyRejected(f"{where}: {BUNDLE_JSON} is not a JSON object")
    return site_name(info.get("site"), f"{where}: {BUNDLE_JSON} site"), run_id(
        info.get("run_id"), f"{where}: {BUNDLE_JSON} run_id"
    )


def site_info(record: Any, where: str) -> dict[str, Any]:
    """The small facts of a manifest reply (KEY_SITE): protocol version, the name the node says, tile count."""
    protocol = record.get("protocol")
    if protocol != P.PROTOCOL_VERSION:
        raise ReplyRejected(
            f"{where}: protocol version {_show(protocol)}, expected {P.PROTOCOL_VERSION}",
            hint="the site runs another pixcell-fed release; both sides must run the same one",
        )
    info = {"protocol": protocol, "n_tiles": count(record.get("n-tiles"), f"{where}: n-tiles")}
    if "site-name" in record:
        info["site_name"] = site_name(record.get("site-name"), f"{where}: site-name")
    return info


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def check_bundle_age(created: _dt.datetime, max_age_days: float, *, now: _dt.datetime | None = None) -> None:
    """Refuse a bundle built more than ``max_age_days`` ago (0 = no maximum). ``created`` is the signed creation
    time as the bundle verifier read it (``VerifiedBundle.created``: a missing, unparsable or future time already
    failed there)."""
    if max_age_days <= 0:
        return
    age_days = ((now or utc_now()) - created).total_seconds() / 86400.0
    if age_days > max_age_days:
        raise ReplyRejected(
            f"the bundle is {age_days:.1f} days old; the run accepts at most {max_age_days:g} days",
            hint="ask the site for a fresh bundle, or raise max-bundle-age-days",
        )


def metrics(record: Any, names: Sequence[str], where: str) -> dict[str, float]:
    """An evaluation reply's metrics: the known names only, each a finite number (scores in [0, 1], ``n`` a count)."""
    out: dict[str, float] = {}
    for name in (*names, "n"):
        value = record.get(name) if name in record else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ReplyRejected(f"{where}: metric {name!r} is missing or not a finite number")
        if name == "n":
            count(int(value), f"{where}: n")
            if value != int(value):
                raise ReplyRejected(f"{where}: n is not a whole number")
        elif not 0.0 <= value <= 1.0:
            raise ReplyRejected(f"{where}: metric {name!r} = {value} is outside [0, 1]")
        out[name] = float(value)
    return out
