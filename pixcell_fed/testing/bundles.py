"""Test material for bundles: small tiles of real H&E pixels, a run folder with its audit, keys and a trust store.

A bundle is always its run's: :func:`write_run` lays out ``<work>/runs/<run_id>/`` as synthesize does (canonical
synthetic tiles, ``audit/audit_summary.json``, optionally ``run.json`` and a summary page), and
:func:`build_run_bundle` builds (and approves) the bundle of such a run with real keys.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixcell_fed.hashing import sha256_bytes, sha256_file

GENERATOR = {
    "name": "pixcell-256",
    "variant": 256,
    "transformer_sha256": "a" * 64,
    "vae_sha256": "b" * 64,
    "twin": True,
}
ENCODER = {"name": "uni2-h", "architecture": "vit_giant_patch14_224", "dim": 1536, "weights_sha256": "c" * 64}
TILE_SIZE = 48


def real_tile_arrays(n: int, size: int = TILE_SIZE) -> list[np.ndarray]:
    """``n`` (at most 64) distinct uint8 RGB crops of real tissue from the CMU-1-Small-Region slide."""
    import openslide

    from pixcell_fed.testing.real_slide import real_slide_path

    with openslide.OpenSlide(str(real_slide_path())) as slide:
        region = slide.read_region((768, 1920), 0, (size * 8, size * 8)).convert("RGB")  # a tissue-rich area
    pixels = np.asarray(region, dtype=np.uint8)
    tiles = []
    for i in range(n):
        r, c = divmod(i, 8)
        tiles.append(np.ascontiguousarray(pixels[r * size : (r + 1) * size, c * size : (c + 1) * size]))
    return tiles


def write_tiles(
    folder: Path, arrays: Sequence[np.ndarray], *, stem: str = "synthetic_tile", text_chunks: dict | None = None
) -> list[Path]:
    """Write arrays as PNGs named ``<stem>_<i>.png``: canonical (as synthesize writes them) or, with
    ``text_chunks``, through PIL with tEXt/iTXt/zTXt chunks (as a careless writer would)."""
    from PIL import Image, PngImagePlugin

    from pixcell_fed.bundle.png import clean_png_bytes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, array in enumerate(arrays):
        path = folder / f"{stem}_{i:03d}.png"
        if not text_chunks:
            path.write_bytes(clean_png_bytes(array))
        else:
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
    """A shareable audit summary keeping ``arrays`` (hashes of their canonical encoding)."""
    from pixcell_fed.bundle.png import clean_png_bytes

    return {
        "format_version": 1,
        "verdict": verdict,
        "sizes": {"S": len(arrays), "T": len(arrays), "H": len(arrays)},
        "tests": {
            "copy_detection": {
                "status": "PASS",
                "statistic": 0.41,
                "threshold": 0.9,
                "provenance": "SSCD copy threshold (Pizzi et al. 2022)",
                "sentence": f"0 of {len(arrays)} synthetic tiles exceed the copy threshold",
            }
        },
        "identities": {"generator": dict(GENERATOR), "encoder": dict(ENCODER)},
        "figures": {
            "nn_histogram": {"bins": [0.0, 0.25, 0.5, 0.75, 1.0], "s_to_t": [0, 1, 2, 1], "h_to_t": [0, 2, 1, 1]}
        },
        "kept_sha256": sorted(sha256_bytes(clean_png_bytes(a)) for a in arrays),
    }


def inert_summary_html(text: str = "Audit: PASS") -> str:
    """A shareable summary page that passes the inert-HTML rules (policy meta first, no script, no URL)."""
    from pixcell_fed.bundle.html import INERT_CSP_META

    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8">{INERT_CSP_META}<title>Audit</title>'
        f"<style>body {{ font-family: sans-serif }}</style></head><body><h1>{text}</h1>"
        "<p>0 of 5 synthetic tiles exceed the copy threshold.</p>"
        '<img src="data:image/png;base64,iVBORw0KGgo=" alt="histogram"><a href="#top">top</a></body></html>'
    )


@dataclass(frozen=True)
class RunFixture:
    """A run folder as synthesize leaves it: its id, folder, synthetic tiles and the audit summary it wrote."""

    run_id: str
    run_dir: Path
    tiles: list[Path]
    audit: dict

    @property
    def work_dir(self) -> Path:
        return self.run_dir.parent.parent


def write_run(
    work_dir: Path,
    run_id: str,
    arrays: Sequence[np.ndarray],
    *,
    verdict: str = "PASS",
    audit: dict | None = None,
    run_json: dict | None = None,
    summary_html: str | None = None,
) -> RunFixture:
    """``<work_dir>/runs/<run_id>/`` with canonical synthetic tiles, ``audit/audit_summary.json`` (``audit`` or
    :func:`audit_for` the tiles), ``run.json`` when given and ``audit/audit_summary.html`` when given."""
    from pixcell_fed.bundle.state import AUDIT_SUMMARY, AUDIT_SUMMARY_HTML, RUN_JSON, audit_dir, run_dir

    root = run_dir(work_dir, run_id)
    tiles = write_tiles(root / "synthetic", arrays, stem="syn")
    summary = audit if audit is not None else audit_for(arrays, verdict)
    audit_dir(root).mkdir(parents=True, exist_ok=True)
    (audit_dir(root) / AUDIT_SUMMARY).write_text(json.dumps(summary, indent=2))
    if run_json is not None:
        (root / RUN_JSON).write_text(json.dumps(run_json))
    if summary_html is not None:
        (audit_dir(root) / AUDIT_SUMMARY_HTML).write_text(summary_html, encoding="utf-8")
    return RunFixture(run_id=run_id, run_dir=root, tiles=tiles, audit=summary)


@dataclass
class Consortium:
    """Keys of sites with one officer each, and their trust store."""

    site_keys: dict
    officer_keys: dict
    trust: object

    def authority(self, site: str, work_dir: Path):
        """The site's own view (``SiteAuthority``): its name, work folder and its officer's public key."""
        from pixcell_fed.bundle.approval import SiteAuthority

        return SiteAuthority(name=site, work_dir=Path(work_dir), officers=(self.officer_keys[site].public_key(),))


def consortium(names: Sequence[str] = ("site-a", "site-b")) -> Consortium:
    from pixcell_fed.bundle.trust import TrustedSiteEntry, TrustFile, trust_from_entries
    from pixcell_fed.keys import generate_private_key, public_key_text

    site_keys = {n: generate_private_key() for n in names}
    officer_keys = {n: generate_private_key() for n in names}
    entries = {
        n: TrustedSiteEntry(
            signing_key=public_key_text(site_keys[n].public_key()),
            officers=(public_key_text(officer_keys[n].public_key()),),
        )
        for n in names
    }
    return Consortium(site_keys, officer_keys, trust_from_entries(TrustFile(sites=entries)))


def build_run_bundle(
    run: RunFixture,
    keys: Consortium,
    site: str,
    *,
    labels: Sequence[str] | None = None,
    approve: bool = True,
    site_key=None,
) -> Path:
    """Build the bundle of ``run`` for ``site`` with its keys and, when ``approve``, approve it; return it."""
    from pixcell_fed.bundle.approval import approve_bundle
    from pixcell_fed.bundle.build import build_bundle
    from pixcell_fed.bundle.png import read_png_header

    size = read_png_header(run.tiles[0]).width
    info = build_bundle(
        run.run_dir,
        site_name=site,
        tiles=run.tiles,
        tile_size=size,
        labels=labels,
        generator=GENERATOR,
        encoder=ENCODER,
        site_key=site_key or keys.site_keys[site],
    )
    if approve:
        approve_bundle(info.path, keys.officer_keys[site], site=keys.authority(site, run.work_dir))
    return info.path


def force_verdict(bundle: Path, verdict: str, site_key) -> None:
    """Rewrite a bundle's audit verdict and re-sign it with the site key: what a misbehaving site could do."""
    from pixcell_fed.bundle import layout as L
    from pixcell_fed.bundle.build import write_site_signature
    from pixcell_fed.bundle.shareable import audit_json_text

    audit = json.loads((bundle / L.AUDIT).read_text())
    audit["verdict"] = verdict
    (bundle / L.AUDIT).write_text(audit_json_text(audit))
    info = L.read_bundle_json(bundle)
    info["verdict"] = verdict
    info["files"][L.AUDIT] = sha256_file(bundle / L.AUDIT)
    L.write_bundle_json(bundle, info)
    write_site_signature(bundle, site_key)


def officer_signs(bundle: Path, officer_key) -> None:
    """Mark ``bundle`` approved and sign it with ``officer_key`` directly, bypassing the approve gate: what a
    fooled officer's signature, or one made with a stolen officer key, looks like to the coordinator."""
    from pixcell_fed.bundle import layout as L
    from pixcell_fed.keys import fingerprint

    info = L.read_bundle_json(bundle)
    info["state"] = L.STATE_APPROVED
    info["decision"] = {
        "state": L.STATE_APPROVED,
        "time": L.utc_now(),
        "officer": fingerprint(officer_key.public_key()),
    }
    L.write_signature(bundle, L.OFFICER_SIG, officer_key, L.statement(info, role="officer"), role="officer")
    L.write_bundle_json(bundle, info)


def resign(
    bundle: Path,
    site_key,
    officer_key=None,
    *,
    tiles: dict[str, bytes] | None = None,
    drop: Sequence[str] = (),
    audit_follows: bool = True,
    html: bytes | None = None,
    created: str | None = None,
) -> None:
    """What a site holding its own signing key could ship: replace tiles' bytes, drop tiles, swap the summary page
    or the creation time, then make the manifest, the audit's kept set (unless ``audit_follows`` is false),
    ``bundle.json`` and the site signature consistent again; with ``officer_key``, also sign the approval."""
    from pixcell_fed.bundle import layout as L
    from pixcell_fed.bundle.build import write_site_signature
    from pixcell_fed.bundle.manifest import label_counts, manifest_bytes, read_manifest
    from pixcell_fed.bundle.shareable import audit_json_text

    frame = read_manifest(bundle / L.MANIFEST)
    for name, data in (tiles or {}).items():
        (bundle / L.TILES / name).write_bytes(data)
        frame.loc[frame["file_name"] == name, ["sha256", "size"]] = [sha256_bytes(data), len(data)]
    for name in drop:
        (bundle / L.TILES / name).unlink()
    frame = frame[~frame["file_name"].isin(list(drop))].reset_index(drop=True)
    (bundle / L.MANIFEST).write_bytes(manifest_bytes(frame))
    audit = json.loads((bundle / L.AUDIT).read_text())
    if audit_follows:
        audit["kept_sha256"] = sorted(frame["sha256"])
    (bundle / L.AUDIT).write_text(audit_json_text(audit))
    if html is not None:
        (bundle / L.SUMMARY_HTML).write_bytes(html)
    info = L.read_bundle_json(bundle)
    info["files"] = {
        L.MANIFEST: sha256_file(bundle / L.MANIFEST),
        L.AUDIT: sha256_file(bundle / L.AUDIT),
        L.SUMMARY_HTML: sha256_file(bundle / L.SUMMARY_HTML) if (bundle / L.SUMMARY_HTML).is_file() else None,
    }
    info["counts"] = {"tiles": len(frame), "labels": label_counts(frame)}
    info["created"] = created or info["created"]
    info["state"], info["decision"] = L.STATE_AWAITING, None
    (bundle / L.OFFICER_SIG).unlink(missing_ok=True)
    L.write_bundle_json(bundle, info)
    write_site_signature(bundle, site_key)
    if officer_key is not None:
        officer_signs(bundle, officer_key)
