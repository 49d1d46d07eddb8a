"""The coordinator's pooling: collect manifests, verify every bundle, transfer tiles in checked chunks, resume.

Plain functions over a :class:`Transport` (``node_ids()`` and ``exchange(requests)``), so that the logic is
tested against an in-memory fake as well as a live Flower :class:`~flwr.serverapp.Grid` (:class:`GridTransport`).

On disk (``pool_dir``)::

    bundles/<site>/<run_id>/          the site's bundle, rebuilt: signed files first, verified, then tiles/
    pool.parquet                      one row per pooled tile: file_name, site, bundle_run_id, label, sha256,
                                      size, path (relative to pool_dir), generator, encoder
    pool_state.json                   per site: status (complete/partial/missing/rejected), counts, reason

A tile is accepted only after its site's bundle verified against the consortium trust file and only if its bytes
match the sha256 in the signed manifest. What arrived stays on disk, so a later run asks only for the rest.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from pixcell_fed.atomic import write_bytes_atomic, write_json_atomic, write_parquet_atomic
from pixcell_fed.errors import BundleError, FederationError, PixcellFedError
from pixcell_fed.federation import protocol as P
from pixcell_fed.runlog import get_logger
from pixcell_fed.hashing import sha256_file

if TYPE_CHECKING:
    from flwr.app import RecordDict

log = get_logger(__name__)

POOL_TABLE = "pool.parquet"
POOL_STATE = "pool_state.json"


@dataclass(frozen=True)
class Reply:
    """A site's answer: ``content`` or, when the site failed or vanished, ``error``."""

    content: "RecordDict | None" = None
    error: str | None = None


class Transport(Protocol):
    """What pooling needs from Flower: the connected nodes and one concurrent request/reply exchange."""

    def node_ids(self) -> list[int]: ...

    def exchange(self, requests: Mapping[int, tuple[str, "RecordDict"]], *, timeout: float) -> dict[int, Reply]: ...


class GridTransport:
    """:class:`Transport` over a live Flower ``Grid`` (inside the ServerApp)."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(self, requests: Mapping[int, tuple[str, "RecordDict"]], *, timeout: float) -> dict[int, Reply]:
        from flwr.app import Message

        messages = {node: Message(content, dst_node_id=int(node), message_type=kind)
                    for node, (kind, content) in requests.items()}
        if not messages:
            return {}
        replies = list(self.grid.send_and_receive(list(messages.values()), timeout=timeout))
        # match replies by the id of the message they answer: an error about a dead node comes from the link
        by_id = {msg.metadata.message_id: node for node, msg in messages.items()}
        out: dict[int, Reply] = {}
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            if reply.has_error():
                out[node] = Reply(error=f"{reply.error.reason} (code {reply.error.code})")
            else:
                out[node] = Reply(content=reply.content)
        for node in messages:
            out.setdefault(node, Reply(error=f"no reply within {timeout:.0f} s"))
        return out


@dataclass
class SiteStatus:
    site: str
    status: str = "missing"            # complete | partial | missing | rejected
    run_id: str | None = None
    n_tiles: int = 0
    n_received: int = 0
    bytes_received: int = 0
    audit_verdict: str | None = None
    generator: str | None = None       # the generator's label from the audit ("PixCell-256", "untrained twin")
    conditioning: dict | None = None   # the signed conditioning claim (mode, dp guarantee) from bundle.json
    reason: str | None = None
    failed_files: list[str] = field(default_factory=list)


@dataclass
class PoolReport:
    sites: dict[str, SiteStatus]
    n_pooled: int
    bytes_received: int
    seconds: float
    pool_table: Path
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (manifests, verify, transfer, ...)
    nodes: dict[str, int] = field(default_factory=dict)  # site -> node id of this run (ids change every start)

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
        return {"sites": {k: asdict(v) for k, v in sorted(self.sites.items())}, "n_pooled": self.n_pooled,
                "bytes_received": self.bytes_received, "seconds": round(self.seconds, 3),
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "complete": self.complete, "missing": self.missing, "rejected": self.rejected}


Verifier = Callable[..., Any]  # verify(bundle_dir, *, complete: bool) -> VerifiedBundle-like


def trust_verifier(trust_file: str | Path) -> Verifier:
    """A verifier against the consortium trust file (``pixcell_fed.bundle``).

    ``complete=False`` (before any tile is transferred) checks everything that does not need the tiles: trust
    of the site and its signing key, the recorded hashes of manifest/audit/summary, the site signature, the
    manifest, the audit verdict, and the officer's approval. ``complete=True`` runs the full
    :func:`pixcell_fed.bundle.verify_bundle` once the tiles are in place.
    """
    from pixcell_fed.bundle import load_trust, verify_bundle

    trust = load_trust(trust_file)

    def verify(bundle_dir: Path, *, complete: bool = True):
        return verify_bundle(bundle_dir, trust) if complete else preflight_bundle(bundle_dir, trust)

    return verify


def preflight_bundle(bundle_dir: Path, trust: Any):
    """The checks of ``verify_bundle`` that need no tile: run on the signed files a site sent first."""
    from types import SimpleNamespace

    from pixcell_fed.bundle import layout as L
    from pixcell_fed.bundle.manifest import read_manifest
    from pixcell_fed.bundle.shareable import HASHES_KEY
    from pixcell_fed.errors import VerificationError
    from pixcell_fed.keys import public_key_raw

    def fail(message: str) -> VerificationError:
        return VerificationError(message, hint="do not use this bundle; ask the site for a fresh copy or check the trust file")

    info = L.read_bundle_json(bundle_dir, verifying=True)
    site = info["site"]
    trusted = trust.site(site)
    if trusted is None:
        raise fail(f"site {site!r} named in bundle.json is not in the trust file")
    key, signature = L.read_signature(bundle_dir, L.SITE_SIG, role="site")
    if public_key_raw(key) != public_key_raw(trusted.signing_key):
        raise fail(f"bundle of {site!r} signed by a key that is not the site's trusted signing key")
    for rel in (L.MANIFEST, L.AUDIT, L.SUMMARY_HTML):
        expected = info["files"][rel]
        if expected is not None and (not (bundle_dir / rel).is_file() or sha256_file(bundle_dir / rel) != expected):
            raise fail(f"{rel} does not match the hash bound to the site signature")
    if not L.signature_valid(key, signature, L.statement(info, role="site")):
        raise fail("the site signature does not match bundle.json")
    frame = read_manifest(bundle_dir / L.MANIFEST)
    if frame["run_id"].iloc[0] != info["run_id"] or info["counts"]["tiles"] != len(frame):
        raise fail("the manifest does not match bundle.json (run id or tile count)")
    audit = json.loads((bundle_dir / L.AUDIT).read_text(encoding="ascii"))
    if audit.get("verdict") == "FAIL" or info.get("verdict") == "FAIL":
        raise fail("the audit verdict is FAIL: this synthetic set may not leave the site")
    audited = set(audit.get(HASHES_KEY, []))
    if any(h not in audited for h in frame["sha256"]):
        raise fail("some tiles of the manifest were not audited")
    if info["state"] != L.STATE_APPROVED or not (bundle_dir / L.OFFICER_SIG).is_file():
        raise fail(f"the bundle is not approved (state {info['state']})")
    officer, officer_sig = L.read_signature(bundle_dir, L.OFFICER_SIG, role="officer")
    if public_key_raw(officer) not in {public_key_raw(o) for o in trusted.officers}:
        raise fail(f"the approval was not signed by a privacy officer of site {site!r}")
    if not L.signature_valid(officer, officer_sig, L.statement(info, role="officer")):
        raise fail("the officer's approval signature does not match this bundle")
    return SimpleNamespace(site_name=site, run_id=info["run_id"], tiles=frame, verdict=audit.get("verdict"))


def _safe_relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and not name.startswith(("/", "\\"))


def _audit(bundle_dir: Path) -> dict:
    try:
        data = json.loads((bundle_dir / "audit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _audit_verdict(bundle_dir: Path) -> str | None:
    verdict = _audit(bundle_dir).get("verdict")
    return str(verdict) if verdict is not None else None


def _generator_label(bundle_dir: Path) -> str | None:
    """What generated the bundle's tiles, as its (signed) audit names it: "PixCell-256", "untrained twin", ..."""
    generator = (_audit(bundle_dir).get("identities") or {}).get("generator") or {}
    label = generator.get("label") if isinstance(generator, dict) else None
    return str(label) if label is not None else None


def _conditioning(bundle_dir: Path) -> dict | None:
    """The bundle's signed conditioning claim (validated when bundle.json is read), for the consortium report."""
    from pixcell_fed.bundle.layout import read_bundle_json

    try:
        return read_bundle_json(bundle_dir, verifying=True)["conditioning"]
    except PixcellFedError:
        return None


def _file_ok(path: Path, size: int, digest: str) -> bool:
    return path.is_file() and path.stat().st_size == size and P.sha256_hex(path.read_bytes()) == digest


def pool_bundles(transport: Transport, pool_dir: str | Path, verify: Verifier, *, chunk_bytes: int = 64 << 20,
                 expected_sites: tuple[str, ...] = (), max_attempts: int = 3, timeout: float = 600.0) -> PoolReport:
    """Pool the verified bundles of every connected site into ``pool_dir`` (resumable); see the module docstring."""
    import pandas as pd

    started = time.monotonic()
    pool_dir = Path(pool_dir)
    pool_dir.mkdir(parents=True, exist_ok=True)
    sites: dict[str, SiteStatus] = {name: SiteStatus(site=name, reason="never connected") for name in expected_sites}
    nodes = transport.node_ids()
    log.info("pooling: %d node(s) connected", len(nodes))

    timings = {"manifests": 0.0, "preflight_verify": 0.0, "exchange": 0.0, "check_and_write": 0.0, "final_verify": 0.0}
    # 1. manifests and the bundles' signed files from every node at once
    tick = time.monotonic()
    replies = transport.exchange({n: (P.MSG_MANIFEST, P.request_record()) for n in nodes}, timeout=timeout)
    timings["manifests"] = time.monotonic() - tick
    tick = time.monotonic()
    active: dict[int, dict[str, Any]] = {}
    node_of: dict[str, int] = {}
    claimed: set[str] = set()
    for node in nodes:
        reply = replies.get(node, Reply(error="no reply"))
        if reply.content is None or P.KEY_SITE not in reply.content:
            log.warning("pooling: node %s did not answer the manifest request: %s", node, reply.error or "malformed reply")
            continue
        name = str(reply.content[P.KEY_SITE].get("site-name", ""))
        if name in claimed:  # the first node keeps the name; a second one is ignored and reported
            log.warning("pooling: a second node (%s) claims site name %r; ignored", node, name)
            sites[name].reason = f"a second node also claimed site name {name!r} and was ignored"
            continue
        claimed.add(name)
        status = sites.setdefault(name, SiteStatus(site=name))
        status.reason = None
        try:
            good, bad, _ = P.records_to_files(reply.content)
            if bad:
                raise FederationError(f"corrupt bundle files from {name}: {', '.join(bad)}")
            bundle_dir = _place_bundle(pool_dir, name, good)
            verified = verify(bundle_dir, complete=False)
            if str(verified.site_name) != name:
                raise BundleError(f"node claims site {name!r} but serves a bundle of site {verified.site_name!r}")
        except PixcellFedError as exc:
            status.status = "rejected"
            status.reason = f"bundle verification failed: {exc.message}"
            log.warning("pooling: site %s rejected: %s", name, exc.message)
            continue
        manifest = verified.tiles.reset_index(drop=True)
        status.run_id = str(verified.run_id)
        status.n_tiles = int(len(manifest))
        status.audit_verdict = _audit_verdict(bundle_dir)
        status.generator = _generator_label(bundle_dir)
        status.conditioning = _conditioning(bundle_dir)
        node_of[name] = node
        active[node] = {"name": name, "dir": bundle_dir, "manifest": manifest, "verified": verified,
                        "attempts": {}, "pending": []}

    timings["preflight_verify"] = time.monotonic() - tick
    # 2. what is still to fetch (resume: files already on disk with the signed hash are not asked again)
    for state in active.values():
        tiles_dir = state["dir"] / "tiles"
        for stale in tiles_dir.glob(".*.part"):  # a write cut short by a crash
            stale.unlink()
        state["pending"] = [(str(r.file_name), int(r.size), str(r.sha256)) for r in state["manifest"].itertuples()
                            if not _file_ok(tiles_dir / str(r.file_name), int(r.size), str(r.sha256))]
        st = sites[state["name"]]
        st.n_received = st.n_tiles - len(state["pending"])
        if st.n_received:
            log.info("pooling: %s has %d/%d tiles from an earlier run", st.site, st.n_received, st.n_tiles)

    # 3. chunks: one request per site per round, all sites at once, until done or out of attempts
    bytes_received = 0
    while True:
        requests: dict[int, tuple[str, RecordDict]] = {}
        batches: dict[int, list[tuple[str, int, str]]] = {}
        for node, state in active.items():
            batch, size = [], 0
            for item in state["pending"]:
                if state["attempts"].get(item[0], 0) >= max_attempts:
                    continue
                if batch and size + item[1] > chunk_bytes:
                    break
                batch.append(item)
                size += item[1]
            if batch:
                batches[node] = batch
                requests[node] = (P.MSG_CHUNK, P.request_record(files=[b[0] for b in batch]))
        if not requests:
            break
        tick = time.monotonic()
        replies = transport.exchange(requests, timeout=timeout)
        timings["exchange"] += time.monotonic() - tick
        tick = time.monotonic()
        for node, batch in batches.items():
            state = active[node]
            st = sites[state["name"]]
            reply = replies.get(node, Reply(error="no reply"))
            if reply.content is None:
                st.status, st.reason = "missing", f"dropped out during transfer: {reply.error}"
                log.warning("pooling: site %s dropped out: %s", st.site, reply.error)
                state["pending_at_drop"] = True
                continue
            try:
                good, _bad, _missing = P.records_to_files(reply.content)
            except FederationError:
                good = {}
            arrived = set()
            for name, size, digest in batch:
                blob = good.get(name)
                # the signed manifest's hash is the authority, not the reply's own hash list
                if blob is not None and len(blob) == size and P.sha256_hex(blob) == digest:
                    _write_tile(state["dir"] / "tiles" / name, blob)
                    arrived.add(name)
                    bytes_received += size
                    st.bytes_received += size
                else:
                    state["attempts"][name] = state["attempts"].get(name, 0) + 1
            state["pending"] = [it for it in state["pending"] if it[0] not in arrived]
            st.n_received = st.n_tiles - len(state["pending"])
            if len(arrived) < len(batch):
                log.warning("pooling: %d of %d tiles from %s missing or corrupt; asking again", len(batch) - len(arrived), len(batch), st.site)
        for node in [n for n, s in active.items() if s.get("pending_at_drop")]:
            del active[node]
        timings["check_and_write"] += time.monotonic() - tick

    tick = time.monotonic()

    # 4. outcome per site; the complete bundles are verified once more with their tiles in place
    for state in active.values():
        st = sites[state["name"]]
        if state["pending"]:
            st.status = "partial"
            st.failed_files = sorted(it[0] for it in state["pending"])
            st.reason = f"{len(state['pending'])} tile(s) failed after {max_attempts} attempts"
            continue
        try:
            verify(state["dir"], complete=True)
        except PixcellFedError as exc:
            st.status, st.reason = "rejected", f"bundle verification failed after transfer: {exc.message}"
            continue
        st.status = "complete"
    timings["final_verify"] = time.monotonic() - tick

    rows = []
    for state in list(active.values()):
        st = sites[state["name"]]
        if st.status != "complete":
            continue
        m = state["manifest"]
        for r in m.itertuples():
            rel = (state["dir"] / "tiles" / str(r.file_name)).relative_to(pool_dir)
            rows.append({"file_name": str(r.file_name), "site": st.site, "bundle_run_id": st.run_id,
                         "label": getattr(r, "label", None), "sha256": str(r.sha256), "size": int(r.size),
                         "path": rel.as_posix(), "generator": _opt(r, "generator"), "encoder": _opt(r, "encoder")})
    # also keep complete sites of earlier runs that did not connect this time (their verified tiles are on disk)
    connected = {state["name"] for state in active.values()} | {n for n, st in sites.items() if st.status == "rejected" or st.run_id}
    rows.extend(_earlier_rows(pool_dir, sites, connected))
    columns = ["file_name", "site", "bundle_run_id", "label", "sha256", "size", "path", "generator", "encoder"]
    frame = pd.DataFrame(rows, columns=columns)
    write_parquet_atomic(pool_dir / POOL_TABLE, frame)
    report = PoolReport(sites=sites, n_pooled=len(frame), bytes_received=bytes_received,
                        seconds=time.monotonic() - started, pool_table=pool_dir / POOL_TABLE, timings=timings,
                        nodes={s: n for s, n in node_of.items() if sites[s].status == "complete"})
    write_json_atomic(pool_dir / POOL_STATE, report.to_dict())
    log.info("pooling: %d tiles pooled; complete %s; missing %s; rejected %s", report.n_pooled, report.complete,
             report.missing, report.rejected)
    return report


def _write_tile(path: Path, data: bytes) -> None:
    """Write a received tile (temporary name, then rename) without an fsync per file: a tile torn by a crash
    fails its signed sha256 when the pooling resumes and is simply asked for again."""
    import os

    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _opt(row: Any, name: str) -> str | None:
    value = getattr(row, name, None)
    return None if value is None or value != value else str(value)


def _earlier_rows(pool_dir: Path, sites: dict[str, SiteStatus], connected: set[str]) -> list[dict]:
    """Rows of sites pooled completely in an earlier run that did not connect now: kept, if still intact."""
    import pandas as pd

    table = pool_dir / POOL_TABLE
    if not table.is_file():
        return []
    old = pd.read_parquet(table)
    keep = old[~old["site"].isin(list(connected))]
    rows = [r for r in keep.to_dict("records") if _file_ok(pool_dir / r["path"], int(r["size"]), str(r["sha256"]))]
    for site in sorted({r["site"] for r in rows}):
        n = sum(r["site"] == site for r in rows)
        run_id = next(r["bundle_run_id"] for r in rows if r["site"] == site)
        sites[site] = SiteStatus(site=site, status="complete", run_id=run_id, n_tiles=n, n_received=n,
                                 audit_verdict=_audit_verdict(pool_dir / "bundles" / site / str(run_id)),
                                 generator=_generator_label(pool_dir / "bundles" / site / str(run_id)),
                                 conditioning=_conditioning(pool_dir / "bundles" / site / str(run_id)),
                                 reason="pooled in an earlier run; not connected now")
        log.info("pooling: keeping %d tiles of %s pooled in an earlier run", n, site)
    return rows


def _place_bundle(pool_dir: Path, site: str, files: dict[str, bytes]) -> Path:
    """Write a site's signed bundle files under ``bundles/<site>/<run_id>/`` (keeping tiles already there)."""
    for name in files:
        if not _safe_relative(name) or Path(name).parts[0] == "tiles":
            raise BundleError(f"site {site} sent a bundle file with an unsafe name: {name!r}")
    if "bundle.json" not in files or "manifest.parquet" not in files:
        raise BundleError(f"site {site} sent no bundle.json or manifest.parquet")
    try:
        run_id = str(json.loads(files["bundle.json"].decode("utf-8")).get("run_id", "")) or "unknown"
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"site {site} sent an unreadable bundle.json: {exc}") from exc
    if not _safe_relative(run_id) or len(Path(run_id).parts) != 1:
        raise BundleError(f"site {site} sent an unsafe run id {run_id!r}")
    bundle_dir = pool_dir / "bundles" / site / run_id
    # a changed manifest invalidates tiles of an earlier transfer of the same run id
    old_manifest = bundle_dir / "manifest.parquet"
    if old_manifest.is_file() and old_manifest.read_bytes() != files["manifest.parquet"] and (bundle_dir / "tiles").is_dir():
        shutil.rmtree(bundle_dir / "tiles")
    for name, blob in files.items():
        write_bytes_atomic(bundle_dir / name, blob)
    (bundle_dir / "tiles").mkdir(parents=True, exist_ok=True)
    return bundle_dir
