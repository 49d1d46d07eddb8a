"""The identifier scanner finds names, slide properties and image metadata in files to ship."""

from __future__ import annotations

import json

import cv2
from PIL import Image, PngImagePlugin

from pixcell_fed.audit.identifiers import scan_for_identifiers
from pixcell_fed.testing.audit_tiles import region_tiles

MARKER = "PATIENT-4711-XYZ"


def _tile():
    return region_tiles(1400, 2967, stride=512)[0][0]


def test_clean_png_and_jpeg_have_no_findings(tmp_path):
    a = tmp_path / "a1b2c3d4.png"
    cv2.imwrite(str(a), _tile())
    b = tmp_path / "e5f6a7b8.jpg"
    cv2.imwrite(str(b), _tile())
    assert scan_for_identifiers([a, b], [MARKER, "CMU-1"]) == []


def test_marker_in_png_text_chunk_and_any_metadata_chunk_are_found(tmp_path):
    path = tmp_path / "tile.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"slide {MARKER}")
    Image.fromarray(_tile()).save(path, pnginfo=info)
    findings = scan_for_identifiers([path], [MARKER])
    assert any(f.kind == "image_metadata" and MARKER.casefold() in f.detail.casefold() for f in findings)
    info = PngImagePlugin.PngInfo()
    info.add_itxt("Description", "harmless words", zip=True)
    Image.fromarray(_tile()).save(path, pnginfo=info)
    assert [f.kind for f in scan_for_identifiers([path], [])] == ["image_metadata"]  # fail closed: any text chunk


def test_marker_in_file_name_tile_id_and_trailing_bytes(tmp_path):
    named = tmp_path / f"syn_{MARKER}.png"
    cv2.imwrite(str(named), _tile())
    tile_id = tmp_path / "ab12cd34-r00012-c00034.png"
    cv2.imwrite(str(tile_id), _tile())
    trailing = tmp_path / "clean.png"
    cv2.imwrite(str(trailing), _tile())
    trailing.write_bytes(trailing.read_bytes() + f"aperio.Filename = {MARKER}".encode())
    kinds = {(f.path.split("/")[-1], f.kind) for f in scan_for_identifiers([named, tile_id, trailing], [MARKER])}
    assert (named.name, "file_name") in kinds and (tile_id.name, "file_name") in kinds
    assert (trailing.name, "trailing_data") in kinds


def test_jpeg_exif_and_text_files_are_scanned(tmp_path):
    jpg = tmp_path / "x.jpg"
    exif = Image.Exif()
    exif[0x010E] = f"label {MARKER}"  # ImageDescription
    Image.fromarray(_tile()).save(jpg, exif=exif)
    assert any(f.kind == "image_metadata" and "APP1" in f.detail for f in scan_for_identifiers([jpg], [MARKER]))
    doc = tmp_path / "manifest.json"
    doc.write_text(json.dumps({"note": "from openslide.vendor aperio", "id": MARKER.lower()}))
    details = " ".join(f.detail for f in scan_for_identifiers([doc], [MARKER]))
    assert "openslide." in details and MARKER.casefold() in details.casefold()
    short = tmp_path / "other.json"
    short.write_text(json.dumps({"note": "PATHOLOGY"}))
    assert scan_for_identifiers([short], ["PAT"]) == []  # strings under 4 characters would match anything
