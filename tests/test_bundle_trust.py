"""The consortium trust file: one key, one role, across the whole file; SuperNode keys bind nodes to site names."""

from __future__ import annotations

import pytest

from pixcell_fed.bundle.trust import add_site_to_trust_file, auth_key_der, load_trust
from pixcell_fed.errors import ConfigError, KeyFileError
from pixcell_fed.federation.deployment import make_site_auth_key
from pixcell_fed.keys import generate_private_key, public_key_text


def _pub() -> str:
    return public_key_text(generate_private_key().public_key())


def _auth(tmp_path, site: str) -> str:
    _, public = make_site_auth_key(tmp_path / f"auth-{site}", site)
    return public.read_text().strip()


def test_officer_of_one_site_cannot_sign_for_another(tmp_path):
    officer_a = _pub()
    trust = tmp_path / "trust.yaml"
    add_site_to_trust_file(trust, "site-a", signing_key=_pub(), officers=[officer_a])
    with pytest.raises(ConfigError, match=r"sites.site-b.signing_key \(the signing key of site site-b\) is already used at "
                                          r"sites.site-a.officers\[0\] \(an officer key of site site-a\)"):
        add_site_to_trust_file(trust, "site-b", signing_key=officer_a, officers=[_pub()])
    assert set(load_trust(trust).sites) == {"site-a"}  # nothing was written


def test_one_officer_cannot_serve_two_sites(tmp_path):
    shared = _pub()
    trust = tmp_path / "trust.yaml"
    add_site_to_trust_file(trust, "site-a", signing_key=_pub(), officers=[shared])
    with pytest.raises(ConfigError, match="already used at sites.site-a.officers"):
        add_site_to_trust_file(trust, "site-b", signing_key=_pub(), officers=[shared])


def test_auth_key_reused_across_sites_refused(tmp_path):
    auth = _auth(tmp_path, "site-a")
    trust = tmp_path / "trust.yaml"
    add_site_to_trust_file(trust, "site-a", signing_key=_pub(), officers=[_pub()], auth_key=auth)
    with pytest.raises(ConfigError, match=r"sites.site-b.auth_key \(the SuperNode key of site site-b\) is already used at "
                                          r"sites.site-a.auth_key \(the SuperNode key of site site-a\)"):
        add_site_to_trust_file(trust, "site-b", signing_key=_pub(), officers=[_pub()], auth_key=auth)


def test_auth_key_maps_flower_pem_and_openssh_to_the_site(tmp_path):
    from cryptography.hazmat.primitives import serialization

    auth_a, auth_b = _auth(tmp_path, "site-a"), _auth(tmp_path, "site-b")
    trust = tmp_path / "trust.yaml"
    add_site_to_trust_file(trust, "site-a", signing_key=_pub(), officers=[_pub()], auth_key=auth_a)
    store = add_site_to_trust_file(trust, "site-b", signing_key=_pub(), officers=[_pub()], auth_key=auth_b)
    # Flower's NodeInfo.public_key is PEM: the same key must map to the same site
    pem = serialization.load_ssh_public_key(auth_b.encode()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert store.site_with_auth_key(pem) == "site-b"
    assert store.site_with_auth_key(auth_a) == "site-a"
    assert store.site_with_auth_key(_auth(tmp_path, "stranger")) is None
    assert store.site_with_auth_key("not a key") is None
    assert load_trust(trust).site("site-a").auth_key == auth_key_der(auth_a)


def test_auth_key_must_be_p384(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(KeyFileError, match="not an EC P-384 key"):
        auth_key_der(p256)
    with pytest.raises(ConfigError, match="sites.site-a.auth_key"):
        add_site_to_trust_file(tmp_path / "t.yaml", "site-a", signing_key=_pub(), officers=[_pub()], auth_key=p256)
