"""Test material for the federation: real-pixel labelled tiles, bundles, and an in-memory Flower stand-in.

* :func:`real_labelled_tiles` crops tiles from the real H&E slide and labels them by how much of the tile is
  tissue-dark ("dense" / "sparse"), a label a small model can learn from real pixels.
* :class:`FakeTransport` answers requests by calling the real site boundary of ``site_server`` in process, with
  the authentication key each node presents, and faults on demand: corrupt a reply, make a site vanish after
  some chunks, rewrite replies as a malicious site would, or present another key or name (impostors).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.federation.transport import PolledExchange

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import RecordDict

    from pixcell_fed.config.schema import FederationEvaluationConfig
    from pixcell_fed.federation.node_identity import NodeIdentity
    from pixcell_fed.federation.site_server import SiteSettings
    from pixcell_fed.federation.transport import Reply, Request

TINY_VIT = {
    "arch": "vit_tiny_patch16_224",
    "img_size": 32,
    "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
}


def real_labelled_tiles(n: int, *, size: int = 64, seed: int = 0, offset: int = 0) -> list[tuple[np.ndarray, str]]:
    """``n`` RGB tiles (uint8 size x size x 3) cut from the real slide, labelled "dense" or "sparse".

    The label is whether the tile's share of dark (nucleus-rich) pixels is above the median over candidate
    tiles, so both classes are about equally frequent. ``offset`` shifts the sampling grid so that two calls
    with different offsets give different tiles (e.g. synthetic stand-ins vs held-out real tiles).
    """
    import numpy as np
    import openslide

    from pixcell_fed.testing.real_slide import real_slide_path

    rng = np.random.default_rng(seed)
    with openslide.OpenSlide(str(real_slide_path())) as slide:
        width, height = slide.dimensions
        region = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    candidates = []
    step = size // 2
    for y in range(offset % step, height - size, step):
        for x in range(offset % step, width - size, step):
            tile = region[y : y + size, x : x + size]
            gray = tile.mean(axis=2)
            if (gray < 220).mean() < 0.5:  # mostly background
                continue
            candidates.append((tile, float((gray < 150).mean())))
    picks = rng.permutation(len(candidates))[: max(n * 3, n)]
    chosen = [candidates[i] for i in picks]
    median = float(np.median([d for _, d in chosen]))
    out = [(np.ascontiguousarray(t), "dense" if d > median else "sparse") for t, d in chosen]
    # balance the classes in the first n
    dense = [o for o in out if o[1] == "dense"]
    sparse = [o for o in out if o[1] == "sparse"]
    mixed = [x for pair in zip(dense, sparse) for x in pair]
    if len(mixed) < n:
        raise ValueError(f"the real slide gives only {len(mixed)} balanced tiles of size {size}")
    return mixed[:n]


def write_labelled_folder(folder: str | Path, tiles: Sequence[tuple[np.ndarray, str]], *, prefix: str = "t") -> Path:
    """Write tiles as ``folder/<label>/<prefix><i>.png`` (the eval/train layout sites use)."""
    from PIL import Image

    folder = Path(folder)
    for i, (pixels, label) in enumerate(tiles):
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / label / f"{prefix}{i:05d}.png")
    return folder


def auth_key_for_tests(site: str) -> str:
    """A site's SuperNode authentication public key for tests (EC P-384, OpenSSH), derived from its name.

    Deterministic, so that the in-memory fake presents the key the trust file of :func:`make_site_bundles` holds
    for the site a node serves. Test material only: anyone can derive it.
    """
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    order = int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16)
    secret = (
        int.from_bytes(hashlib.sha384(f"pixcell-fed test auth key {site}".encode()).digest(), "big") % (order - 1) + 1
    )
    key = ec.derive_private_key(secret, ec.SECP384R1())
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _pem(openssh: str) -> bytes:
    """The PEM form Flower reports in ``NodeInfo.public_key``."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(openssh.encode())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class FakeTransport(PolledExchange):
    """An in-memory stand-in for Flower's Grid: node id -> site, answered by the real site boundary
    (:func:`pixcell_fed.federation.site_server.answer`).

    Each node presents the test authentication key of the site it serves (:func:`auth_key_for_tests`) and is
    registered under that site's name, unless ``keys`` / ``names`` say otherwise (impostors). Messages queue per
    node and a node answers one message per ``pull`` (as a SuperNode runs one message at a time). Faults:
    ``corrupt_once``: sites whose first chunk reply has one flipped byte; ``drop_after``: site -> number of chunk
    replies after which the site is gone; ``tamper(node, kind, reply) -> reply`` rewrites replies (a malicious
    site). ``received`` records the message kinds each node got; ``chunk_requests`` the tiles each site was asked for.
    """

    sites: Mapping[int, SiteSettings]
    corrupt_once: set[str] = field(default_factory=set)
    drop_after: dict[str, int] = field(default_factory=dict)
    chunk_requests: dict[str, list[list[str]]] = field(default_factory=dict)
    node_state: dict[str, RecordDict] = field(default_factory=dict)  # per site, like a SuperNode's run context
    keys: dict[int, str | None] = field(default_factory=dict)  # node -> OpenSSH public key (default: its site's)
    names: dict[int, str] = field(default_factory=dict)  # node -> registered name (default: its site's)
    tamper: Callable[[int, str, RecordDict], RecordDict] | None = None
    flower_run: int = 4242
    received: dict[int, list[str]] = field(default_factory=dict)
    poll_interval_s: float = 0.0
    _queues: dict[int, list] = field(default_factory=dict)
    _answered: dict[str, Reply] = field(default_factory=dict)
    _next_id: int = 0

    def nodes(self) -> list[NodeIdentity]:
        from pixcell_fed.federation.node_identity import NodeIdentity

        out = []
        for node, site in sorted(self.sites.items()):
            key = self.keys.get(node, auth_key_for_tests(site.site_name))
            out.append(
                NodeIdentity(
                    node_id=node, public_key=_pem(key) if key else None, name=self.names.get(node, site.site_name)
                )
            )
        return out

    def push(self, requests: Sequence[Request]) -> list[str | None]:
        ids: list[str | None] = []
        for request in requests:
            if request.node not in self.sites:
                ids.append(None)
                continue
            self._next_id += 1
            message_id = f"m{self._next_id}"
            self._queues.setdefault(request.node, []).append((message_id, request.kind, request.content))
            self.received.setdefault(request.node, []).append(request.kind)
            ids.append(message_id)
        return ids

    def pull(self, message_ids: Collection[str]) -> dict[str, Reply]:
        for node, queue in self._queues.items():
            if queue:
                message_id, kind, content = queue.pop(0)
                self._answered[message_id] = self._answer(node, kind, content)
        return {m: self._answered.pop(m) for m in list(message_ids) if m in self._answered}

    def _answer(self, node: int, kind: str, content: RecordDict) -> Reply:
        from pixcell_fed.federation import protocol as P
        from pixcell_fed.federation import site_server
        from pixcell_fed.federation.transport import Reply, reply_of_content

        site = self.sites[node]
        served = self.chunk_requests.setdefault(site.site_name, [])
        if site.site_name in self.drop_after and len(served) >= self.drop_after[site.site_name]:
            return Reply(error="node is offline (fake)")
        if kind == P.MSG_CHUNK:
            files = content.config_records[P.KEY_REQUEST]["files"]
            served.append([str(n) for n in files] if isinstance(files, list) else [])
        state = self.node_state.setdefault(site.site_name, _record_dict()) if kind == P.MSG_TRAIN else None
        reply = site_server.answer(kind, content, site, flower_run=self.flower_run, state=state)
        if kind == P.MSG_CHUNK and site.site_name in self.corrupt_once and P.KEY_DATA in reply:
            self.corrupt_once.discard(site.site_name)
            reply = _flip_a_byte(reply)
        if self.tamper is not None:
            reply = self.tamper(node, kind, reply)
        return reply_of_content(reply)


def _record_dict() -> RecordDict:
    from flwr.app import RecordDict

    return RecordDict()


def _flip_a_byte(reply: RecordDict) -> RecordDict:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from pixcell_fed.federation import protocol as P

    data = reply.array_records[P.KEY_DATA][P.ARRAY_NAME].numpy().copy()
    data[len(data) // 2] ^= 0xFF
    reply[P.KEY_DATA] = ArrayRecord({P.ARRAY_NAME: Array(np.ascontiguousarray(data))})
    return reply


# ----------------------------------------------------------------------------------------------- site bundles


def evaluation_limits_for_tests() -> FederationEvaluationConfig:
    """The evaluation limits of the test sites: the defaults, with classes small enough for test folders."""
    from pixcell_fed.config.schema import FederationEvaluationConfig

    return FederationEvaluationConfig(min_tiles_per_class=2, max_queries_per_run=10, max_queries_per_day=1000)


@dataclass(frozen=True)
class SiteFixture:
    name: str
    run_id: str
    bundle_dir: Path
    eval_dir: Path
    train_dir: Path
    work_dir: Path
    site_config: Path  # the site's site.yaml (name, work folder, evaluation limits)

    def settings(self, **changes) -> SiteSettings:
        """What the site's SuperNode would tell its ClientApp (``changes`` override fields)."""
        from pixcell_fed.federation.site_server import SiteSettings

        values = {
            "site_name": self.name,
            "bundle_dir": self.bundle_dir,
            "eval_dir": self.eval_dir,
            "train_dir": self.train_dir,
            "evaluation": evaluation_limits_for_tests(),
            "work_dir": self.work_dir,
        }
        return SiteSettings(**{**values, **changes})

    @property
    def node_config(self) -> dict[str, str]:
        """The SuperNode node config of this site (``flower-supernode --node-config``)."""
        from pixcell_fed.federation import protocol as P

        return {
            P.NODE_SITE_NAME: self.name,
            P.NODE_BUNDLE_DIR: str(self.bundle_dir),
            P.NODE_EVAL_DIR: str(self.eval_dir),
            P.NODE_TRAIN_DIR: str(self.train_dir),
            P.NODE_SITE_CONFIG: str(self.site_config),
        }


@dataclass
class SiteBundles:
    """Approved bundles of several test sites, their held-out folders, and how to verify them."""

    root: Path
    sites: list[SiteFixture]
    trust_file: Path

    @property
    def by_name(self) -> dict[str, SiteFixture]:
        return {s.name: s for s in self.sites}

    @property
    def verify(self):
        """A :class:`~pixcell_fed.federation.pooling.TrustVerifier` of the current trust file."""
        from pixcell_fed.federation.pooling import trust_verifier

        return trust_verifier(self.trust_file)

    def transport(self, **options) -> FakeTransport:
        """A fake Flower grid with every site as a node (ids 101, 102, ...), each presenting its own key."""
        return FakeTransport(sites={101 + i: s.settings() for i, s in enumerate(self.sites)}, **options)

    def tampered_copy(self, dest: Path, name: str) -> Path:
        """A copy of site ``name``'s bundle whose manifest was altered after signing."""
        import shutil

        import pandas as pd

        from pixcell_fed.bundle.layout import MANIFEST
        from pixcell_fed.bundle.manifest import manifest_bytes

        shutil.copytree(self.by_name[name].bundle_dir, dest)
        frame = pd.read_parquet(dest / MANIFEST)
        frame.loc[0, "label"] = "dense" if frame.loc[0, "label"] != "dense" else "sparse"
        (dest / MANIFEST).write_bytes(manifest_bytes(frame))
        return dest


def _write_site_yaml(site_root: Path, name: str, work_dir: Path) -> Path:
    import yaml

    from pixcell_fed.config import to_plain

    limits = to_plain(evaluation_limits_for_tests())
    path = site_root / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {"site": {"name": name, "work_dir": str(work_dir)}, "federation": {"evaluation": limits}}, sort_keys=False
        )
    )
    return path


def make_site_bundles(
    root: str | Path,
    counts: Mapping[str, int],
    *,
    tile_size: int = 64,
    n_eval: int = 12,
    n_train: int = 12,
    seed: int = 0,
    auth_keys: Mapping[str, str | Path] | None = None,
    conditioning: Mapping[str, Any] | None = None,
) -> SiteBundles:
    """Approved, signed bundles of real-pixel labelled tiles for the sites in ``counts`` (name -> tile count).

    Tiles are cut from the real slide (stand-ins for synthetic tiles); each site also gets held-out real tiles
    in ``eval/<label>/`` and DP-training tiles in ``train/<label>/``, drawn from a shifted grid, and a
    ``site.yaml``. The trust file holds each site's signing, officer and SuperNode authentication keys:
    ``auth_keys`` (site -> OpenSSH public key text or ``.pub`` file, e.g. keys registered with a real SuperLink),
    else :func:`auth_key_for_tests`. ``conditioning``
    (site -> :class:`~pixcell_fed.privacy.conditioning.ConditioningClaim`)
    puts that claim in a site's audit and signed bundle (default: none stated, i.e. ``exact``).
    """
    root = Path(root)
    total = sum(counts.values())
    pool = real_labelled_tiles(total + len(counts) * (n_eval + n_train), size=tile_size, seed=seed)
    trust_keys: dict[str, dict] = {}
    fixtures = []
    pos = 0
    for name, n in counts.items():
        tiles = pool[pos : pos + n]
        pos += n
        site_root = root / name
        eval_dir = write_labelled_folder(site_root / "eval", pool[pos : pos + n_eval], prefix="e")
        pos += n_eval
        train_dir = write_labelled_folder(site_root / "train", pool[pos : pos + n_train], prefix="r")
        pos += n_train
        run_id = f"run-{name}-1"
        work_dir = site_root / "work"
        # the bundle sits where a site's synthesize run puts it, so that serving it is logged in the site's trail
        bundle_dir, entry = build_test_bundle(
            work_dir / "runs" / run_id / "bundle",
            name,
            run_id,
            tiles,
            site_root / "scratch",
            conditioning=(conditioning or {}).get(name),
        )
        given = (auth_keys or {}).get(name)
        entry["auth_key"] = (
            (Path(given).read_text().strip() if isinstance(given, Path) else str(given).strip())
            if given is not None
            else auth_key_for_tests(name)
        )
        trust_keys[name] = entry
        fixtures.append(
            SiteFixture(
                name, run_id, bundle_dir, eval_dir, train_dir, work_dir, _write_site_yaml(site_root, name, work_dir)
            )
        )
    import yaml

    trust_file = root / "trust.yaml"
    trust_file.write_text(yaml.safe_dump({"sites": trust_keys}))
    return SiteBundles(root=root, sites=fixtures, trust_file=trust_file)


def build_test_bundle(bundle_dir: Path, site: str, run_id: str, tiles, tmp: Path, *, conditioning: Any = None):
    """A real bundle (``pixcell_fed.bundle.build_bundle``) of a run at ``bundle_dir``'s parent, approved by a
    real officer key; ``conditioning``: the run's conditioning claim (none stated when None)."""
    from pixcell_fed.bundle import SiteAuthority, approve_bundle, build_bundle
    from pixcell_fed.keys import generate_private_key, public_key_text
    from pixcell_fed.testing.bundles import audit_for, write_run

    arrays = [pixels for pixels, _ in tiles]
    audit = None if conditioning is None else {**audit_for(arrays), "conditioning": conditioning.to_record()}
    run = write_run(Path(bundle_dir).parent.parent.parent, run_id, arrays, audit=audit)
    site_key, officer_key = generate_private_key(), generate_private_key()
    build_bundle(
        run.run_dir,
        site_name=site,
        tiles=run.tiles,
        tile_size=int(tiles[0][0].shape[0]),
        labels=[label for _, label in tiles],
        generator={"name": "pixcell-256", "twin": True},
        encoder={"name": "uni2-h", "twin": True},
        site_key=site_key,
    )
    approve_bundle(bundle_dir, officer_key, site=SiteAuthority(site, run.work_dir, (officer_key.public_key(),)))
    return bundle_dir, {
        "signing_key": public_key_text(site_key.public_key()),
        "officers": [public_key_text(officer_key.public_key())],
    }
