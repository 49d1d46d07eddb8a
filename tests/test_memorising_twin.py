"""The demo's memorising twin: loaded by the real loader only where registered, named in its identity, and caught.

Its tiles are copies (rotated, flipped, re-compressed, colour-jittered) and region copies (half a tile, a quarter)
of the real tiles it memorised; the audit must FAIL it. The installed site-agent never registers it, so a site
whose models.pixcell_dir points at such a folder is refused before any weight is read.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pixcell_fed.errors import WeightsError
from pixcell_fed.simulation.memorising_twin import (COPY_KINDS, LABEL, MEMORY_FILE, memorised_copy, register_pipeline,
                                                    write_memorising_twin)
from pixcell_fed.testing.audit_tiles import stripe_tiles, write_tiles
from pixcell_fed.testing.twins import save_tiny_uni, save_tiny_vae


def _seed_of_each_kind() -> dict[str, int]:
    tile, fresh = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    seeds: dict[str, int] = {}
    for seed in range(200):
        seeds.setdefault(memorised_copy(tile, fresh, seed)[1], seed)
    assert set(seeds) == set(COPY_KINDS)
    return seeds


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    from pixcell_fed.encoders import load_encoder

    root = tmp_path_factory.mktemp("memorising")
    real = stripe_tiles(0, stride=128)[0][:24]  # real H&E tiles of the test slide: what the twin memorised
    holdout = stripe_tiles(1, stride=128)[0][:40]
    encoder = load_encoder("uni2-h-twin", save_tiny_uni(root / "uni"))
    keys = encoder.embed(real)
    model = write_memorising_twin(root / "model", real, keys)
    return {"root": root, "model": model, "vae": save_tiny_vae(root / "vae"), "real": real, "keys": keys,
            "holdout": holdout}


def test_a_process_that_did_not_register_it_refuses_the_folder_before_reading_weights(twin):
    # what the installed site-agent does when models.pixcell_dir points at a memorising twin
    code = ("import sys\nfrom pixcell_fed.generation import load_pixcell\nfrom pixcell_fed.errors import WeightsError\n"
            "try:\n    load_pixcell(sys.argv[1], sys.argv[2])\nexcept WeightsError as exc:\n"
            "    print('REFUSED', exc.message); sys.exit(0)\nsys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", code, str(twin["model"]), str(twin["vae"])], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REFUSED" in done.stdout and "demo or test material this program does not load" in done.stdout


def test_only_a_twin_folder_may_name_a_pipeline(twin):
    import dataclasses

    from pixcell_fed.generation.loader import check_folder, pipeline_factory

    register_pipeline()
    checked = check_folder(twin["model"])
    assert checked.twin and pipeline_factory(checked) is not None
    with pytest.raises(WeightsError, match="only a tiny twin folder may"):
        pipeline_factory(dataclasses.replace(checked, twin=False))
    index = json.loads((twin["model"] / "model_index.json").read_text())
    assert index["_pixcell_fed_pipeline"] == "memorising-twin" and index["_pixcell_fed_twin"] is True


def test_its_identity_says_memorising_twin_and_its_tiles_are_copies_of_what_it_memorised(twin):
    from pixcell_fed.generation import load_pixcell

    register_pipeline()
    pipe = load_pixcell(twin["model"], twin["vae"])
    assert pipe.identity["label"] == LABEL and pipe.identity["twin"] is True
    assert "memorising twin" in pipe.identity["model"] and "memorising twin" in pipe.name
    assert len(pipe.identity["memory_sha256"]) == 64
    seeds = _seed_of_each_kind()
    source = [3, 5, 7, 11, 13, 17]
    out = pipe.generate(twin["keys"][source][:, None, :], seeds=[seeds[k] for k in COPY_KINDS], steps=2)
    assert out.shape == (6, 256, 256, 3) and out.dtype == np.uint8
    for image, kind, k in zip(out, COPY_KINDS, source):
        tile = twin["real"][k]
        if kind == "rotated":
            assert any(np.array_equal(image, np.rot90(tile, r)) for r in (1, 2, 3))
        elif kind == "flipped":
            assert any(np.array_equal(image, np.rot90(f, r)) for f in (tile[:, ::-1], tile[::-1]) for r in range(4))
        elif kind in ("re-compressed", "colour-jittered"):  # the whole tile, pixels changed a little
            assert not np.array_equal(image, tile) and np.corrcoef(image.ravel(), tile.ravel())[0, 1] > 0.8
        elif kind == "half tile":  # one half of the source in place, the other half new
            halves = [(slice(None), slice(0, 128)), (slice(None), slice(128, 256)), (slice(0, 128), slice(None)),
                      (slice(128, 256), slice(None))]
            assert any(np.array_equal(image[h], tile[h]) for h in halves) and not np.array_equal(image, tile)
        else:  # a quarter of the source somewhere
            quarters = [(slice(y, y + 128), slice(x, x + 128)) for y in (0, 128) for x in (0, 128)]
            assert any(np.array_equal(image[a], tile[b]) for a in quarters for b in quarters)


def test_the_audit_fails_what_it_makes(twin):
    from pixcell_fed.audit.run import run_audit
    from pixcell_fed.generation import load_pixcell

    register_pipeline()
    pipe = load_pixcell(twin["model"], twin["vae"])
    rows = np.arange(len(twin["real"]))
    out = pipe.generate(twin["keys"][rows][:, None, :], seeds=[1000 + int(r) for r in rows], steps=2)
    root = twin["root"]
    t_paths = write_tiles(root / "T", twin["real"], "ref")
    s_paths = write_tiles(root / "S", out, "syn")
    h_paths = write_tiles(root / "H", twin["holdout"], "hold")
    result = run_audit(s_paths, t_paths, h_paths, out_dir=root / "audit",
                       source_of={s.name: t.name for s, t in zip(s_paths, t_paths)},
                       identities={"generator": {"label": pipe.identity["label"], "model": pipe.identity["model"]}})
    assert result.verdict == "FAIL"
    memorisation = next(t for t in result.tests if t.name == "memorisation")
    assert memorisation.status == "FAIL"
    whole = [i for i, s in enumerate(1000 + rows) if memorised_copy(twin["real"][0], out[0], int(s))[1]
             in COPY_KINDS[:4]]
    flagged = {t["file"] for t in result.report["tiles"] if t["flagged"]}
    assert len(whole) >= 8 and all(str(s_paths[i]) in flagged for i in whole)  # every whole-tile copy is caught
    assert "memorising twin" in result.report_path.read_text()  # the officer's report names the generator
    assert "memorising twin" in (root / "audit" / "audit_summary.json").read_text()


def test_a_memory_that_does_not_fit_the_model_is_refused(twin, tmp_path):
    from safetensors.numpy import save_file

    from pixcell_fed.generation import load_pixcell

    register_pipeline()
    bad = write_memorising_twin(tmp_path / "bad", twin["real"][:2], twin["keys"][:2])
    save_file({"keys": twin["keys"][:2, :10].copy(), "tiles": twin["real"][:2].copy()}, str(bad / MEMORY_FILE))
    with pytest.raises(WeightsError, match="do not fit"):
        load_pixcell(bad, twin["vae"])
    (bad / MEMORY_FILE).unlink()
    with pytest.raises(WeightsError, match="has no memory"):
        load_pixcell(bad, twin["vae"])
