"""The consortium's trust file: which signing key each site uses and which keys its privacy officers hold.

YAML::

    sites:
      site-a:
        signing_key: ed25519:BASE64...        # printed by 'site-agent init'
        officers:
          - ed25519:BASE64...                 # printed by 'site-agent officer-key'

Loaded with the project's one config loader (unknown keys are errors naming the file and key); every key is
parsed, and a site whose officer key equals its signing key is refused (the officer must be someone else).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from pixcell_fed.errors import ConfigError, KeyFileError


@dataclass(frozen=True)
class TrustedSiteEntry:
    """One site as written in the trust file."""

    signing_key: str
    officers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrustFile:
    """The trust file as written."""

    sites: Mapping[str, TrustedSiteEntry] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class TrustedSite:
    """A site's parsed public keys."""

    name: str
    signing_key: object
    officers: tuple[object, ...]


@dataclass(frozen=True)
class TrustStore:
    """Parsed trust file: site name -> :class:`TrustedSite`."""

    sites: Mapping[str, TrustedSite]
    source: str = ""

    def site(self, name: str) -> TrustedSite | None:
        return self.sites.get(name)

    def site_with_signing_key(self, raw: bytes) -> str | None:
        """Name of the site whose signing key has these raw bytes, if any."""
        from pixcell_fed.keys import public_key_raw

        for site in self.sites.values():
            if public_key_raw(site.signing_key) == raw:
                return site.name
        return None


def trust_from_entries(trust: TrustFile, *, source: str = "trust file") -> TrustStore:
    from pixcell_fed.bundle.layout import SITE_NAME_RE
    from pixcell_fed.keys import parse_public_key, public_key_raw

    sites = {}
    if not trust.sites:
        raise ConfigError(f"{source}: no sites", hint="add a 'sites:' mapping (see configs/trust.example.yaml)")
    for name, entry in trust.sites.items():
        if not SITE_NAME_RE.match(name):
            raise ConfigError(f"{source}: invalid site name {name!r} at key 'sites'", hint="site names are letters, digits, '-' or '_'")
        try:
            signing = parse_public_key(entry.signing_key, source=f"{source}: sites.{name}.signing_key")
            officers = tuple(parse_public_key(k, source=f"{source}: sites.{name}.officers[{i}]") for i, k in enumerate(entry.officers))
        except KeyFileError as exc:
            raise ConfigError(exc.message, hint="paste the one-line public key printed by site-agent ('ed25519:...')") from exc
        if not officers:
            raise ConfigError(f"{source}: site {name!r} has no officers at key 'sites.{name}.officers'",
                              hint="list the public key of at least one privacy officer of that site")
        if any(public_key_raw(o) == public_key_raw(signing) for o in officers):
            raise ConfigError(f"{source}: an officer key of site {name!r} is the site's own signing key",
                              hint="the privacy officer must approve with a key of their own ('site-agent officer-key')")
        sites[name] = TrustedSite(name=name, signing_key=signing, officers=officers)
    raws = [public_key_raw(s.signing_key) for s in sites.values()]
    if len(set(raws)) != len(raws):
        raise ConfigError(f"{source}: two sites share one signing key", hint="each site signs with its own key")
    return TrustStore(sites=MappingProxyType(sites), source=source)


def load_trust(path: str | Path) -> TrustStore:
    """Load and validate a trust file; :class:`ConfigError` names the file, the key and the fix."""
    from pixcell_fed.config import load_yaml_config

    path = Path(path)
    return trust_from_entries(load_yaml_config(path, TrustFile), source=str(path))


def add_site_to_trust_file(path: str | Path, site: str, *, signing_key: str, officers: list[str]) -> TrustStore:
    """Add or replace ``site`` in the trust file at ``path`` (created if missing); validated before it is written."""
    import yaml

    from pixcell_fed.atomic import write_text_atomic
    from pixcell_fed.config import load_yaml_config, to_plain

    path = Path(path)
    current = load_yaml_config(path, TrustFile) if path.is_file() else None
    sites = dict(current.sites) if current else {}
    sites[site] = TrustedSiteEntry(signing_key=signing_key.strip(), officers=tuple(k.strip() for k in officers))
    updated = TrustFile(sites=MappingProxyType(sites))
    store = trust_from_entries(updated, source=str(path))
    header = "# The consortium's trust file (see configs/trust.example.yaml). Public keys only.\n"
    write_text_atomic(path, header + yaml.safe_dump(to_plain(updated), sort_keys=True, width=200))
    return store

