"""The consortium's trust file: which signing key each site uses and which keys its privacy officers hold.

YAML::

    sites:
      site-a:
        signing_key: ed25519:BASE64...        # printed by 'site-agent init'
        officers:
          - ed25519:BASE64...                 # printed by 'site-agent officer-key'
        auth_key: ecdsa-sha2-nistp384 AAAA...  # the site's Flower SuperNode key, printed by 'site-agent auth-key'

Loaded with the project's one config loader (unknown keys are errors naming the file and key); every key is
parsed. One key, one role: a public key may appear once in the whole file, whatever the site or role (so a site's
officer can never be its own signing key, nor another site's). The Flower authentication key binds a connected
SuperNode to its site name: the coordinator never takes a site's name from what a node says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pixcell_fed.errors import ConfigError, KeyFileError


@dataclass(frozen=True)
class TrustedSiteEntry:
    """One site as written in the trust file."""

    signing_key: str
    officers: tuple[str, ...] = ()
    auth_key: str | None = None


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
    auth_key: bytes | None = None  # DER SubjectPublicKeyInfo of the SuperNode's EC P-384 key (see auth_key_der)


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

    def site_with_auth_key(self, public_key: str | bytes) -> str | None:
        """Name of the site whose Flower authentication key is ``public_key`` (OpenSSH or PEM), if any."""
        try:
            der = auth_key_der(public_key)
        except KeyFileError:
            return None
        for site in self.sites.values():
            if site.auth_key is not None and site.auth_key == der:
                return site.name
        return None


def auth_key_der(public_key: str | bytes, *, source: str = "authentication key") -> bytes:
    """A SuperNode authentication public key (OpenSSH line or PEM block, EC P-384) as DER SubjectPublicKeyInfo.

    The one comparable form of the keys that Flower stores (PEM, ``NodeInfo.public_key``) and that sites hand out
    (OpenSSH, ``site-agent auth-key``).
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = public_key.encode("ascii", "replace") if isinstance(public_key, str) else bytes(public_key)
    data = data.strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"{source}: not an OpenSSH or PEM public key ({exc})",
            hint="paste the one-line key of the site's '<site>_auth.pub' ('site-agent auth-key')",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise KeyFileError(f"{source}: not an EC P-384 key", hint="Flower authenticates SuperNodes with EC P-384 keys")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_one_role_per_key(sites: Mapping[str, TrustedSite], source: str) -> None:
    """Refuse any public key that appears twice in the file, in any site or role, naming both places."""
    from pixcell_fed.keys import public_key_raw

    seen: dict[bytes, tuple[str, str]] = {}
    for name, site in sites.items():
        places = [(public_key_raw(site.signing_key), f"sites.{name}.signing_key", f"the signing key of site {name}")]
        places += [
            (public_key_raw(o), f"sites.{name}.officers[{i}]", f"an officer key of site {name}")
            for i, o in enumerate(site.officers)
        ]
        if site.auth_key is not None:
            places.append((site.auth_key, f"sites.{name}.auth_key", f"the SuperNode key of site {name}"))
        for raw, where, role in places:
            if raw in seen:
                earlier, earlier_role = seen[raw]
                raise ConfigError(
                    f"{source}: the key at {where} ({role}) is already used at {earlier} ({earlier_role})",
                    hint="one key, one role: every site, officer and SuperNode holds a key of its own; "
                    "ask for a fresh key pair",
                )
            seen[raw] = (where, role)


def trust_from_entries(trust: TrustFile, *, source: str = "trust file") -> TrustStore:
    from pixcell_fed.bundle.layout import SITE_NAME_RE
    from pixcell_fed.keys import parse_public_key

    sites = {}
    if not trust.sites:
        raise ConfigError(f"{source}: no sites", hint="add a 'sites:' mapping (see configs/trust.example.yaml)")
    for name, entry in trust.sites.items():
        if not SITE_NAME_RE.match(name):
            raise ConfigError(
                f"{source}: invalid site name {name!r} at key 'sites'",
                hint="site names are letters, digits, '-' or '_'",
            )
        try:
            signing = parse_public_key(entry.signing_key, source=f"{source}: sites.{name}.signing_key")
            officers = tuple(
                parse_public_key(k, source=f"{source}: sites.{name}.officers[{i}]")
                for i, k in enumerate(entry.officers)
            )
            auth = auth_key_der(entry.auth_key, source=f"{source}: sites.{name}.auth_key") if entry.auth_key else None
        except KeyFileError as exc:
            raise ConfigError(exc.message, hint=exc.hint) from exc
        if not officers:
            raise ConfigError(
                f"{source}: site {name!r} has no officers at key 'sites.{name}.officers'",
                hint="list the public key of at least one privacy officer of that site",
            )
        sites[name] = TrustedSite(name=name, signing_key=signing, officers=officers, auth_key=auth)
    _check_one_role_per_key(sites, source)
    return TrustStore(sites=MappingProxyType(sites), source=source)


def load_trust(path: str | Path) -> TrustStore:
    """Load and validate a trust file; :class:`ConfigError` names the file, the key and the fix."""
    from pixcell_fed.config import load_yaml_config

    path = Path(path)
    return trust_from_entries(load_yaml_config(path, TrustFile), source=str(path))


def add_site_to_trust_file(
    path: str | Path, site: str, *, signing_key: str, officers: list[str], auth_key: str | None = None
) -> TrustStore:
    """Add or replace ``site`` in the trust file at ``path`` (created if missing); validated before it is written."""
    import yaml

    from pixcell_fed.atomic import write_text_atomic
    from pixcell_fed.config import load_yaml_config, to_plain

    path = Path(path)
    current = load_yaml_config(path, TrustFile) if path.is_file() else None
    sites = dict(current.sites) if current else {}
    sites[site] = TrustedSiteEntry(
        signing_key=signing_key.strip(),
        officers=tuple(k.strip() for k in officers),
        auth_key=auth_key.strip() if auth_key else None,
    )
    updated = TrustFile(sites=MappingProxyType(sites))
    store = trust_from_entries(updated, source=str(path))
    header = "# The consortium's trust file (see configs/trust.example.yaml). Public keys only.\n"
    write_text_atomic(path, header + yaml.safe_dump(to_plain(updated), sort_keys=True, width=200))
    return store
