"""One site's transfer at the coordinator, and the phases it goes through::

    connected --manifest reply, checked + staged + preflight--> transferring --every tile--> verified --> complete
        |                      |                                      |                         |
        +-> missing (silent)   +-> rejected (bad reply or bundle,     +-> missing / partial      +-> rejected
                                   or conditioning below the consortium's requirement)

Each phase is one method of :class:`SiteTransfer`; :mod:`pixcell_fed.federation.pooling` drives them as replies
arrive. Every value of a reply is validated (:mod:`~pixcell_fed.federation.validation`) before it is used, files
land only in the site's staging folder (:mod:`~pixcell_fed.federation.staging`), and each tile is hashed once, on
arrival, by the bundle verifier's :func:`~pixcell_fed.bundle.verify.check_tile` (the site-signed manifest's size
and sha256, a canonical PNG of the bundle's tile size).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.conditioning_policy import ConditioningRequirement, conditioning_refusal
from pixcell_fed.errors import FederationError, PixcellFedError
from pixcell_fed.federation import protocol as P
from pixcell_fed.federation import staging
from pixcell_fed.federation import validation as V
from pixcell_fed.federation.transport import Reply
from pixcell_fed.runlog import get_logger

log = get_logger(__name__)

Verifier = Callable[..., Any]  # verify(bundle_dir, *, complete: bool) -> pixcell_fed.bundle.verify.VerifiedBundle


@dataclass
class SiteStatus:
    """A site's line in the pool report."""

    site: str
    status: str = "missing"  # complete | partial | missing | rejected
    run_id: str | None = None
    n_tiles: int = 0
    n_received: int = 0
    bytes_received: int = 0
    audit_verdict: str | None = None
    generator: str | None = None  # the generator's label from the audit ("PixCell-256", "untrained twin")
    conditioning: dict | None = None  # the signed conditioning claim (mode, dp guarantee), as verified
    reason: str | None = None
    failed_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TransferSettings:
    """How one site's tiles are asked for."""

    message_bytes: int = 512 << 20  # tiles per data message at most (a message holds one tile at least)
    max_attempts: int = 3  # requests per tile before giving up on it
    max_bundle_age_days: float = 0.0  # 0 = no maximum
    conditioning: ConditioningRequirement = ConditioningRequirement()  # the least the consortium accepts


def audit_facts(bundle_dir: Path) -> tuple[str | None, str | None]:
    """``(verdict, generator label)`` as the bundle's signed audit names them ("PASS", "PixCell-256", ...)."""
    try:
        audit = json.loads((bundle_dir / L.AUDIT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(audit, dict):
        return None, None
    generator = (audit.get("identities") or {}).get("generator") or {}
    label = generator.get("label") if isinstance(generator, dict) else None
    verdict = audit.get("verdict")
    return (str(verdict) if verdict is not None else None), (str(label) if label is not None else None)


def refusal_of_conditioning(checked: Any, requirement: ConditioningRequirement) -> str | None:
    """Why a verified bundle's signed conditioning claim does not meet the consortium's requirement (``None`` when
    it does). A bundle may only be refused by this, never accepted: the claim is the site's, signed and checked."""
    reason = conditioning_refusal(checked.conditioning, requirement)
    return None if reason is None else f"bundle refused: {reason}"


def _status_of_refusal(code: str | None) -> str:
    """A site that refuses to serve its bundle is rejected; one that fails or vanishes is missing."""
    return "rejected" if code in ("not-approved", "bad-request") else "missing"


@dataclass
class SiteTransfer:
    """The coordinator's state for one identified site during one pooling run."""

    status: SiteStatus
    node: int
    staged: Path | None = None
    tiles: dict[str, int] = field(default_factory=dict)  # the signed manifest: tile name -> size
    pending: dict[str, int] = field(default_factory=dict)  # not received yet, in manifest order
    attempts: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, list[str]] = field(default_factory=dict)  # message id -> tile names asked for
    checked: Any = None  # the VerifiedBundle of the signed files (preflight)
    verified: Any = None  # the VerifiedBundle once complete
    closed: bool = False
    waves: int = 0  # request rounds sent to this site
    last_heard: float = field(default_factory=time.monotonic)

    @property
    def site(self) -> str:
        return self.status.site

    @property
    def staged_dir(self) -> Path:
        """The staged bundle folder; asked for only once the manifest reply was staged."""
        if self.staged is None:
            raise RuntimeError(f"pooling: nothing of site {self.site} is staged yet")
        return self.staged

    def close(self, status: str, reason: str | None) -> None:
        self.status.status, self.status.reason, self.closed = status, reason, True
        self.in_flight.clear()
        if reason:
            log.warning("pooling: site %s %s: %s", self.site, status, reason)

    # ------------------------------------------------------------------------------------- 1. manifest reply

    def accept_manifest(self, reply: Reply, pool_dir: Path, verify: Verifier, settings: TransferSettings) -> None:
        """Check the reply, stage the signed files, verify them (no tile yet) and list the tiles still to fetch."""
        if reply.content is None:
            self.close(_status_of_refusal(reply.code), f"no manifest: {reply.error}")
            return
        try:
            run_id = self._stage(reply.content, pool_dir)
            checked = verify(self.staged, complete=False)
            V.check_bundle_age(checked.created, settings.max_bundle_age_days)
        except PixcellFedError as exc:
            if self.staged is not None:
                staging.discard(self.staged)  # nothing unverified stays behind
            self.close("rejected", f"bundle refused before any tile: {exc.message}")
            return
        self.status.run_id, self.checked = run_id, checked
        self.status.audit_verdict, self.status.generator = audit_facts(self.staged_dir)
        self.status.conditioning = checked.conditioning.to_record()
        refused = refusal_of_conditioning(checked, settings.conditioning)
        if refused is not None:  # before any tile is asked for
            staging.discard(self.staged_dir)
            self.close("rejected", refused)
            return
        self.tiles = {name: size for name, (size, _) in checked.tile_records.items()}
        tiles_dir = self.staged_dir / L.TILES
        # resume: a tile is on disk under its final name only after check_tile passed on it (in an earlier run of
        # this same manifest: staging drops the tiles of any other); its size is checked again at the end
        self.pending = {
            n: size
            for n, size in self.tiles.items()
            if not ((tiles_dir / n).is_file() and (tiles_dir / n).stat().st_size == size)
        }
        self.status.n_tiles = len(self.tiles)
        self.status.n_received = len(self.tiles) - len(self.pending)
        if self.status.n_received:
            log.info(
                "pooling: %s has %d/%d tiles from an earlier run", self.site, self.status.n_received, len(self.tiles)
            )

    def _stage(self, content: Any, pool_dir: Path) -> str:
        where = f"manifest reply of site {self.site}"
        if P.KEY_SITE not in content:
            raise V.ReplyRejected(f"{where}: no site record")
        said = V.site_info(content[P.KEY_SITE], where).get("site_name")
        if said is not None and said != self.site:
            raise V.ReplyRejected(f"{where}: the node says it is {said!r}, but its key is site {self.site!r}'s")
        items, _ = P.records_to_files(content)
        files = V.signed_files(items, where)
        bundle_site, run_id = V.bundle_identity(files, where)
        if bundle_site != self.site:
            raise V.ReplyRejected(
                f"{where}: it serves a bundle of site {bundle_site!r} (a replay under another site's key)"
            )
        self.staged = staging.stage_signed_files(pool_dir, self.site, run_id, files)
        return run_id

    # ------------------------------------------------------------------------------------- 2. data requests

    def data_requests(self, settings: TransferSettings) -> list[list[str]]:
        """Every tile still to ask for, in messages of at most ``message_bytes`` (tiles in flight are not asked)."""
        if self.closed or not self.tiles:
            return []
        asked = {n for names in self.in_flight.values() for n in names}
        batches: list[list[str]] = []
        batch: list[str] = []
        size = 0
        for name, tile_size in self.pending.items():
            if name in asked or self.attempts.get(name, 0) >= settings.max_attempts:
                continue
            if batch and size + tile_size > settings.message_bytes:
                batches.append(batch)
                batch, size = [], 0
            batch.append(name)
            size += tile_size
        if batch:
            batches.append(batch)
        return batches

    # ------------------------------------------------------------------------------------- 3. data replies

    def accept_tiles(self, message_id: str, reply: Reply) -> int:
        """Write the tiles of one data reply that match the signed manifest; returns the bytes accepted."""
        names = self.in_flight.pop(message_id, [])
        if self.closed:
            return 0
        if reply.content is None:
            why = (
                f"the site refused during the transfer ({reply.code})"
                if reply.code
                else f"dropped out during transfer: {reply.error}"
            )
            self.close(_status_of_refusal(reply.code), why)
            return 0
        try:
            got = self._reply_tiles(reply.content, names)
        except FederationError as exc:
            log.warning("pooling: a data reply of %s was refused: %s", self.site, exc.message)
            got = {}
        accepted = 0
        for name, ok in zip(names, self._check_tiles(names, got)):
            if ok:
                staging.write_tile(self.staged_dir, name, got[name])
                self.pending.pop(name, None)
                accepted += self.tiles[name]
            else:
                self.attempts[name] = self.attempts.get(name, 0) + 1
        self.status.n_received = len(self.tiles) - len(self.pending)
        self.status.bytes_received += accepted
        if accepted < sum(self.tiles[n] for n in names):
            log.warning("pooling: some tiles from %s were missing or corrupt; asking again", self.site)
        return accepted

    def _check_tiles(self, names: list[str], got: dict[str, bytes]) -> list[bool]:
        """:meth:`_tile_ok` for each asked tile, by up to 8 threads (decoding and re-encoding release the GIL)."""
        import os
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, min(8, os.cpu_count() or 1, len(names)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda name: self._tile_ok(name, got.get(name)), names))

    def _tile_ok(self, name: str, blob: bytes | None) -> bool:
        """The tile's one check: the signed manifest's size and sha256 are the authority, never what the reply says."""
        from pixcell_fed.bundle.verify import check_tile

        if blob is None:
            return False
        try:
            check_tile(self.checked, name, blob)
        except PixcellFedError as exc:
            log.warning("pooling: tile %s of %s refused: %s", name, self.site, exc.message)
            return False
        return True

    def _reply_tiles(self, content: Any, asked: list[str]) -> dict[str, bytes]:
        where = f"data reply of site {self.site}"
        items, missing = P.records_to_files(content)
        wanted = set(asked)
        got: dict[str, bytes] = {}
        for name, blob in items:
            if V.tile_name(name, where) not in wanted or name in got:
                raise V.ReplyRejected(f"{where}: it sends {name}, which was not asked for (or twice)")
            got[name] = blob
        for name in missing:
            V.tile_name(name, f"{where}: missing")
        return got

    # ------------------------------------------------------------------------------------- 4. the end

    def transferring_done(self, settings: TransferSettings) -> bool:
        """Nothing in flight and nothing left that may still be asked for."""
        return not self.closed and bool(self.tiles) and not self.in_flight and not self.data_requests(settings)

    def finish(self, pool_dir: Path, verify: Verifier, settings: TransferSettings) -> None:
        """Verify the complete staged bundle and move it into the pool; or report what is missing."""
        if self.pending:
            self.status.failed_files = sorted(self.pending)
            self.close("partial", f"{len(self.pending)} tile(s) failed after {settings.max_attempts} attempts")
            return
        try:
            verified = verify(self.staged, complete=True)
        except PixcellFedError as exc:
            staging.discard(self.staged_dir)  # resumed tiles are trusted by size only: start afresh next time
            self.close("rejected", f"bundle verification failed after transfer: {exc.message}")
            return
        self.staged = staging.promote(pool_dir, self.site, str(self.status.run_id))
        self.verified = verified
        self.close("complete", None)
