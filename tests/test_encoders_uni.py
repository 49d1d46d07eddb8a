"""Encoders by name: UNI2-h's exact architecture, its hard-coded ImageNet transform, strict loading, timm, twins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixcell_fed.encoders import ENCODERS, encoder_names, load_encoder
from pixcell_fed.encoders.uni import UNI_PARAMS, build_uni
from pixcell_fed.errors import RegistryError, UsageError, WeightsError
from pixcell_fed.testing.real_slide import real_slide_path
from pixcell_fed.testing.twins import TWIN_COND_DIM, save_tiny_uni, tiny_pixcell_config


@pytest.fixture(scope="module")
def real_tiles():
    import openslide

    with openslide.OpenSlide(str(real_slide_path())) as slide:
        return np.stack([np.asarray(slide.read_region(xy, 0, (256, 256)).convert("RGB")) for xy in [(600, 700), (1500, 1800)]])


@pytest.fixture(scope="module")
def uni_dir(tmp_path_factory):
    return save_tiny_uni(tmp_path_factory.mktemp("uni") / "UNI2-h")


def test_full_uni2h_architecture_on_meta():
    with torch.device("meta"):
        model = build_uni()
        out = model(torch.empty(2, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == UNI_PARAMS == 681_394_176
    assert tuple(out.shape) == (2, 1536)
    assert model.num_reg_tokens == 8 and model.patch_embed.patch_size == (14, 14) and len(model.blocks) == 24
    mlp = model.blocks[0].mlp  # SwiGLUPacked: one fc1 holding both gate halves, SiLU
    assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.act, torch.nn.SiLU)
    assert tuple(mlp.fc1.weight.shape) == (8192, 1536) and tuple(mlp.fc2.weight.shape) == (1536, 4096)
    assert model.global_pool == "token" and tuple(model.reg_token.shape) == (1, 8, 1536)
    assert tuple(model.pos_embed.shape) == (1, 256, 1536)  # no_embed_class: 16x16 patches only


def test_registry_lists_names_and_refuses_unknown():
    assert {"uni2-h", "uni2-h-twin", "timm"} <= set(encoder_names())
    with pytest.raises(RegistryError) as err:
        load_encoder("uni3")
    assert "uni2-h" in err.value.hint
    with pytest.raises(RegistryError):
        ENCODERS.register("uni2-h", lambda *a: None)


def test_twin_is_recognised_under_the_uni2h_name(uni_dir, real_tiles):
    enc = load_encoder("uni2-h", uni_dir)
    ident = enc.identity
    assert ident["name"] == "uni2-h-twin" and ident["twin"] is True and ident["label"] == "untrained twin"
    assert ident["dim"] == TWIN_COND_DIM == tiny_pixcell_config(256)["caption_channels"]
    assert len(ident["weights_sha256"]) == 64
    emb = enc.embed(real_tiles)
    assert emb.shape == (2, TWIN_COND_DIM) and emb.dtype == np.float32
    assert not np.allclose(emb[0], emb[1])  # different tissue, different embedding
    np.testing.assert_array_equal(emb[:1], enc.embed(real_tiles[0]))  # a single HxWx3 tile works too
    assert load_encoder("uni2-h-twin", uni_dir).identity["weights_sha256"] == ident["weights_sha256"]


def test_transform_is_hardcoded_imagenet_like_torchvision_on_pil(uni_dir, real_tiles):
    from PIL import Image
    from torchvision import transforms

    enc = load_encoder("uni2-h", uni_dir)
    assert enc.mean == (0.485, 0.456, 0.406) and enc.std == (0.229, 0.224, 0.225) and enc.resize == 224
    reference = transforms.Compose(
        [transforms.Resize(224), transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    expected = torch.stack([reference(Image.fromarray(t)) for t in real_tiles])
    got = enc.preprocess(real_tiles)
    assert got.shape == expected.shape == (2, 3, 224, 224)
    # Same pipeline; only resampling round-off differs between tensor and PIL resize (under 2/255 on average).
    assert (got - expected).abs().mean().item() < 0.01


def test_embed_validates_input(uni_dir):
    enc = load_encoder("uni2-h", uni_dir)
    with pytest.raises(UsageError, match="uint8"):
        enc.embed(np.zeros((1, 32, 32, 3), dtype=np.float32))
    with pytest.raises(UsageError, match="numpy array"):
        enc.embed([[0]])


def test_missing_uni_weights_say_where_to_get_them(tmp_path):
    (tmp_path / "UNI2-h").mkdir()
    with pytest.raises(WeightsError) as err:
        load_encoder("uni2-h", tmp_path / "UNI2-h")
    assert "pytorch_model.bin" in str(err.value) and "MahmoodLab/UNI2-h" in err.value.hint
    assert "CC BY-NC-ND" in err.value.hint
    with pytest.raises(WeightsError, match="no weights folder"):
        load_encoder("uni2-h", None)


def test_strict_loading_refuses_a_different_state_dict(tmp_path, uni_dir):
    import shutil

    folder = shutil.copytree(uni_dir, tmp_path / "bad")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state.pop("norm.weight")
    state["head.weight"] = torch.zeros(3, TWIN_COND_DIM)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError) as err:
        load_encoder("uni2-h", folder)
    assert "missing tensors: norm.weight" in str(err.value) and "unexpected tensors: head.weight" in str(err.value)


class NotATensor:
    pass


def test_pickles_are_read_with_weights_only(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": NotATensor()}, folder / "pytorch_model.bin")
    (folder / "pixcell_fed_twin.json").write_text('{"embed_dim": 48, "_pixcell_fed_twin": true}')
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_encoder("uni2-h", folder)


def test_generic_timm_entry_loads_local_weights_and_drops_the_head(tmp_path, real_tiles):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5)  # with a classifier head
    folder = tmp_path / "test_vit"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    enc = load_encoder("timm:test_vit", folder)
    assert enc.identity["name"] == "timm:test_vit" and enc.dim == model.num_features and enc.twin is False
    assert enc.resize == 160 and enc.mean == (0.5, 0.5, 0.5)  # the architecture's own preprocessing
    emb = enc.embed(real_tiles)
    model.reset_classifier(0)
    with torch.no_grad():
        expected = model.eval()(enc.preprocess(real_tiles)).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(WeightsError, match="no architecture"):
        load_encoder("timm:not_a_model", folder)
    with pytest.raises(UsageError, match="lacks an architecture"):
        load_encoder("timm:", folder)


def test_check_folder_is_what_the_loader_runs(uni_dir, tmp_path):
    from pixcell_fed.encoders import check_folder

    found = check_folder("uni2-h", uni_dir)
    assert found.name == "uni2-h-twin" and found.twin and found.dim == TWIN_COND_DIM
    assert found.weights_file == load_encoder("uni2-h", uni_dir).weights_file
    with pytest.raises(WeightsError, match="not a uni2-h twin folder"):
        check_folder("uni2-h-twin", tmp_path)
    with pytest.raises(RegistryError) as err:
        check_folder("uni3", uni_dir)
    assert "timm:<arch>" in err.value.hint


def test_uni2h_embeds_in_float32_on_every_device(uni_dir):
    """PixCell's conditioning was extracted in float32: UNI2-h does not follow the generic bf16-on-GPU default."""
    from pixcell_fed.encoders.uni import compute_dtype

    for device in ("cpu", "cuda", "cuda:1"):
        assert compute_dtype(None, torch.device(device)) == torch.float32
        assert compute_dtype("auto", torch.device(device)) == torch.float32
    assert compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # only when asked for by name
    enc = load_encoder("uni2-h", uni_dir, device="auto")
    assert enc.dtype == torch.float32 and enc.identity["dtype"] == "float32"
