"""``site-agent doctor``: tiny twins pass, broken folders and unsafe keys FAIL with a fix, JSON output."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from pixcell_fed.doctor import CHECK_ORDER, CHECKS, CheckResult, run_doctor
from pixcell_fed.generation.published import PUBLISHED_PIXCELL
from pixcell_fed.site_init import init_site
from pixcell_fed.testing.twins import save_tiny_pixcell, save_tiny_uni, save_tiny_vae
from pixcell_fed.weights import read_safetensors_header
from site_agent.cli import main as site_agent

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "pixcell": save_tiny_pixcell(root / "pixcell", variant=256),
        "pixcell1024": save_tiny_pixcell(root / "pixcell1024", variant=1024, with_y_pos_embed=False),
        "vae": save_tiny_vae(root / "vae"),
        "uni": save_tiny_uni(root / "uni"),
    }


SLIDE_TABLE = "slide,label,patient\nscan-01.svs,tumour,patient-01\nscan-02.svs,normal,patient-02\n"


def make_site(tmp_path: Path, models: dict[str, Path], *, name: str = "site-a", tile_size: int = 256,
              slide_table: str | None = SLIDE_TABLE, **overrides: Path) -> Path:
    """A site folder from 'site-agent init' whose config points at (copies of) the twin folders, with a slide table
    (site.labels_csv) holding ``slide_table`` unless it is None."""
    result = init_site(tmp_path / name, name=name)
    config = Path(result["config"])
    data = yaml.safe_load(config.read_text())
    paths = {"pixcell_dir": models["pixcell"], "vae_dir": models["vae"], "encoder_dir": models["uni"], **overrides}
    data["models"].update({k: str(v) for k, v in paths.items()})
    if slide_table is not None:
        (config.parent / "labels.csv").write_text(slide_table)
        data["site"]["labels_csv"] = "labels.csv"
    data.setdefault("tiling", {})["tile_size"] = tile_size
    config.write_text(yaml.safe_dump(data))
    return config


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def by_name(report) -> dict[str, CheckResult]:
    return {r.name: r for r in report.results}


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A full-size fp32 safetensors file whose data is a hole: real sizes on disk cost nothing."""
    header, offset = {}, 0
    for key in sorted(shapes):
        n = 4
        for d in shapes[key]:
            n *= d
        header[key] = {"dtype": "F32", "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)


def meta_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    import torch

    from pixcell_fed.generation.transformer import PixCellTransformer2DModel

    with torch.device("meta"):
        model = PixCellTransformer2DModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rewrite_tensor(weights: Path, key: str, shape: tuple[int, ...]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state[key] = torch.zeros(shape)
    save_file(state, str(weights), metadata={"format": "pt"})


def test_twins_pass_and_are_labelled_untrained(tmp_path, models):
    report = run_doctor(make_site(tmp_path, models), min_free_gb=0)
    results = by_name(report)
    assert report.exit_code == 0 and report.ok
    assert [r.name for r in report.results] == [n for n in CHECK_ORDER if n in results]
    for name in ("pixcell model", "vae", "encoder"):
        assert results[name].status == "WARN", results[name]
        assert results[name].detail.startswith("untrained twin")
        assert results[name].fix
    assert "PixCell-256" in results["pixcell model"].detail
    assert results["openslide"].status == "OK" and "OpenSlide library" in results["openslide"].detail
    assert results["site key"].status == "OK" and "fingerprint SHA256:" in results["site key"].detail
    assert results["device"].status == "OK" and "cpu" in results["device"].detail
    assert results["work folder"].status == "OK"
    assert results["slides"].status == "WARN"  # a fresh site has no slides yet
    assert results["slide table"].status == "OK" and "2 patient(s) for 2 slide(s)" in results["slide table"].detail
    assert results["officers"].status == "WARN"  # and no officer yet
    assert "trust file" not in results  # not given, not checked


def test_cli_json_output(tmp_path, models, capsys):
    config = make_site(tmp_path, models)
    rc = site_agent(["doctor", "--config", str(config), "--format", "json", "--min-free-gb", "0"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["ok"] is True and out["summary"]["FAIL"] == 0
    assert sum(out["summary"].values()) == len(out["checks"])
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in out["checks"])
    assert {c["name"]: c["status"] for c in out["checks"]}["pixcell model"] == "WARN"


def test_cli_text_output_shows_fix_lines_and_exit_1_on_fail(tmp_path, models, capsys):
    pixcell = copy_folder(models["pixcell"], tmp_path / "pixcell")
    (pixcell / "transformer" / WEIGHTS).unlink()
    config = make_site(tmp_path, models, pixcell_dir=pixcell)
    rc = site_agent(["doctor", "--config", str(config), "--min-free-gb", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1
    fail = next(i for i, line in enumerate(lines) if line.startswith("FAIL  pixcell model"))
    assert f"missing transformer/{WEIGHTS}" in lines[fail]
    assert lines[fail + 1].strip().startswith("fix: re-download the folder")
    assert "StonyBrook-CVLab/PixCell-256" in lines[fail + 1]
    assert lines[-1].startswith("summary: ") and lines[-1].endswith("1 FAIL")


def test_missing_model_folder_and_unset_models(tmp_path, models):
    config = make_site(tmp_path, models, pixcell_dir=tmp_path / "nowhere")
    result = by_name(run_doctor(config, min_free_gb=0))["pixcell model"]
    assert result.status == "FAIL" and "not found" in result.detail and "models.pixcell_dir" in result.fix

    data = yaml.safe_load(config.read_text())
    data["models"] = {}
    config.write_text(yaml.safe_dump(data))
    results = by_name(run_doctor(config, min_free_gb=0))
    assert results["pixcell model"].status == "FAIL" and "models.pixcell_dir is not set" in results["pixcell model"].detail
    assert results["vae"].status == "FAIL" and "models.vae_dir" in results["vae"].fix
    assert results["encoder"].status == "FAIL" and "models.encoder_dir" in results["encoder"].fix


def test_wrong_config_value_fails(tmp_path, models):
    pixcell = copy_folder(models["pixcell"], tmp_path / "pixcell")
    cfg_path = pixcell / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["norm_type"] = "layer_norm"
    cfg_path.write_text(json.dumps(cfg))
    result = by_name(run_doctor(make_site(tmp_path, models, pixcell_dir=pixcell), min_free_gb=0))["pixcell model"]
    assert result.status == "FAIL"
    assert "norm_type = 'layer_norm' (published 'ada_norm_single')" in result.detail
    assert "re-download" in result.fix


def test_wrong_tensor_shape_in_header_fails(tmp_path, models):
    pixcell = copy_folder(models["pixcell"], tmp_path / "pixcell")
    weights = pixcell / "transformer" / WEIGHTS
    good = read_safetensors_header(weights, "src").shapes["proj_out.weight"]
    rewrite_tensor(weights, "proj_out.weight", (good[0] + 1, good[1]))
    result = by_name(run_doctor(make_site(tmp_path, models, pixcell_dir=pixcell), min_free_gb=0))["pixcell model"]
    assert result.status == "FAIL"
    assert "wrong shapes: proj_out.weight" in result.detail and str(good) in result.detail
    assert "different models" in result.fix


def test_cut_short_weights_fail(tmp_path, models):
    pixcell = copy_folder(models["pixcell"], tmp_path / "pixcell")
    weights = pixcell / "transformer" / WEIGHTS
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 100)
    result = by_name(run_doctor(make_site(tmp_path, models, pixcell_dir=pixcell), min_free_gb=0))["pixcell model"]
    assert result.status == "FAIL" and "cut short" in result.detail and "copy did not finish" in result.fix

    weights.write_bytes(b"not a safetensors file at all")
    result = by_name(run_doctor(make_site(tmp_path, models, name="site-b", pixcell_dir=pixcell), min_free_gb=0))["pixcell model"]
    assert result.status == "FAIL" and "safetensors header" in result.detail


def test_published_sizes_pass_as_real_models(tmp_path, models):
    """Full-size PixCell-256 and -1024 folders and UNI2-h (sparse weight files) are recognised as the published ones."""
    import torch

    from pixcell_fed.encoders.uni import build_uni

    with torch.device("meta"):
        uni_shapes = {k: tuple(v.shape) for k, v in build_uni().state_dict().items()}
    write_sparse_safetensors(tmp_path / "UNI2-h" / "model.safetensors", uni_shapes)
    for variant in (256, 1024):
        folder = tmp_path / f"PixCell-{variant}"
        config = {"_class_name": "PixCellTransformer2DModel", **PUBLISHED_PIXCELL[variant],
                  "double_self_attention": False, "num_vector_embeds": None, "only_cross_attention": False,
                  "use_linear_projection": False}
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "config.json").write_text(json.dumps(config))
        shapes = meta_shapes(config)
        shapes.pop("y_pos_embed.y_pos_embed", None)  # some published 1024 files lack it: allowed
        write_sparse_safetensors(folder / "transformer" / WEIGHTS, shapes)
        site = make_site(tmp_path, models, name=f"site-{variant}", tile_size=variant, pixcell_dir=folder)
        results = by_name(run_doctor(site, min_free_gb=0))
        result = results["pixcell model"]
        assert result.status == "OK", result
        assert f"PixCell-{variant}" in result.detail and "published architecture" in result.detail
        assert "604 tensors" in result.detail  # 1024 without y_pos_embed: 605 - 1
        assert ("y_pos_embed absent" in result.detail) == (variant == 1024)
        # The twin encoder's 48-dim embeddings cannot condition a real PixCell (1536).
        assert results["encoder"].status == "FAIL" and "1536-dim" in results["encoder"].detail
        site = make_site(tmp_path, models, name=f"site-uni-{variant}", pixcell_dir=folder, encoder_dir=tmp_path / "UNI2-h")
        result = by_name(run_doctor(site, min_free_gb=0))["encoder"]
        assert result.status == "OK" and "UNI2-h at" in result.detail and "1536-dim" in result.detail
        # Real models on a CPU-only machine: works, but slowly.
        assert results["device"].status == "WARN"

    # A real (non-twin) config with a shrunken size is not the published model.
    cfg_path = tmp_path / "PixCell-256" / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 24
    cfg_path.write_text(json.dumps(cfg))
    site = make_site(tmp_path, models, name="site-x", pixcell_dir=tmp_path / "PixCell-256")
    result = by_name(run_doctor(site, min_free_gb=0))["pixcell model"]
    assert result.status == "FAIL" and "num_layers = 24 (published 28)" in result.detail


def test_1024_twin_without_y_pos_embed_passes(tmp_path, models):
    site = make_site(tmp_path, models, tile_size=1024, pixcell_dir=models["pixcell1024"])
    result = by_name(run_doctor(site, min_free_gb=0))["pixcell model"]
    assert result.status == "WARN" and "PixCell-1024" in result.detail and "y_pos_embed absent" in result.detail


def test_a_pixcell_model_for_another_tile_size_fails(tmp_path, models):
    site = make_site(tmp_path, models, pixcell_dir=models["pixcell1024"])  # the default 256 px tiles
    result = by_name(run_doctor(site, min_free_gb=0))["pixcell model"]
    assert result.status == "FAIL" and "tiling.tile_size is 256" in result.detail
    assert result.fix.startswith("set tiling.tile_size: 1024")


def test_vae_checks(tmp_path, models):
    vae = copy_folder(models["vae"], tmp_path / "vae")
    cfg = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 0.3611}))
    result = by_name(run_doctor(make_site(tmp_path, models, vae_dir=vae), min_free_gb=0))["vae"]
    assert result.status == "FAIL" and "scaling_factor = 0.3611 (published 1.5305)" in result.detail
    assert "stable-diffusion-3.5" in result.fix

    (vae / "config.json").write_text(json.dumps(cfg))
    (vae / WEIGHTS).unlink()
    result = by_name(run_doctor(make_site(tmp_path, models, name="site-b", vae_dir=vae), min_free_gb=0))["vae"]
    assert result.status == "FAIL" and f"missing {WEIGHTS}" in result.detail


def test_encoder_checks(tmp_path, models):
    wide = save_tiny_uni(tmp_path / "uni96", dim=96)
    result = by_name(run_doctor(make_site(tmp_path, models, encoder_dir=wide), min_free_gb=0))["encoder"]
    assert result.status == "FAIL" and "96-dim" in result.detail and "48-dim" in result.detail

    empty = tmp_path / "empty"
    empty.mkdir()
    result = by_name(run_doctor(make_site(tmp_path, models, name="site-b", encoder_dir=empty), min_free_gb=0))["encoder"]
    assert result.status == "FAIL" and "pytorch_model.bin" in result.detail and "UNI2-h" in result.fix

    config = make_site(tmp_path, models, name="site-c")
    data = yaml.safe_load(config.read_text())
    data["models"]["encoder"] = "uni3"
    config.write_text(yaml.safe_dump(data))
    result = by_name(run_doctor(config, min_free_gb=0))["encoder"]
    assert result.status == "FAIL" and "uni2-h" in result.fix and "timm:<arch>" in result.fix


def test_key_readable_by_others_fails_with_chmod_fix(tmp_path, models, capsys):
    config = make_site(tmp_path, models)
    key = tmp_path / "site-a" / "keys" / "site_signing.key"
    os.chmod(key, 0o644)
    rc = site_agent(["doctor", "--config", str(config), "--format", "json", "--min-free-gb", "0"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert rc == 1
    assert checks["site key"]["status"] == "FAIL" and "0644" in checks["site key"]["detail"]
    assert checks["site key"]["fix"] == f"restrict it to its owner: chmod 600 {key}"


def test_missing_key_and_passphrase_problems(tmp_path, models, monkeypatch):
    from pixcell_fed.keys import generate_private_key, public_key_text

    config = make_site(tmp_path, models)
    key = tmp_path / "site-a" / "keys" / "site_signing.key"
    key.with_suffix(".pub").write_text(public_key_text(generate_private_key().public_key()) + "\n")
    result = by_name(run_doctor(config, min_free_gb=0))["site key"]
    assert result.status == "WARN" and "holds another key" in result.detail and "trust file" in result.fix
    key.unlink()
    result = by_name(run_doctor(config, min_free_gb=0))["site key"]
    assert result.status == "FAIL" and "not found" in result.detail and "site-agent init" in result.fix

    monkeypatch.setenv("DOCTOR_TEST_PASS", "correct horse")
    result = init_site(tmp_path / "site-p", name="site-p", passphrase_env="DOCTOR_TEST_PASS")
    config = Path(result["config"])
    data = yaml.safe_load(config.read_text())
    data["models"].update(pixcell_dir=str(models["pixcell"]), vae_dir=str(models["vae"]), encoder_dir=str(models["uni"]))
    config.write_text(yaml.safe_dump(data))
    ok = by_name(run_doctor(config, min_free_gb=0))["site key"]
    assert ok.status == "OK" and "passphrase-protected" in ok.detail
    monkeypatch.delenv("DOCTOR_TEST_PASS")
    result = by_name(run_doctor(config, min_free_gb=0))["site key"]
    assert result.status == "FAIL" and "DOCTOR_TEST_PASS" in result.detail and "export DOCTOR_TEST_PASS" in result.fix


def test_trust_file(tmp_path, models):
    from pixcell_fed.keys import public_key_text, write_key_pair

    config = make_site(tmp_path, models)
    site_pub = (tmp_path / "site-a" / "keys" / "site_signing.pub").read_text().strip()
    _, _, officer = write_key_pair(tmp_path / "officer" / "officer.key")
    _, _, other = write_key_pair(tmp_path / "other" / "other.key")
    trust = tmp_path / "trust.yaml"
    trust.write_text(yaml.safe_dump({"sites": {"site-a": {"signing_key": site_pub, "officers": [public_key_text(officer)]}}}))
    result = by_name(run_doctor(config, trust_path=trust, min_free_gb=0))["trust file"]
    assert result.status == "OK" and "1 officer key" in result.detail

    trust.write_text(yaml.safe_dump({"sites": {"site-a": {"signing_key": public_key_text(other),
                                                          "officers": [public_key_text(officer)]}}}))
    result = by_name(run_doctor(config, trust_path=trust, min_free_gb=0))["trust file"]
    assert result.status == "FAIL" and "not this site's key" in result.detail

    trust.write_text(yaml.safe_dump({"sites": {"site-b": {"signing_key": site_pub, "officers": [public_key_text(officer)]}}}))
    result = by_name(run_doctor(config, trust_path=trust, min_free_gb=0))["trust file"]
    assert result.status == "FAIL" and "none named 'site-a'" in result.detail and "site-a" in result.fix


def test_low_disk_warns_and_no_config_checks_only_the_machine(tmp_path, models):
    result = by_name(run_doctor(make_site(tmp_path, models), min_free_gb=1e9))["work folder"]
    assert result.status == "WARN" and "under the 1e+09 GB threshold" in result.detail and "--min-free-gb" in result.fix

    report = run_doctor(None)
    names = [r.name for r in report.results]
    assert names == ["python", "openslide", "config", "work folder", "device", "lock"]
    assert by_name(report)["config"].status == "WARN" and "--config" in by_name(report)["config"].fix


def test_config_error_exits_2(tmp_path, capsys):
    bad = tmp_path / "site.yaml"
    bad.write_text("models:\n  pixcel_dir: x\n")
    assert site_agent(["doctor", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "pixcel_dir" in err and "hint:" in err


def test_a_broken_check_is_reported_and_the_rest_still_run(tmp_path, models, monkeypatch):
    def broken(ctx):
        raise OSError("disk on fire")

    monkeypatch.setitem(CHECKS._items, "openslide", broken)
    report = run_doctor(make_site(tmp_path, models), min_free_gb=0)
    results = by_name(report)
    assert results["openslide"].status == "FAIL" and "disk on fire" in results["openslide"].detail
    assert results["site key"].status == "OK" and report.exit_code == 1


def test_a_patient_split_without_patients_fails_as_synthesize_would_with_both_fixes(tmp_path, models, capsys):
    """split.unit: patient (the default) needs the slide table's patient column, or synthesize exits 2."""
    from pixcell_fed.config import load_site_config
    from pixcell_fed.errors import ConfigError
    from pixcell_fed.pipeline.labels import load_slide_table
    from pixcell_fed.pipeline.split import check_split_unit

    for n, table in enumerate((None, "slide,label\nscan-01.svs,tumour\n")):  # no table; a table without patients
        config = make_site(tmp_path / str(n), models, slide_table=table)
        result = by_name(run_doctor(config, min_free_gb=0))["slide table"]
        cfg = load_site_config(config)
        with pytest.raises(ConfigError) as synthesize:  # what site-agent synthesize says before any work
            check_split_unit(cfg.split, load_slide_table(cfg.site.labels_csv), cfg.site.labels_csv)
        assert result.status == "FAIL" and result.detail.endswith(synthesize.value.message)
        assert "no patient column" in result.detail and "exit 2" in result.detail
        assert "add a 'patient' (or 'case') column" in result.fix and "split.unit: slide" in result.fix
    assert site_agent(["doctor", "--config", str(config), "--min-free-gb", "0"]) == 1
    assert "FAIL  slide table" in capsys.readouterr().out

    data = yaml.safe_load(config.read_text())
    data["split"] = {"unit": "slide"}  # chosen knowingly: the check passes, the audit report will warn
    config.write_text(yaml.safe_dump(data))
    result = by_name(run_doctor(config, min_free_gb=0))["slide table"]
    assert result.status == "OK" and "split.unit: slide" in result.detail

    config = make_site(tmp_path / "cover", models, slide_table="slide,patient\nscan-01.svs,p1\n")
    (config.parent / "slides" / "scan-02.svs").write_bytes(b"not opened by the doctor")
    result = by_name(run_doctor(config, min_free_gb=0))["slide table"]
    assert result.status == "FAIL" and "no patient for 1 slide(s), e.g. 'scan-02.svs'" in result.detail
    assert "add a row for every slide" in result.fix


def test_no_privacy_officer_warns_with_the_officer_key_fix(tmp_path, models):
    from pixcell_fed.keys import fingerprint, public_key_text, write_key_pair

    config = make_site(tmp_path, models)
    report = run_doctor(config, min_free_gb=0)
    result = by_name(report)["officers"]
    assert result.status == "WARN" and report.exit_code == 0
    assert "lists no privacy officer" in result.detail and "approval" in result.detail
    assert "site-agent officer-key" in result.fix and "keys.officers" in result.fix

    _, _, officer = write_key_pair(tmp_path / "officer" / "officer.key")
    site_pub = (tmp_path / "site-a" / "keys" / "site_signing.pub").read_text().strip()
    data = yaml.safe_load(config.read_text())
    data["keys"]["officers"] = [public_key_text(officer)]
    config.write_text(yaml.safe_dump(data))
    result = by_name(run_doctor(config, min_free_gb=0))["officers"]
    assert result.status == "OK" and fingerprint(officer) in result.detail

    data["keys"]["officers"] = [public_key_text(officer), site_pub]  # the site's own key can never approve
    config.write_text(yaml.safe_dump(data))
    result = by_name(run_doctor(config, min_free_gb=0))["officers"]
    assert result.status == "WARN" and "site's own signing key" in result.detail
