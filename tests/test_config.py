"""The config loader: typed, frozen, and every mistake named with file, key and fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pixcell_fed.config import SiteConfig, load_site_config, to_plain
from pixcell_fed.errors import ConfigError, ExitCode

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_example_config_loads_and_documents_every_key():
    cfg = load_site_config(REPO / "configs" / "site.example.yaml")
    assert isinstance(cfg, SiteConfig)
    example = (REPO / "configs" / "site.example.yaml").read_text()
    for section in dataclasses.fields(SiteConfig):
        assert f"{section.name}:" in example
        for key in dataclasses.fields(getattr(cfg, section.name)):
            assert f"{key.name}:" in example, f"{section.name}.{key.name} is not documented in site.example.yaml"


def test_misspelt_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "tiling:\n  tisue_fraction: 0.4\n")
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    msg = str(info.value)
    assert str(path) in msg and "tiling.tisue_fraction" in msg and "tissue_fraction" in msg
    assert "tissue_fraction" in info.value.hint
    assert info.value.exit_code == ExitCode.USAGE


def test_wrong_type_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="tiling.workers"):
        load_site_config(write(tmp_path, "tiling:\n  workers: two\n"))
    with pytest.raises(ConfigError, match="audit.drop_flagged"):
        load_site_config(write(tmp_path, "audit:\n  drop_flagged: 1\n"))


def test_out_of_range_value_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="tissue_fraction"):
        load_site_config(write(tmp_path, "tiling:\n  tissue_fraction: 1.5\n"))


def test_bad_literal_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_site_config(write(tmp_path, "models:\n  dtype: float8\n"))
    assert "bfloat16" in info.value.hint


def test_relative_paths_resolve_against_config_folder_and_config_is_frozen(tmp_path):
    cfg = load_site_config(write(tmp_path, "site:\n  name: site-a\n  slides_dir: my_slides\n"))
    assert cfg.site.slides_dir == tmp_path.resolve() / "my_slides"
    assert cfg.site.work_dir == tmp_path.resolve() / "work"  # defaults resolve too
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.site.name = "other"  # type: ignore[misc]
    assert to_plain(cfg)["site"]["name"] == "site-a"


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_site_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_site_config(write(tmp_path, "- a\n- b\n"))


def test_mpp_overrides_mapping(tmp_path):
    cfg = load_site_config(write(tmp_path, "tiling:\n  mpp_overrides:\n    slide1.tif: 0.25\n"))
    assert cfg.tiling.mpp_overrides["slide1.tif"] == 0.25
    with pytest.raises(ConfigError, match="mpp_overrides.slide1.tif"):
        load_site_config(write(tmp_path, "tiling:\n  mpp_overrides:\n    slide1.tif: fast\n"))


def test_extra_audit_encoders_map_names_to_folders(tmp_path):
    cfg = load_site_config(write(tmp_path, "models:\n  extra_audit_encoders:\n    timm:vit_small_patch16_224: enc/vits\n"))
    assert cfg.models.extra_audit_encoders["timm:vit_small_patch16_224"] == tmp_path.resolve() / "enc" / "vits"
