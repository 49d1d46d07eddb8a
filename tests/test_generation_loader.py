"""load_pixcell reads published-layout folders offline, never runs shipped code, and fails with the promised errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixcell_fed.errors import UsageError, WeightsError
from pixcell_fed.generation import load_pixcell
from pixcell_fed.generation.loader import DEFAULT_SCHEDULER_CONFIG
from pixcell_fed.testing.twins import save_tiny_pixcell, save_tiny_vae

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {
        "p256": save_tiny_pixcell(root / "PixCell-256", variant=256),
        "p1024": save_tiny_pixcell(root / "PixCell-1024", variant=1024, with_y_pos_embed=True),
        "p1024_no_pos": save_tiny_pixcell(root / "PixCell-1024-nopos", variant=1024, with_y_pos_embed=False),
        "vae": save_tiny_vae(root / "sd35-vae"),
    }


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def test_loads_256_twin_offline_and_labels_it(folders):
    pipe = load_pixcell(folders["p256"], folders["vae"])
    ident = pipe.identity
    assert ident["variant"] == 256 and ident["twin"] is True and ident["label"] == "untrained twin"
    assert len(ident["transformer_sha256"]) == 64 and len(ident["vae_sha256"]) == 64
    assert ident["dtype"] == "float32" and ident["device"] == "cpu"
    assert pipe.image_size == 256 and pipe.default_guidance == 2.0
    assert "scheduler/scheduler_config.json" in ident["scheduler"]


def test_1024_without_y_pos_buffer_is_rebuilt_exactly(folders):
    full = load_pixcell(folders["p1024"], folders["vae"])
    rebuilt = load_pixcell(folders["p1024_no_pos"], folders["vae"])
    assert "y_pos_embed.y_pos_embed" not in load_file(str(folders["p1024_no_pos"] / "transformer" / WEIGHTS))
    assert rebuilt.identity["y_pos_embed_rebuilt"] is True and full.identity["y_pos_embed_rebuilt"] is False
    assert torch.equal(rebuilt.transformer.y_pos_embed.y_pos_embed, full.transformer.y_pos_embed.y_pos_embed)
    for (k, a), (_, b) in zip(full.transformer.state_dict().items(), rebuilt.transformer.state_dict().items()):
        assert torch.equal(a, b), k
    assert rebuilt.default_guidance == 1.2


def test_the_null_embedding_comes_from_the_checkpoint(folders):
    pipe = load_pixcell(folders["p256"], folders["vae"])
    saved = load_file(str(folders["p256"] / "transformer" / WEIGHTS))["caption_projection.uncond_embedding"]
    assert torch.equal(pipe.transformer.uncond_embedding, saved)
    assert torch.equal(pipe.null_conditioning(3)[2], saved)


def test_shipped_remote_code_is_never_imported(folders, tmp_path):
    folder = copy_of(folders["p256"], tmp_path)
    sentinel = tmp_path / "remote_code_ran"
    (folder / "transformer" / "pixcell_transformer_2d.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\nraise SystemExit('remote code executed')\n"
    )
    pipe = load_pixcell(folder, folders["vae"])
    assert pipe.variant == 256
    assert not sentinel.exists()


def test_missing_transformer_weights_names_file_and_source(folders, tmp_path):
    folder = copy_of(folders["p256"], tmp_path)
    (folder / "transformer" / WEIGHTS).unlink()
    with pytest.raises(WeightsError) as err:
        load_pixcell(folder, folders["vae"])
    assert WEIGHTS in str(err.value) and "StonyBrook-CVLab/PixCell-256" in err.value.hint
    assert "CC BY-NC" in err.value.hint


def test_missing_pixcell_folder(tmp_path, folders):
    with pytest.raises(WeightsError, match="PixCell folder not found"):
        load_pixcell(tmp_path / "nowhere", folders["vae"])


def test_vae_missing_from_pixcell_repo_points_to_sd35(folders):
    # The published PixCell repos ship vae/config.json only.
    with pytest.raises(WeightsError) as err:
        load_pixcell(folders["p256"], None)
    assert "stable-diffusion-3.5" in err.value.hint and "Community License" in err.value.hint


def test_vae_weights_missing(folders, tmp_path):
    vae = copy_of(folders["vae"], tmp_path)
    (vae / WEIGHTS).unlink()
    with pytest.raises(WeightsError) as err:
        load_pixcell(folders["p256"], vae)
    assert WEIGHTS in str(err.value) and "stable-diffusion-3.5" in err.value.hint


def test_vae_folder_with_vae_subfolder_is_accepted(folders, tmp_path):
    root = tmp_path / "stable-diffusion-3.5-large"
    shutil.copytree(folders["vae"], root / "vae")
    assert load_pixcell(folders["p256"], root).vae.config.latent_channels == 16


def test_wrong_vae_is_refused(folders, tmp_path):
    vae = copy_of(folders["vae"], tmp_path)
    cfg = json.loads((vae / "config.json").read_text())
    cfg["latent_channels"] = 4
    (vae / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="4 latent channels"):
        load_pixcell(folders["p256"], vae)


def test_wrong_shapes_are_listed(folders, tmp_path):
    folder = copy_of(folders["p256"], tmp_path)
    path = folder / "transformer" / WEIGHTS
    state = load_file(str(path))
    state["caption_projection.linear_1.weight"] = torch.zeros(32, 1536)
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        load_pixcell(folder, folders["vae"])
    assert "caption_projection.linear_1.weight: file (32, 1536), model (32, 48)" in str(err.value)


def test_missing_null_embedding_is_refused(folders, tmp_path):
    folder = copy_of(folders["p256"], tmp_path)
    path = folder / "transformer" / WEIGHTS
    state = load_file(str(path))
    del state["caption_projection.uncond_embedding"]
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        load_pixcell(folder, folders["vae"])
    assert "caption_projection.uncond_embedding" in str(err.value) and "null embedding" in err.value.hint


def test_truncated_weights_file(folders, tmp_path):
    folder = copy_of(folders["p256"], tmp_path)
    path = folder / "transformer" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:1000])  # inside the header
    with pytest.raises(WeightsError, match="no valid safetensors header") as err:
        load_pixcell(folder, folders["vae"])
    assert str(path) in str(err.value)
    path.write_bytes(data[:-100])  # header whole, tensor data cut short: an unfinished copy
    with pytest.raises(WeightsError, match="is cut short") as err:
        load_pixcell(folder, folders["vae"])
    assert "copy did not finish" in err.value.hint


def test_foreign_config_is_refused(folders, tmp_path):
    folder = copy_of(folders["p256"], tmp_path)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "PixArtTransformer2DModel"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="not a PixCellTransformer2DModel"):
        load_pixcell(folder, folders["vae"])


def test_scheduler_config_is_read_when_present_else_defaults(folders, tmp_path):
    folder = copy_of(folders["p256"], tmp_path)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched_path.read_text())
    cfg["beta_end"] = 0.012
    cfg["variance_type"] = "learned_range"  # PixCell drops the variance channels itself; see sampler
    sched_path.write_text(json.dumps(cfg))
    pipe = load_pixcell(folder, folders["vae"])
    assert pipe.scheduler_config["beta_end"] == 0.012 and pipe.scheduler_config["variance_type"] is None
    sched_path.unlink()
    pipe = load_pixcell(folder, folders["vae"])
    for key, value in DEFAULT_SCHEDULER_CONFIG.items():
        assert pipe.scheduler_config[key] == value
    assert "built-in defaults" in pipe.identity["scheduler"]


def test_device_and_dtype_are_parameters(folders):
    pipe = load_pixcell(folders["p256"], folders["vae"], device="cpu", dtype="bfloat16")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32  # never an fp16 VAE
    assert pipe.generate(pipe.transformer.uncond_embedding.float()[None], seeds=[0], steps=2).shape == (1, 256, 256, 3)
    with pytest.raises(UsageError, match="unknown dtype"):
        load_pixcell(folders["p256"], folders["vae"], dtype="int8")
    with pytest.raises(UsageError):
        load_pixcell(folders["p256"], folders["vae"], device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no usable CUDA"):
            load_pixcell(folders["p256"], folders["vae"], device="cuda")


def test_loader_and_doctor_share_one_folder_check(folders, tmp_path):
    """The loader refuses what the doctor reports, with the same words: both run generation.loader.check_folder."""
    from pixcell_fed.generation.loader import check_folder

    checked = check_folder(folders["p256"])
    assert checked.variant == 256 and checked.twin and checked.weights.complete
    folder = copy_of(folders["p256"], tmp_path)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["norm_type"] = "layer_norm"  # a config the published PixCell never had
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError) as err:
        check_folder(folder)
    assert "norm_type = 'layer_norm' (published 'ada_norm_single')" in str(err.value)
    with pytest.raises(WeightsError) as loaded:
        load_pixcell(folder, folders["vae"])
    assert str(loaded.value) == str(err.value)


def test_check_folder_reads_no_weights(folders, monkeypatch):
    """Checking a folder reads headers only: safetensors' loader is never called."""
    import safetensors.torch

    from pixcell_fed.generation.loader import check_folder
    from pixcell_fed.generation.vae import check_folder as check_vae_folder

    def no_load(*args, **kwargs):
        raise AssertionError("check_folder loaded tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", no_load)
    assert check_folder(folders["p1024_no_pos"]).y_pos_embed_absent
    assert check_vae_folder(folders["vae"], latent_channels=16).config["latent_channels"] == 16


@pytest.mark.parametrize("key,value", [("scaling_factor", 0.3611), ("shift_factor", 0.1159)])
def test_vae_with_other_latent_scaling_is_refused_naming_the_file(folders, tmp_path, key, value):
    """PixCell's latents decode to the right colours only with SD3.5's scaling and shift (SD3's 0.3611-style VAEs
    load fine and decode quietly wrong): the loader refuses them and names the config file."""
    vae = copy_of(folders["vae"], tmp_path)
    cfg = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(WeightsError) as err:
        load_pixcell(folders["p256"], vae)
    assert str(vae / "config.json") in str(err.value)
    assert f"{key} = {value}" in str(err.value) and "SD3.5" in str(err.value)
    assert "stable-diffusion-3.5" in err.value.hint
