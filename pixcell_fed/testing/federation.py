"""Test material for the federation: real-pixel labelled tiles, bundles, and an in-memory Flower stand-in.

* :func:`real_labelled_tiles` crops tiles from the real H&E slide and labels them by how much of the tile is
  tissue-dark ("dense" / "sparse"), a label a small model can learn from real pixels.
* :class:`FakeTransport` answers pooling requests by calling the real site handlers of ``site_server`` in
  process, with faults on demand: corrupt a reply, or make a site vanish after some chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import RecordDict

    from pixcell_fed.federation.pooling import Reply
    from pixcell_fed.federation.site_server import SiteSettings

TINY_VIT = {"arch": "vit_tiny_patch16_224", "img_size": 32,
            "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}}


def real_labelled_tiles(n: int, *, size: int = 64, seed: int = 0, offset: int = 0) -> list[tuple["np.ndarray", str]]:
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
            tile = region[y:y + size, x:x + size]
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


def write_labelled_folder(folder: str | Path, tiles: Sequence[tuple["np.ndarray", str]], *, prefix: str = "t") -> Path:
    """Write tiles as ``folder/<label>/<prefix><i>.png`` (the eval/train layout sites use)."""
    from PIL import Image

    folder = Path(folder)
    for i, (pixels, label) in enumerate(tiles):
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / label / f"{prefix}{i:05d}.png")
    return folder


@dataclass
class FakeTransport:
    """An in-memory stand-in for Flower's Grid: node id -> site, answered by the real site handlers.

    ``corrupt_once``: names of sites whose first chunk reply has one flipped byte. ``drop_after``: site name ->
    number of chunk replies after which the site is gone (every later request gets an error reply).
    """

    sites: Mapping[int, "SiteSettings"]
    corrupt_once: set[str] = field(default_factory=set)
    drop_after: dict[str, int] = field(default_factory=dict)
    chunk_requests: dict[str, list[list[str]]] = field(default_factory=dict)
    node_state: dict[str, "RecordDict"] = field(default_factory=dict)  # per site, like a SuperNode's run context

    def node_ids(self) -> list[int]:
        return sorted(self.sites)

    def exchange(self, requests: Mapping[int, tuple[str, "RecordDict"]], *, timeout: float) -> dict[int, "Reply"]:
        import numpy as np
        from flwr.app import Array, ArrayRecord

        from pixcell_fed.federation import protocol as P
        from pixcell_fed.federation import site_server
        from pixcell_fed.federation.pooling import Reply

        out = {}
        for node, (kind, content) in requests.items():
            site = self.sites[node]
            served = self.chunk_requests.setdefault(site.site_name, [])
            if site.site_name in self.drop_after and len(served) >= self.drop_after[site.site_name]:
                out[node] = Reply(error="node is offline (fake)")
                continue
            if kind == P.MSG_MANIFEST:
                out[node] = Reply(content=site_server.handle_manifest(content, site))
            elif kind == P.MSG_CHUNK:
                served.append(list(content[P.KEY_REQUEST]["files"]))
                reply = site_server.handle_chunk(content, site)
                if site.site_name in self.corrupt_once:
                    self.corrupt_once.discard(site.site_name)
                    data = reply[P.KEY_DATA][P.ARRAY_NAME].numpy().copy()
                    data[len(data) // 2] ^= 0xFF
                    reply[P.KEY_DATA] = ArrayRecord({P.ARRAY_NAME: Array(np.ascontiguousarray(data))})
                out[node] = Reply(content=reply)
            elif kind == P.MSG_EVALUATE:
                out[node] = Reply(content=site_server.handle_evaluate(content, site))
            elif kind == P.MSG_TRAIN:
                from flwr.app import RecordDict

                state = self.node_state.setdefault(site.site_name, RecordDict())
                out[node] = Reply(content=site_server.handle_train(content, site, state))
            else:
                out[node] = Reply(error=f"unsupported message type {kind}")
        return out


# ----------------------------------------------------------------------------------------------- site bundles

@dataclass(frozen=True)
class SiteFixture:
    name: str
    run_id: str
    bundle_dir: Path
    eval_dir: Path
    train_dir: Path


@dataclass
class SiteBundles:
    """Approved bundles of several test sites, their held-out folders, and how to verify them."""

    root: Path
    sites: list[SiteFixture]
    trust_file: Path

    @property
    def by_name(self) -> dict[str, SiteFixture]:
        return {s.name: s for s in self.sites}

    def verify(self, bundle_dir: Path, *, complete: bool = True):
        from pixcell_fed.federation.pooling import trust_verifier

        return trust_verifier(self.trust_file)(bundle_dir, complete=complete)

    def tampered_copy(self, dest: Path, name: str) -> Path:
        """A copy of site ``name``'s bundle whose manifest was altered after signing."""
        import shutil

        import pandas as pd

        from pixcell_fed.bundle.manifest import manifest_bytes

        shutil.copytree(self.by_name[name].bundle_dir, dest)
        frame = pd.read_parquet(dest / "manifest.parquet")
        frame.loc[0, "label"] = "dense" if frame.loc[0, "label"] != "dense" else "sparse"
        (dest / "manifest.parquet").write_bytes(manifest_bytes(frame))
        return dest


def make_site_bundles(root: str | Path, counts: Mapping[str, int], *, tile_size: int = 64, n_eval: int = 12,
                      n_train: int = 12, seed: int = 0) -> SiteBundles:
    """Approved, signed bundles of real-pixel labelled tiles for the sites in ``counts`` (name -> tile count).

    Tiles are cut from the real slide (stand-ins for synthetic tiles); each site also gets held-out real tiles
    in ``eval/<label>/`` and DP-training tiles in ``train/<label>/``, drawn from a shifted grid.
    """
    root = Path(root)
    total = sum(counts.values())
    pool = real_labelled_tiles(total + len(counts) * (n_eval + n_train), size=tile_size, seed=seed)
    trust_keys: dict[str, str] = {}
    fixtures = []
    pos = 0
    for name, n in counts.items():
        tiles = pool[pos:pos + n]
        pos += n
        site_root = root / name
        eval_dir = write_labelled_folder(site_root / "eval", pool[pos:pos + n_eval], prefix="e")
        pos += n_eval
        train_dir = write_labelled_folder(site_root / "train", pool[pos:pos + n_train], prefix="r")
        pos += n_train
        run_id = f"run-{name}-1"
        # the bundle sits where a site's synthesize run puts it, so that serving it is logged in the site's trail
        bundle_dir, entry = build_test_bundle(site_root / "work" / "runs" / run_id / "bundle", name, run_id, tiles,
                                              site_root / "scratch")
        trust_keys[name] = entry
        fixtures.append(SiteFixture(name, run_id, bundle_dir, eval_dir, train_dir))
    import yaml

    trust_file = root / "trust.yaml"
    trust_file.write_text(yaml.safe_dump({"sites": trust_keys}))
    return SiteBundles(root=root, sites=fixtures, trust_file=trust_file)


def build_test_bundle(bundle_dir: Path, site: str, run_id: str, tiles, tmp: Path):
    """A real bundle (``pixcell_fed.bundle.build_bundle``) of a run at ``bundle_dir``'s parent, approved by a
    real officer key."""
    from pixcell_fed.bundle import SiteAuthority, approve_bundle, build_bundle
    from pixcell_fed.keys import generate_private_key, public_key_text
    from pixcell_fed.testing.bundles import write_run

    run = write_run(Path(bundle_dir).parent.parent.parent, run_id, [pixels for pixels, _ in tiles])
    site_key, officer_key = generate_private_key(), generate_private_key()
    build_bundle(run.run_dir, site_name=site, tiles=run.tiles, tile_size=int(tiles[0][0].shape[0]),
                 labels=[label for _, label in tiles], generator={"name": "pixcell-256", "twin": True},
                 encoder={"name": "uni2-h", "twin": True}, site_key=site_key)
    approve_bundle(bundle_dir, officer_key, site=SiteAuthority(site, run.work_dir, (officer_key.public_key(),)))
    return bundle_dir, {"signing_key": public_key_text(site_key.public_key()),
                        "officers": [public_key_text(officer_key.public_key())]}
