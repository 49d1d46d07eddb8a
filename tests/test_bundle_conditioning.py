"""The conditioning claim in a bundle: carried from the run's audit into the signed bundle.json, checked on
verification, shown by ``coordinator verify`` and enforced by a consortium's requirement."""

from __future__ import annotations

import json

import pytest

from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.build import write_site_signature
from pixcell_fed.bundle.conditioning_policy import ConditioningRequirement, claim_of_audit, conditioning_refusal
from pixcell_fed.bundle.verify import verify_bundle
from pixcell_fed.cli_support import run_cli
from pixcell_fed.errors import BundleError, VerificationError
from pixcell_fed.keys import public_key_text
from pixcell_fed.privacy.conditioning import dp_claim, exact_claim, mixed_claim
from pixcell_fed.testing.bundles import (audit_for, build_run_bundle, consortium, officer_signs, real_tile_arrays,
                                         write_run)

DP = dp_claim(epsilon=4.0, delta=1e-6, clip_norm=2.0, vectors_per_tile=1, slide_tiles=16, slide_tiles_capped=True)


def _approved_bundle(tmp_path, keys, claim=None, run_id="run-0001"):
    arrays = real_tile_arrays(5)
    audit = audit_for(arrays)
    if claim is not None:
        audit["conditioning"] = claim if isinstance(claim, dict) else claim.to_record()
    run = write_run(tmp_path / "work", run_id, arrays, audit=audit)
    return build_run_bundle(run, keys, "site-a")


def _trust_file(tmp_path, keys) -> str:
    site, officer = keys.site_keys["site-a"], keys.officer_keys["site-a"]
    path = tmp_path / "trust.yaml"
    path.write_text(f"sites:\n  site-a:\n    signing_key: {public_key_text(site.public_key())}\n    officers:\n"
                    f"      - {public_key_text(officer.public_key())}\n")
    return str(path)


def coordinator(*argv):
    return run_cli("coordinator", "test", ["coordinator.commands.verify"], list(argv))


@pytest.mark.parametrize("claim,requirement,refused", [
    (exact_claim(), ConditioningRequirement(), None),
    (exact_claim(), ConditioningRequirement(min_mode="mixed"), "exact conditioning"),
    (mixed_claim(4), ConditioningRequirement(min_mode="mixed"), None),
    (mixed_claim(4), ConditioningRequirement(min_mode="dp"), "mixed conditioning"),
    (mixed_claim(4), ConditioningRequirement(min_mode="mixed", max_slide_epsilon=100), "unbounded"),
    (DP, ConditioningRequirement(min_mode="dp"), None),
    (DP, ConditioningRequirement(min_mode="dp", max_slide_epsilon=DP.slide_epsilon + 0.01), None),
    (DP, ConditioningRequirement(min_mode="dp", max_slide_epsilon=8), "per-slide epsilon"),
    (DP, ConditioningRequirement(max_tile_epsilon=3), "per-tile epsilon is 4"),
    (DP, ConditioningRequirement(max_delta=1e-7), "delta is 1e-06"),
])
def test_requirement_refuses_less_than_the_consortium_asks(claim, requirement, refused):
    reason = conditioning_refusal(claim, requirement)
    assert reason is None if refused is None else refused in reason


def test_requirement_settings_are_validated():
    for bad in ({"min_mode": "strong"}, {"max_slide_epsilon": 0}, {"max_tile_epsilon": float("inf")}, {"max_delta": 1}):
        with pytest.raises(ValueError):
            ConditioningRequirement(**bad)


def test_an_audit_without_a_claim_claims_no_guarantee():
    assert claim_of_audit({"verdict": "PASS"}) == exact_claim()


def test_the_dp_guarantee_reaches_the_signed_bundle_and_verification(tmp_path):
    keys = consortium(["site-a"])
    bundle = _approved_bundle(tmp_path, keys, DP)
    info = L.read_bundle_json(bundle)
    assert info["conditioning"] == DP.to_record() == json.loads((bundle / L.AUDIT).read_text())["conditioning"]
    verified = verify_bundle(bundle, keys.trust)
    assert verified.conditioning == DP
    # the claim is part of the signed statement: editing it in bundle.json breaks the site signature
    info["conditioning"] = exact_claim().to_record()
    L.write_bundle_json(bundle, info)
    with pytest.raises(VerificationError, match="site signature does not match"):
        verify_bundle(bundle, keys.trust)


def test_a_bundle_claiming_more_than_its_audit_is_refused(tmp_path):
    """A site (holding its own key) re-signs bundle.json with a dp claim its audit does not make."""
    keys = consortium(["site-a"])
    bundle = _approved_bundle(tmp_path, keys)  # audit: exact
    info = L.read_bundle_json(bundle)
    info["conditioning"] = DP.to_record()
    info["state"], info["decision"] = L.STATE_AWAITING, None
    L.write_bundle_json(bundle, info)
    write_site_signature(bundle, keys.site_keys["site-a"])
    officer_signs(bundle, keys.officer_keys["site-a"])
    with pytest.raises(VerificationError, match="the two signed claims must be the same"):
        verify_bundle(bundle, keys.trust)


def test_an_understated_epsilon_is_refused_even_when_signed(tmp_path):
    keys = consortium(["site-a"])
    bundle = _approved_bundle(tmp_path, keys, DP)
    info = L.read_bundle_json(bundle)
    info["conditioning"] = {**DP.to_record(), "slide_epsilon": DP.tile_epsilon}  # as if per slide = per tile
    L.write_bundle_json(bundle, info)
    with pytest.raises(BundleError, match="understates"):  # the site's own tools refuse to sign it
        write_site_signature(bundle, keys.site_keys["site-a"])
    L.write_signature(bundle, L.SITE_SIG, keys.site_keys["site-a"], L.statement(info, role="site"), role="site")
    with pytest.raises(VerificationError, match="per-slide epsilon .* understates"):
        verify_bundle(bundle, keys.trust)


def test_building_refuses_a_run_whose_audit_claim_is_malformed(tmp_path):
    keys = consortium(["site-a"])
    with pytest.raises(BundleError, match="conditioning claim is invalid"):
        _approved_bundle(tmp_path, keys, {**DP.to_record(), "sigma": DP.sigma / 3})


def test_verify_cli_shows_the_guarantee_and_enforces_the_requirement(tmp_path, capsys):
    keys = consortium(["site-a"])
    trust = _trust_file(tmp_path, keys)
    dp_bundle = _approved_bundle(tmp_path / "a", keys, DP)
    exact_bundle = _approved_bundle(tmp_path / "b", keys)

    assert coordinator("verify", str(dp_bundle), "--trust", trust) == 0
    out = capsys.readouterr().out
    assert "conditioning: Differential privacy per real tile: (epsilon = 4" in out and "Per slide" in out
    assert "not covered:" in out
    assert coordinator("verify", str(dp_bundle), "--trust", trust, "--min-conditioning", "dp",
                       "--max-slide-epsilon", "100", "--format", "json") == 0
    shown = json.loads(capsys.readouterr().out)["conditioning"]
    assert shown["mode"] == "dp" and shown["slide_epsilon"] == pytest.approx(DP.slide_epsilon)

    assert coordinator("verify", str(dp_bundle), "--trust", trust, "--max-slide-epsilon", "8") == 3
    err = capsys.readouterr().err
    assert f"per-slide epsilon is {DP.slide_epsilon:.3g}, above the consortium's limit of 8" in err
    assert coordinator("verify", str(exact_bundle), "--trust", trust, "--min-conditioning", "dp") == 3
    assert "exact conditioning, the consortium requires dp or stronger" in capsys.readouterr().err
    assert coordinator("verify", str(exact_bundle), "--trust", trust) == 0
    assert "Exact conditioning" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        coordinator("verify", str(exact_bundle), "--trust", trust, "--max-slide-epsilon", "-1")
    assert usage.value.code == 2
