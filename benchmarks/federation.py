"""Federation benchmark: pooling ~300 MB from three sites over the locked-down loopback Flower deployment (TLS,
site authentication, names from keys, the coordinator's Fleet front, the sites' pinned launchers) against a plain
loopback HTTP copy of the same bytes, and the classifier recipe's training throughput against a bare timm training
loop on the same tiles.

Run from the repository root::

    python -m benchmarks.federation                     # ~303 MB (3 x ~100 MB); target: pooling <= 6x the copy
    python -m benchmarks.federation --megabytes 1500    # the 1.5 GB run (pooling only; its own section)
    python -m benchmarks.federation --quick             # ~30 MB smoke run, printed, never recorded

The pooling figures come from the coordinator's own ``pool_state.json``: seconds per phase (manifest round, data
round, preflight, tile checks and writes, final verification), request rounds, messages and bytes. The last line
printed is one JSON object; the figures are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

SITES = ("alpha", "beta", "gamma")


def benchmark_tiles(n: int, *, size: int = 256, seed: int = 0):
    """``n`` unique labelled RGB tiles: random crops of the real slide with light noise (PNG ~150 kB each)."""
    import numpy as np
    import openslide

    from pixcell_fed.testing.real_slide import real_slide_path

    rng = np.random.default_rng(seed)
    with openslide.OpenSlide(str(real_slide_path())) as slide:
        w, h = slide.dimensions
        region = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    out = []
    for _ in range(n):
        y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        tile = region[y:y + size, x:x + size].astype(np.int16) + rng.integers(-6, 7, (size, size, 3))
        tile = np.clip(tile, 0, 255).astype(np.uint8)
        out.append((tile, "dense" if float((tile.mean(axis=2) < 150).mean()) > 0.25 else "sparse"))
    return out


def http_copy(dirs: dict[str, Path], dest: Path) -> tuple[float, int]:
    """Copy every tile of each site's folder over loopback HTTP (one server + one client thread per site)."""
    import functools
    import http.server
    import urllib.request

    servers, total = [], 0
    for site, folder in dirs.items():
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a, **k: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((site, folder, server))
    sizes: dict[str, int] = {}

    def fetch(site: str, folder: Path, port: int) -> None:
        n = 0
        (dest / site).mkdir(parents=True, exist_ok=True)
        for name in sorted(p.name for p in folder.iterdir()):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}") as resp:
                data = resp.read()
            (dest / site / name).write_bytes(data)
            n += len(data)
        sizes[site] = n

    start = time.perf_counter()
    threads = [threading.Thread(target=fetch, args=(s, f, srv.server_address[1])) for s, f, srv in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for _, _, srv in servers:
        srv.shutdown()
        srv.server_close()
    total = sum(sizes.values())
    return seconds, total


def deployment_pool(root: Path, bundles: dict[str, Path], trust: Path, chunk_mb: float) -> dict:
    """Run the coordinator app over the locked-down deployment the sites run: 'coordinator serve' (SuperLink on
    loopback behind the Fleet front), 'coordinator register-site''s key check, three 'site-agent serve' (SuperNode
    in process isolation + the pinned launcher). Each site's authentication key goes into the trust file first
    (names come from keys). Returns the pool state and the wall time."""
    import sys

    import yaml

    from pixcell_fed.bundle.trust import add_site_to_trust_file, load_trust
    from pixcell_fed.federation import deployment as D
    from pixcell_fed.federation.app_bundle import app_sha256
    from pixcell_fed.federation.services import start_coordinator_serve

    flwr_home, logs, work, certs = root / "flwr_home", root / "logs", root / "coordinator", root / "certs"
    env = {**D.flower_env(flwr_home), "PIXCELL_FED_NO_PROGRESS": "1"}
    entries = yaml.safe_load(trust.read_text())["sites"]
    keys = {site: D.make_site_auth_key(root / "keys", site) for site in bundles}
    for site in bundles:
        add_site_to_trust_file(trust, site, signing_key=entries[site]["signing_key"], officers=entries[site]["officers"],
                               auth_key=keys[site][1].read_text())
    port, internal = D.free_port(), D.free_port()
    procs = []
    try:
        procs.append(start_coordinator_serve(certs, port=port, internal_port=internal, env=env, log_path=logs / "serve.log"))
        store, pin = load_trust(trust), app_sha256()
        for site, bundle in bundles.items():
            D.register_site(keys[site][1], site, trust=store, superlink=f"127.0.0.1:{internal}", ca_cert=certs / "ca.crt",
                            flwr_home=flwr_home, connection="bench")
            config = root / f"{site}.yaml"
            config.write_text(yaml.safe_dump({
                "site": {"name": site, "work_dir": str(bundle.parents[2])},
                "federation": {"superlink": f"127.0.0.1:{port}", "root_certificates": str(certs / "ca.crt"),
                               "auth_private_key": str(keys[site][0]), "port": D.free_port(), "bundle_dir": str(bundle),
                               "app_sha256": pin}}))
            procs.append(D.Process(f"site-{site}", [sys.executable, "-m", "site_agent.cli", "serve", "--config", str(config)],
                                   log_path=logs / f"site-{site}.log", env=env))
        settings = D.write_run_config(root / "run.toml", {
            "work-dir": str(work), "trust-file": str(trust), "expected-sites": ",".join(bundles), "min-sites": len(bundles),
            "chunk-mb": chunk_mb, "arch": "vit_tiny_patch16_224", "img-size": 32, "epochs": 1, "evaluate": False,
            "model-kwargs": json.dumps({"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})})
        start = time.perf_counter()
        proc = D.flwr_run("bench", flwr_home=flwr_home, run_config_file=settings, timeout=3600)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    finally:
        for p in reversed(procs):
            p.stop()
    state = json.loads((work / "pool" / "pool_state.json").read_text())
    if state["complete"] != sorted(bundles):
        raise RuntimeError(f"pooling did not complete every site: {json.dumps(state['sites'])[:3000]}")
    return {"pool_seconds": state["seconds"], "run_wall_seconds": wall, "bytes": state["bytes_received"],
            "timings": state["timings"], "traffic": state["traffic"], "pool_dir": str(work / "pool")}


def make_bundles(root: Path, per_site: int) -> tuple[dict[str, Path], Path]:
    """Approved bundles of ``per_site`` tiles per site and the trust file (signing and officer keys)."""
    import yaml

    from pixcell_fed.testing.federation import build_test_bundle

    bundles, trust = {}, {}
    for i, site in enumerate(SITES):
        tiles = benchmark_tiles(per_site, seed=i)
        run_id = f"run-{site}-1"  # the bundle sits where synthesize puts it, so serving it is logged as an export
        bundles[site], trust[site] = build_test_bundle(root / site / "work" / "runs" / run_id / "bundle", site, run_id,
                                                       tiles, root / site / "scratch")
    (root / "trust.yaml").write_text(yaml.safe_dump({"sites": trust}))
    return bundles, root / "trust.yaml"


def training_throughput(pool_dir: Path, n: int, img_size: int, batch: int, repeats: int = 2) -> dict:
    """Images/s of the classifier recipe vs a bare timm loop (same model, data, resize, batch size; 1 epoch each,
    timed from model creation; the recipe also writes its resumable state and checkpoint).

    The two alternate ``repeats`` times and the best of each counts, because the machine is shared.
    """
    import shutil

    import numpy as np
    import timm
    import torch
    from PIL import Image

    from pixcell_fed.training.classifier import ClassifierConfig, train_classifier
    from pixcell_fed.training.data import pooled_items

    items = list(pooled_items(pool_dir))[:n]
    kwargs = {"patch_size": 16, "depth": 4, "embed_dim": 192, "num_heads": 3}
    cfg = ClassifierConfig(arch="vit_tiny_patch16_224", kwargs=kwargs, img_size=img_size, epochs=1, batch_size=batch,
                           val_fraction=0.0, lr=1e-3)
    classes = sorted({lab for _, lab in items})
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def recipe() -> float:
        out = pool_dir.parent / "bench_ckpt"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        train_classifier(items, out, cfg)
        return time.perf_counter() - start

    def bare() -> float:  # timed like the recipe: model creation to the end of the epoch
        start = time.perf_counter()
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(classes), img_size=img_size, **kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            arrays = [np.array(Image.open(p).convert("RGB").resize((img_size, img_size), Image.BILINEAR)) for p, _ in chunk]
            x = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255) - mean) / std
            y = torch.tensor([classes.index(lab) for _, lab in chunk])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return time.perf_counter() - start

    recipe_s = bare_s = float("inf")
    for _ in range(repeats):
        recipe_s = min(recipe_s, recipe())
        bare_s = min(bare_s, bare())
    return {"train_images": len(items), "recipe_images_per_s": len(items) / recipe_s, "bare_images_per_s": len(items) / bare_s,
            "recipe_vs_bare": bare_s / recipe_s}


def _table(figures: dict, fed: dict, train: dict | None) -> str:
    mb = figures["megabytes"]
    rows = ["| measure | pixcell-fed | baseline | ratio |", "|---|---|---|---|",
            f"| pool {mb:.0f} MB from 3 sites (s) | {figures['flower_pool_s']} (Flower, TLS + auth + Fleet front, verified) | "
            f"{figures['http_copy_s']} (loopback HTTP copy) | {figures['pool_vs_http_time_ratio']}x (target <= 6x) |"]
    if train:
        rows.append(f"| training throughput (images/s, ViT 4-layer, 64 px) | {figures['recipe_images_per_s']} "
                    f"(classifier recipe) | {figures['bare_timm_images_per_s']} (bare timm loop) | {figures['recipe_vs_bare']}x |")
    phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(fed["timings"].items()))
    traffic = fed["traffic"]
    return "\n".join(rows) + (
        f"\n\nPooling in {traffic.get('rounds')} request rounds: {traffic.get('messages_manifest', 0)} manifest and "
        f"{traffic.get('messages_chunk', 0)} data messages, {traffic.get('bytes', 0) / 1e6:.1f} MB of tiles, at most "
        f"{figures['chunk_mb']:g} MB per message. Seconds per phase: {phases}. The whole `flwr run` (app start, waiting "
        f"for the sites, pooling, a 1-epoch tiny training and the report) took {figures['flower_run_wall_s']} s."
        + (" Training: one epoch each, best of two alternating runs." if train else ""))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.record import record
    from pixcell_fed.bundle.layout import TILES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~30 MB smoke run (printed, not recorded)")
    parser.add_argument("--megabytes", type=float, default=303.0, help="bytes of tiles over the three sites (default 303)")
    parser.add_argument("--chunk-mb", type=float, default=512.0, help="MB of tiles per data message at most")
    args = parser.parse_args(argv)
    megabytes = 30.0 if args.quick else args.megabytes
    per_site = max(1, round(megabytes * 1e6 / len(SITES) / 129_500))  # ~130 kB per noisy 256 px PNG
    large = megabytes > 600
    with tempfile.TemporaryDirectory(prefix="pixcell-fed-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        bundles, trust = make_bundles(root, per_site)
        total_bytes = sum(p.stat().st_size for b in bundles.values() for p in (b / TILES).iterdir())
        print(f"prepared {len(SITES)} bundles, {total_bytes / 1e6:.1f} MB, in {time.perf_counter() - t0:.0f} s", flush=True)
        http_s, _ = http_copy({s: b / TILES for s, b in bundles.items()}, root / "http_copy")
        print(f"http copy: {total_bytes / 1e6:.1f} MB in {http_s:.2f} s", flush=True)
        fed = deployment_pool(root, bundles, trust, args.chunk_mb)
        print(f"flower pool: {fed['bytes'] / 1e6:.1f} MB in {fed['pool_seconds']:.2f} s (run {fed['run_wall_seconds']:.1f} s); "
              f"phases {fed['timings']}; traffic {fed['traffic']}", flush=True)
        train = None if large else training_throughput(Path(fed["pool_dir"]), 128 if args.quick else 512, 64, 32)
    mb = total_bytes / 1e6
    figures = {
        "quick": args.quick, "sites": len(SITES), "tiles": per_site * len(SITES), "megabytes": round(mb, 1),
        "chunk_mb": args.chunk_mb, "flower_pool_s": round(fed["pool_seconds"], 2),
        "flower_pool_mb_per_s": round(mb / fed["pool_seconds"], 1), "flower_run_wall_s": round(fed["run_wall_seconds"], 1),
        "flower_pool_phases_s": fed["timings"], "flower_pool_traffic": fed["traffic"],
        "http_copy_s": round(http_s, 2), "http_mb_per_s": round(mb / http_s, 1),
        "pool_vs_http_time_ratio": round(fed["pool_seconds"] / http_s, 2),
    }
    if train:
        figures.update({"train_images": train["train_images"], "recipe_images_per_s": round(train["recipe_images_per_s"], 1),
                        "bare_timm_images_per_s": round(train["bare_images_per_s"], 1),
                        "recipe_vs_bare": round(train["recipe_vs_bare"], 2)})
    command = "python -m benchmarks.federation" + (" --quick" if args.quick else "") \
        + (f" --megabytes {args.megabytes:g}" if args.megabytes != 303.0 and not args.quick else "") \
        + (f" --chunk-mb {args.chunk_mb:g}" if args.chunk_mb != 512.0 else "")
    headline = f"pooling {mb:.0f} MB over Flower {figures['pool_vs_http_time_ratio']}x the time of a loopback HTTP copy"
    if train:
        headline += f"; training {figures['recipe_vs_bare']}x a bare timm loop"
    record(name="federation_large" if large else "federation",
           title=f"Federation: pooling {mb:.0f} MB over Flower vs HTTP" + ("" if large else ", training throughput"),
           command=command, figures=figures, table_md=_table(figures, fed, train), headline=headline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
