"""Configuration: typed, frozen sections and the one YAML loader that validates them."""

from pixcell_fed.config.loader import build_dataclass, load_yaml_config, to_plain
from pixcell_fed.config.schema import (
    AuditConfig,
    DPPolicy,
    FederationConfig,
    KeysConfig,
    LocalTrainingConfig,
    ModelsConfig,
    SiteConfig,
    SiteSection,
    SplitConfig,
    SynthesisConfig,
    TilingConfig,
)


def load_site_config(path) -> SiteConfig:
    """Load and validate a site's ``site.yaml``."""
    return load_yaml_config(path, SiteConfig)


__all__ = [
    "AuditConfig",
    "DPPolicy",
    "FederationConfig",
    "KeysConfig",
    "LocalTrainingConfig",
    "ModelsConfig",
    "SiteConfig",
    "SiteSection",
    "SplitConfig",
    "SynthesisConfig",
    "TilingConfig",
    "build_dataclass",
    "load_site_config",
    "load_yaml_config",
    "to_plain",
]
