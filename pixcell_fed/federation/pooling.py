"""The coordinator's pooling: names from keys, two request rounds, verified bundles, a pool rebuilt from trust.

1. The connected nodes are mapped to trust-file sites by their authentication key
   (:mod:`~pixcell_fed.federation.node_identity`); unknown nodes and impostors are ignored and reported.
2. Round one: every identified site is asked for its manifest at once. Each reply is handled as it arrives:
   validated, staged, verified without tiles (:meth:`SiteTransfer.accept_manifest`).
   A bundle whose signed conditioning claim is below the consortium's requirement (``PoolSettings.conditioning``,
   :mod:`pixcell_fed.bundle.conditioning_policy`) is rejected there too, with the reason, before any tile moves.
3. Round two: as soon as a site's bundle passed, ALL its data requests are queued at once (one message per
   ``message_bytes`` of tiles), and each tile is checked (once: its signed size and sha256, a canonical PNG) and
   written as it arrives. Tiles that failed are asked again (a further round for that site only) up to
   ``max_attempts`` times.
4. A site whose tiles are all in is checked again without re-hashing its tiles (signed files, approval, tiles in
   place: :class:`TrustVerifier`) and moved from staging into the pool.
5. The pool table is rebuilt from the trust file: sites that left it lose their files; trusted sites pooled in an
   earlier run that did not connect now stay if their bundle still verifies and meets the requirement.

On disk (``pool_dir``): ``staging/`` and ``bundles/`` (see :mod:`~pixcell_fed.federation.staging`),
``pool.parquet`` (one row per pooled tile: file_name, site, bundle_run_id, label, sha256, size, path, generator,
encoder) and ``pool_state.json`` (per site: status, counts, reason; ignored nodes; timings and traffic).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.atomic import write_json_atomic, write_parquet_atomic
from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.conditioning_policy import ConditioningRequirement
from pixcell_fed.errors import PixcellFedError
from pixcell_fed.federation import protocol as P
from pixcell_fed.federation import staging
from pixcell_fed.federation.node_identity import identify_nodes
from pixcell_fed.federation.transfer import (
    SiteStatus,
    SiteTransfer,
    TransferSettings,
    Verifier,
    audit_facts,
    refusal_of_conditioning,
)
from pixcell_fed.federation.transport import Request, Transport
from pixcell_fed.runlog import get_logger

if TYPE_CHECKING:
    from pixcell_fed.bundle.trust import TrustStore

log = get_logger(__name__)

POOL_TABLE = "pool.parquet"
POOL_STATE = "pool_state.json"
POOL_COLUMNS = ["file_name", "site", "bundle_run_id", "label", "sha256", "size", "path", "generator", "encoder"]


@dataclass(frozen=True)
class PoolSettings:
    """How the pooling talks to the sites."""

    message_mb: float = 512.0  # tiles per data message at most
    expected_sites: tuple[str, ...] = ()
    max_attempts: int = 3
    reply_timeout_s: float = 600.0  # a site silent this long (with requests pending) is dropped
    poll_interval_s: float = 0.1
    max_bundle_age_days: float = 0.0  # 0 = no maximum
    conditioning: ConditioningRequirement = ConditioningRequirement()  # the least conditioning privacy accepted

    @property
    def transfer(self) -> TransferSettings:
        return TransferSettings(
            message_bytes=max(1, int(self.message_mb * (1 << 20))),
            max_attempts=self.max_attempts,
            max_bundle_age_days=self.max_bundle_age_days,
            conditioning=self.conditioning,
        )


@dataclass
class PoolReport:
    sites: dict[str, SiteStatus]
    n_pooled: int
    bytes_received: int
    seconds: float
    pool_table: Path
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    nodes: dict[str, int] = field(default_factory=dict)  # complete site -> node id of this run (ids change every start)
    ignored_nodes: list[str] = field(default_factory=list)  # connected nodes that are no trusted site, and why
    removed_sites: list[str] = field(default_factory=list)  # sites no longer in the trust file (their files removed)
    traffic: dict[str, int] = field(default_factory=dict)  # rounds, messages by kind
    conditioning_requirement: str | None = None  # the consortium's requirement in words (None: it requires nothing)

    @property
    def complete(self) -> list[str]:
        return sorted(s for s, st in self.sites.items() if st.status == "complete")

    @property
    def missing(self) -> list[str]:
        return sorted(s for s, st in self.sites.items() if st.status in ("missing", "partial"))

    @property
    def rejected(self) -> list[str]:
        return sorted(s for s, st in self.sites.items() if st.status == "rejected")

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": {k: asdict(v) for k, v in sorted(self.sites.items())},
            "n_pooled": self.n_pooled,
            "bytes_received": self.bytes_received,
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "traffic": dict(self.traffic),
            "ignored_nodes": list(self.ignored_nodes),
            "removed_sites": list(self.removed_sites),
            "conditioning_requirement": self.conditioning_requirement,
            "complete": self.complete,
            "missing": self.missing,
            "rejected": self.rejected,
        }


@dataclass(frozen=True)
class TrustVerifier:
    """Verifies bundles against the consortium trust file, which it carries (pooling maps node keys with it).

    ``complete=False`` (the signed files a site sent first, before any tile is asked for):
    :func:`pixcell_fed.bundle.verify.verify_before_transfer`, i.e. everything the site signed and the officer's
    approval. Each tile is then checked once, as it arrives (:func:`pixcell_fed.bundle.verify.check_tile`).
    ``complete=True`` (before the bundle enters the pool): the same two stages again on the staged files, and
    :func:`tiles_in_place`, so that no tile is hashed twice.
    """

    trust: TrustStore

    def __call__(self, bundle_dir: Path, *, complete: bool = True):
        from pixcell_fed.bundle.verify import verify_before_transfer

        checked = verify_before_transfer(bundle_dir, self.trust)
        if complete:
            tiles_in_place(checked)
        return checked


def tiles_in_place(checked: Any) -> None:
    """``tiles/`` holds exactly the manifest's files (plain files, no others) at the manifest's sizes; their bytes
    were checked with ``check_tile`` when they arrived."""
    from pixcell_fed.bundle.verify import tile_files
    from pixcell_fed.errors import VerificationError

    for name, path in tile_files(checked).items():
        size = checked.tile_records[name][0]
        if path.stat().st_size != size:
            raise VerificationError(
                f"{L.TILES}/{name} has {path.stat().st_size} bytes, the manifest says {size}",
                hint="the staged copy changed after it was checked; it is fetched again",
            )


def trust_verifier(trust: str | Path | TrustStore) -> TrustVerifier:
    """A :class:`TrustVerifier` for a trust file (path) or an already loaded trust store."""
    from pixcell_fed.bundle import load_trust

    return TrustVerifier(load_trust(trust) if isinstance(trust, (str, Path)) else trust)


# ------------------------------------------------------------------------------------------------ the rounds


@dataclass
class _Run:
    """One pooling run's moving parts: where, how, the clock and the messages in flight."""

    transport: Transport
    pool_dir: Path
    verify: Verifier
    settings: PoolSettings
    timings: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))  # seconds per phase
    traffic: Counter = field(default_factory=Counter)
    waiting: dict[str, tuple[SiteTransfer, str]] = field(default_factory=dict)  # message id -> (transfer, kind)
    bytes_received: int = 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        tick = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] += time.monotonic() - tick

    def send(self, batch: list[tuple[SiteTransfer, str, Any, list[str]]]) -> None:
        """Queue messages at once; a message Flower could not queue drops its site."""
        if not batch:
            return
        ids = self.transport.push([Request(t.node, kind, content) for t, kind, content, _ in batch])
        for (transfer, kind, _, names), mid in zip(batch, ids):
            self.traffic[f"messages_{kind.replace('query.', '')}"] += 1
            if mid is None:
                transfer.close("missing", f"a {kind} message could not be sent")
                continue
            self.waiting[mid] = (transfer, kind)
            if kind == P.MSG_CHUNK:
                transfer.in_flight[mid] = names
        for transfer in {id(t): t for t, *_ in batch}.values():
            transfer.waves += 1
            transfer.last_heard = time.monotonic()

    def queue_data(self, transfer: SiteTransfer) -> None:
        """All of a site's remaining data requests, at once."""
        batches = transfer.data_requests(self.settings.transfer)
        self.send([(transfer, P.MSG_CHUNK, P.request_record(files=names), names) for names in batches])

    def forget_closed(self) -> None:
        self.waiting = {m: (t, k) for m, (t, k) in self.waiting.items() if not t.closed}

    def expire_silent(self) -> None:
        """Drop sites that have requests pending and have said nothing for ``reply_timeout_s``."""
        now = time.monotonic()
        for transfer in {id(t): t for t, _ in self.waiting.values()}.values():
            if now - transfer.last_heard > self.settings.reply_timeout_s:
                transfer.close("missing", f"no reply within {self.settings.reply_timeout_s:.0f} s")
        self.forget_closed()


def _handle(run: _Run, message_id: str, reply: Any) -> None:
    transfer, kind = run.waiting.pop(message_id)
    if transfer.closed:
        return
    transfer.last_heard = time.monotonic()
    if kind == P.MSG_MANIFEST:
        with run.phase("preflight"):
            transfer.accept_manifest(reply, run.pool_dir, run.verify, run.settings.transfer)
    else:
        with run.phase("accept_tiles"):
            run.bytes_received += transfer.accept_tiles(message_id, reply)
    run.queue_data(transfer)
    if transfer.transferring_done(run.settings.transfer):
        with run.phase("final_verify"):
            transfer.finish(run.pool_dir, run.verify, run.settings.transfer)
    run.forget_closed()


def _exchange_all(run: _Run, transfers: list[SiteTransfer]) -> None:
    """Round one (manifests), then every site's data round as soon as its bundle passed; replies as they come."""
    started = time.monotonic()
    run.send([(t, P.MSG_MANIFEST, P.request_record(), []) for t in transfers])
    manifests_done = None
    while run.waiting:
        arrived = run.transport.pull(list(run.waiting))
        for message_id, reply in arrived.items():
            if message_id in run.waiting:
                _handle(run, message_id, reply)
        if manifests_done is None and not any(k == P.MSG_MANIFEST for _, k in run.waiting.values()):
            manifests_done = time.monotonic()
        run.expire_silent()
        if run.waiting and not arrived:
            time.sleep(run.settings.poll_interval_s)
    for transfer in transfers:
        if not transfer.closed:  # cannot happen while every reply is handled; never leave a site undecided
            transfer.close("missing", "the transfer did not finish")
    ended = time.monotonic()
    run.timings["manifest_round"] = (manifests_done or ended) - started
    run.timings["data_round"] = ended - (manifests_done or ended)
    run.traffic["rounds"] = max((t.waves for t in transfers), default=0)


# -------------------------------------------------------------------------------------------- the pool table


def _rows(pool_dir: Path, site: str, run_id: str, bundle_dir: Path, tiles: Any) -> list[dict]:
    def text(row: Any, name: str) -> str | None:
        value = getattr(row, name, None)
        return None if value is None or value != value else str(value)

    return [
        {
            "file_name": str(r.file_name),
            "site": site,
            "bundle_run_id": run_id,
            "label": text(r, "label"),
            "sha256": str(r.sha256),
            "size": int(r.size),
            "path": (bundle_dir / L.TILES / str(r.file_name)).relative_to(pool_dir).as_posix(),
            "generator": text(r, "generator"),
            "encoder": text(r, "encoder"),
        }
        for r in tiles.itertuples()
    ]


def _earlier_bundles(run: _Run, sites: dict[str, SiteStatus], connected: set[str], trust: TrustStore) -> list[dict]:
    """Rows of trusted sites pooled in an earlier run that did not connect now, if their bundle still verifies."""
    rows: list[dict] = []
    for site in sorted(set(trust.sites) - connected):
        bundle = staging.pooled_bundle(run.pool_dir, site)
        if bundle is None:
            continue
        status = sites.setdefault(site, SiteStatus(site=site))
        try:
            with run.phase("final_verify"):
                verified = run.verify(bundle, complete=True)
        except PixcellFedError as exc:
            status.status, status.reason = "rejected", f"pooled earlier, but no longer verifies: {exc.message}"
            continue
        verdict, generator = audit_facts(bundle)
        n = len(verified.tiles)
        sites[site] = SiteStatus(
            site=site,
            status="complete",
            run_id=str(verified.run_id),
            n_tiles=n,
            n_received=n,
            audit_verdict=verdict,
            generator=generator,
            conditioning=verified.conditioning.to_record(),
            reason="pooled in an earlier run; not connected now",
        )
        refused = refusal_of_conditioning(verified, run.settings.conditioning)
        if refused is not None:  # pooled under a weaker requirement: it stays out of this pool
            sites[site].status, sites[site].n_received = "rejected", 0
            sites[site].reason = f"pooled in an earlier run, but now {refused}"
            log.warning("pooling: site %s (pooled earlier) is left out: %s", site, refused)
            continue
        rows += _rows(run.pool_dir, site, str(verified.run_id), bundle, verified.tiles)
        log.info("pooling: keeping %d tiles of %s pooled in an earlier run", n, site)
    return rows


def pool_bundles(
    transport: Transport, pool_dir: str | Path, verify: TrustVerifier, settings: PoolSettings | None = None
) -> PoolReport:
    """Pool the verified bundles of every trusted connected site into ``pool_dir`` (resumable); see the module
    docstring. ``verify`` carries the trust file that maps node keys to sites."""
    import pandas as pd

    run = _Run(transport=transport, pool_dir=Path(pool_dir), verify=verify, settings=settings or PoolSettings())
    started = time.monotonic()
    run.pool_dir.mkdir(parents=True, exist_ok=True)
    removed = staging.remove_untrusted(run.pool_dir, verify.trust.sites)
    with run.phase("identify"):
        found = identify_nodes(transport.nodes(), verify.trust)
    log.info("pooling: %d trusted site(s) connected, %d node(s) ignored", len(found.sites), len(found.ignored))
    for reason in found.ignored.values():
        log.warning("pooling: %s", reason)
    sites = {name: SiteStatus(site=name, reason="never connected") for name in run.settings.expected_sites}
    transfers = []
    for site, node in sorted(found.sites.items()):
        sites[site] = SiteStatus(site=site)
        transfers.append(SiteTransfer(status=sites[site], node=node))
    _exchange_all(run, transfers)
    rows = [
        row
        for t in transfers
        if t.status.status == "complete"
        for row in _rows(run.pool_dir, t.site, str(t.status.run_id), t.staged_dir, t.verified.tiles)
    ]
    rows += _earlier_bundles(run, sites, set(found.sites), verify.trust)
    with run.phase("pool_table"):
        frame = pd.DataFrame(rows, columns=POOL_COLUMNS)
        write_parquet_atomic(run.pool_dir / POOL_TABLE, frame)
    report = PoolReport(
        sites=sites,
        n_pooled=len(frame),
        bytes_received=run.bytes_received,
        seconds=time.monotonic() - started,
        pool_table=run.pool_dir / POOL_TABLE,
        timings=dict(run.timings),
        nodes={t.site: t.node for t in transfers if t.status.status == "complete"},
        ignored_nodes=sorted(found.ignored.values()),
        removed_sites=removed,
        traffic={**run.traffic, "bytes": run.bytes_received},
        conditioning_requirement=None
        if run.settings.conditioning.requires_nothing
        else run.settings.conditioning.describe(),
    )
    write_json_atomic(run.pool_dir / POOL_STATE, report.to_dict())
    log.info(
        "pooling: %d tiles pooled; complete %s; missing %s; rejected %s",
        report.n_pooled,
        report.complete,
        report.missing,
        report.rejected,
    )
    return report
