"""Test material for bundles: small tiles of real H&E pixels, a matching shareable audit, keys and a trust store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pixcell_fed.hashing import sha256_bytes, sha256_file

GENERATOR = {"name": "pixcell-256", "variant": 256, "transformer_sha256": "a" * 64, "vae_sha256": "b" * 64, "twin": True}
ENCODER = {"name": "uni2-h", "architecture": "vit_giant_patch14_224", "dim": 1536, "weights_sha256": "c" * 64}


def real_tile_arrays(n: int, size: int = 48) -> list[np.ndarray]:
    """``n`` (at most 64) distinct uint8 RGB crops of real tissue from the CMU-1-Small-Region slide."""
    import openslide

    from pixcell_fed.testing.real_slide import real_slide_path

    with openslide.OpenSlide(str(real_slide_path())) as slide:
        region = slide.read_region((768, 1920), 0, (size * 8, size * 8)).convert("RGB")  # a tissue-rich area
    pixels = np.asarray(region, dtype=np.uint8)
    tiles = []
    for i in range(n):
        r, c = divmod(i, 8)
        tiles.append(np.ascontiguousarray(pixels[r * size:(r + 1) * size, c * size:(c + 1) * size]))
    return tiles


def write_tiles(folder: Path, arrays: Sequence[np.ndarray], *, stem: str = "synthetic_tile", text_chunks: dict | None = None) -> list[Path]:
    """Write arrays as PNGs named ``<stem>_<i>.png``, optionally with tEXt/iTXt/zTXt chunks (as a careless writer would)."""
    from PIL import Image, PngImagePlugin

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(arrays):
        path = folder / f"{stem}_{i:03d}.png"
        info = None
        if text_chunks:
            info = PngImagePlugin.PngInfo()
            for j, (key, value) in enumerate(text_chunks.items()):
                if j % 3 == 0:
                    info.add_text(key, value)
                elif j % 3 == 1:
                    info.add_text(key, value, zip=True)
                else:
                    info.add_itxt(key, value, zip=True)
        Image.fromarray(array).save(path, pnginfo=info)
        paths.append(path)
    return paths


def audit_for(arrays: Sequence[np.ndarray], verdict: str = "PASS") -> dict:
    """A shareable audit summary covering ``arrays`` (hashes of their clean re-encoding)."""
    from pixcell_fed.bundle.png import clean_png_bytes

    return {
        "format_version": 1,
        "verdict": verdict,
        "sizes": {"S": len(arrays), "T": len(arrays), "H": len(arrays)},
        "tests": {"copy_detection": {"status": "PASS", "statistic": 0.41, "threshold": 0.9,
                                     "provenance": "SSCD copy threshold (Pizzi et al. 2022)",
                                     "sentence": f"0 of {len(arrays)} synthetic tiles exceed the copy threshold"}},
        "identities": {"generator": dict(GENERATOR), "encoder": dict(ENCODER)},
        "figures": {"nn_histogram": {"bins": [0.0, 0.25, 0.5, 0.75, 1.0], "s_to_t": [0, 1, 2, 1], "h_to_t": [0, 2, 1, 1]}},
        "kept_sha256": sorted(sha256_bytes(clean_png_bytes(a)) for a in arrays),
    }


@dataclass
class Consortium:
    """Keys of two sites with one officer each, and their trust store."""

    site_keys: dict
    officer_keys: dict
    trust: object


def consortium(names: Sequence[str] = ("site-a", "site-b")) -> Consortium:
    from pixcell_fed.bundle.trust import TrustedSiteEntry, TrustFile, trust_from_entries
    from pixcell_fed.keys import generate_private_key, public_key_text

    site_keys = {n: generate_private_key() for n in names}
    officer_keys = {n: generate_private_key() for n in names}
    entries = {n: TrustedSiteEntry(signing_key=public_key_text(site_keys[n].public_key()),
                                   officers=(public_key_text(officer_keys[n].public_key()),)) for n in names}
    return Consortium(site_keys, officer_keys, trust_from_entries(TrustFile(sites=entries)))


def force_verdict(bundle, verdict: str, site_key) -> None:
    """Rewrite a bundle's audit verdict and re-sign it with the site key: what a misbehaving site could do."""
    import json

    from pixcell_fed.bundle import layout as L
    from pixcell_fed.bundle.build import audit_json_text, write_site_signature

    audit = json.loads((bundle / L.AUDIT).read_text())
    audit["verdict"] = verdict
    (bundle / L.AUDIT).write_text(audit_json_text(audit))
    info = L.read_bundle_json(bundle)
    info["verdict"] = verdict
    info["files"][L.AUDIT] = sha256_file(bundle / L.AUDIT)
    L.write_bundle_json(bundle, info)
    write_site_signature(bundle, site_key)
