"""The site's side of the DP fine-tune: its own policy, its privacy ledger, and what leaves it.

Each request goes through the site's answer boundary (``site_server.answer``, and so ``handle_train``) with
settings read from the node config, exactly as a fresh ClientApp process would: nothing survives between calls
except the site's files. A refusal reaches the coordinator as the generic code ``refused-dp`` only; its reason
stays at the site, in its audit trail and its log, which is where these tests read it. On the code before this
change the accountant lived in Flower's node state (a new run or a restarted node started from zero), the
coordinator set delta and the noise (noise 0.3, delta 0.5 and noise 0 were accepted), the reply carried the exact
tile count, and the coordinator's class list selected which tiles were counted.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from pixcell_fed.bundle.approval import SiteAuthority
from pixcell_fed.bundle.state import trail_path
from pixcell_fed.bundle.trail import append_event, verify_trail
from pixcell_fed.federation import dp_ledger as L
from pixcell_fed.federation import protocol as P
from pixcell_fed.federation.dp_rounds import DPReply, DPRequest, federated_dp_finetune
from pixcell_fed.federation.site_server import REQUEST_LOG, SiteSettings, answer
from pixcell_fed.federation.transport import Reply, reply_of_content
from pixcell_fed.testing.federation import TINY_VIT, real_labelled_tiles, write_labelled_folder
from pixcell_fed.training.dp import DPSettings, DPSteps
from pixcell_fed.training.dp_accounting import epsilon_spent
from pixcell_fed.training.models import ModelSpec, build_model

# a ViT of about 7,000 parameters: DP-SGD's per-sample gradients are costly on a shared 2-core machine
SPEC = ModelSpec(arch=TINY_VIT["arch"], classes=("dense", "sparse"), img_size=32,
                 kwargs={"patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2})
N_TRAIN = 10
ONE_ROUND = DPSteps(noise_multiplier=1.0, sample_rate=0.5, steps=2)  # 10 tiles, batch 5: rate 1/2, 2 steps
DELTA = 0.01  # 1/(10 N) for N = 10


@pytest.fixture(scope="module")
def tiles():
    return real_labelled_tiles(N_TRAIN, size=32, seed=21)


@pytest.fixture
def site(tmp_path, tiles):
    """A site folder with its site.yaml (default policy unless a test rewrites it) and real training tiles."""
    write_labelled_folder(tmp_path / "train", tiles)
    return _write_config(tmp_path)


def _write_config(root, **dp):
    config = {"site": {"name": "alpha", "work_dir": "work"}, "federation": {"train_dir": "train", "dp": dp}}
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    return root / "site.yaml"


def _node(config) -> SiteSettings:
    """What a fresh ClientApp process reads from the SuperNode's node config."""
    return SiteSettings.from_node_config({P.NODE_SITE_NAME: "alpha", P.NODE_SITE_CONFIG: str(config)})


def _request(round_no=1, spec=SPEC, **settings):
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    values = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "epochs": 1, "batch_size": 5, "lr": 0.05, **settings}
    return DPRequest(round=round_no, settings=DPSettings(**values)).to_record(state, spec)


def _answer(content, config):
    """A ``train`` message answered through the site's boundary, as its ClientApp answers the coordinator."""
    return answer(P.MSG_TRAIN, content, _node(config), flower_run=1)


def _train(config, round_no=1, **settings):
    return _answer(_request(round_no, **settings), config)


def _reply(content) -> DPReply:
    """The reply as the coordinator reads it (a refusal: its generic code only)."""
    code = P.error_code(content)
    if code is not None:
        return DPReply.refused(code)
    torch.manual_seed(0)
    return DPReply.from_record(content, build_model(SPEC).state_dict())


def _refusal(config) -> str:
    """Why the site refused its last round: recorded in its audit trail, never sent."""
    entry = _trail(config)[-1]
    assert entry["event"] == L.TRAIL_REFUSED
    return entry["reason"]


def _trail(config) -> list[dict]:
    return verify_trail(trail_path(config.parent / "work")).entries


def _ledger_count(config) -> int:
    return verify_trail(L.ledger_path(config.parent / "work")).count


# ------------------------------------------------------------------------------------------ ledger

def test_epsilon_accumulates_across_rounds_runs_and_node_restarts(site):
    first = [_reply(_train(site, round_no=r)) for r in (1, 2)]  # run 1: two rounds
    again = _reply(_train(site, round_no=1))                      # run 2 (a new flwr run, a restarted node): round 1
    for k, reply in enumerate([*first, again], start=1):
        assert reply.status == "trained" and reply.delta == DELTA
        # independent: Opacus's PRV accountant run separately on k rounds' steps
        from opacus.accountants import PRVAccountant

        accountant = PRVAccountant()
        accountant.history = [(1.0, 0.5, 2 * k)]
        assert abs(reply.epsilon - accountant.get_epsilon(delta=DELTA)) < 1e-6
        assert abs(reply.epsilon_remaining - (8.0 - reply.epsilon)) < 1e-9
    assert first[0].epsilon < first[1].epsilon < again.epsilon
    assert _ledger_count(site) == 3
    rounds = [e for e in _trail(site) if e["event"] == L.TRAIL_TRAIN]
    assert [e["ledger_seq"] for e in rounds] == [0, 1, 2] and rounds[-1]["epsilon"] == again.epsilon


def _spend(config, round_no):
    """A round's spend written through the ledger's own API, without the training (keeps these tests fast)."""
    record = L.StepRecord(round=round_no, noise_multiplier=1.0, sample_rate=0.5, steps=2, delta=DELTA,
                          train_set_sha256="1" * 64)
    with L.locked_ledger(config.parent / "work") as ledger:
        L.record_round(ledger, record, epsilon=ledger.epsilon(DELTA, record))


def _damage_delete(ledger):
    ledger.unlink()
    (ledger.parent / (ledger.name + ".head")).unlink()


def _damage_edit(ledger):
    lines = ledger.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"steps":2', '"steps":1')
    ledger.write_text("".join(lines))


@pytest.mark.parametrize("damage", ["deleted", "ledger file only deleted", "edited", "older copy", "trail ahead"])
def test_lost_or_damaged_ledger_fails_closed(site, damage):
    ledger = L.ledger_path(site.parent / "work")
    _spend(site, 1)
    backup = site.parent / "backup"
    backup.mkdir()
    for p in ledger.parent.glob("ledger.jsonl*"):
        shutil.copy(p, backup / p.name)
    _spend(site, 2)
    if damage == "deleted":
        _damage_delete(ledger)
    elif damage == "ledger file only deleted":
        ledger.unlink()
    elif damage == "edited":
        _damage_edit(ledger)
    elif damage == "older copy":  # a consistent, verifiable ledger, but older than the trail
        for p in backup.iterdir():
            shutil.copy(p, ledger.parent / p.name)
    else:  # a spend written to the trail but not to the ledger (crash between the two)
        append_event(trail_path(site.parent / "work"), L.TRAIL_TRAIN, **L.StepRecord(
            round=3, noise_multiplier=1.0, sample_rate=0.5, steps=2, delta=DELTA, train_set_sha256="0" * 64).to_fields(),
            ledger_seq=2)
    before = _trail(site)[-1]["seq"]
    content = _train(site, round_no=3)
    reply = _reply(content)
    assert reply.status == "refused" and reply.reason == "refused-dp" and reply.state is None
    assert set(content) == {P.KEY_ERROR}  # the detail names site files: it stays at the site
    refused = _trail(site)[-1]
    assert refused["event"] == L.TRAIL_REFUSED and refused["seq"] == before + 1 and "ledger" in refused["reason"]
    assert "ledger" in (site.parent / "work" / REQUEST_LOG).read_text()  # and in the site's own log


def _authority(config, *officers) -> SiteAuthority:
    """What site.yaml says: the site's name, its work folder and the public keys of its privacy officers."""
    return SiteAuthority(name="alpha", work_dir=config.parent / "work", officers=tuple(k.public_key() for k in officers))


def _ledger_files(config) -> dict[str, bytes]:
    work = config.parent / "work"
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}


def test_officer_reset_keeps_every_spend_and_is_signed(site):
    from pixcell_fed.keys import fingerprint, generate_private_key

    _spend(site, 1)
    spent = epsilon_spent([ONE_ROUND], DELTA)
    _damage_edit(L.ledger_path(site.parent / "work"))
    assert _reply(_train(site, round_no=2)).status == "refused"
    officer = generate_private_key()
    summary = L.reset_ledger(_authority(site, generate_private_key(), officer), officer,
                             reason="disk restored from backup")
    assert summary["restored_rounds"] == 1 and summary["officer"] == fingerprint(officer.public_key())
    assert (L.ledger_dir(site.parent / "work") / summary["previous"] / "ledger.jsonl").is_file()  # kept, not deleted
    reset = _trail(site)[-1]
    assert reset["event"] == L.TRAIL_RESET and reset["officer"] == summary["officer"] and reset["signature"]
    ledger = L.read_ledger(site.parent / "work")
    assert abs(ledger.epsilon(DELTA) - spent) < 1e-9  # the reset forgot nothing
    after = _reply(_train(site, round_no=2))
    assert after.status == "trained" and abs(after.epsilon - epsilon_spent([ONE_ROUND, ONE_ROUND], DELTA)) < 1e-9


def test_a_reset_by_a_key_the_site_does_not_list_is_refused_and_changes_nothing(site):
    """Before, any Ed25519 key reset the ledger: an insider with a key of their own could replace it at will."""
    from pixcell_fed.errors import ConfigError, ExitCode, PrivacyGateRefused
    from pixcell_fed.keys import generate_private_key

    _spend(site, 1)
    _damage_edit(L.ledger_path(site.parent / "work"))
    before = _ledger_files(site)
    officer, stranger = generate_private_key(), generate_private_key()
    with pytest.raises(PrivacyGateRefused, match="not one of the privacy officers of site alpha") as refused:
        L.reset_ledger(_authority(site, officer), stranger, reason="disk restored", confirm=lambda: True)
    assert refused.value.exit_code == ExitCode.PRIVACY_REFUSED
    with pytest.raises(ConfigError, match="lists no privacy officer"):
        L.reset_ledger(_authority(site), officer, reason="disk restored")
    assert _ledger_files(site) == before  # nothing moved aside, nothing appended to the ledger or the trail
    assert L.ledger_status(site.parent / "work", budget=8.0, delta=DELTA)["ok"] is False  # still damaged
    L.reset_ledger(_authority(site, officer), officer, reason="disk restored")
    assert L.read_ledger(site.parent / "work").records  # the listed officer reset it, the spend carried over


def test_forged_reset_is_refused(site):
    """A reset entry whose signature does not verify (chain and trail intact) does not count as a reset."""
    from pixcell_fed.keys import generate_private_key

    _spend(site, 1)
    officer = generate_private_key()
    L.reset_ledger(_authority(site, officer), officer, reason="test")
    ledger = L.ledger_path(site.parent / "work")
    entry = json.loads(ledger.read_text().splitlines()[0])
    fields = {k: v for k, v in entry.items() if k not in ("seq", "time", "event", "prev")}
    fields["restored"] = []  # the forger drops the carried-over spend ...
    _damage_delete(ledger)
    append_event(ledger, L.EVENT_RESET, **fields)  # ... keeping the old signature over the original statement
    with pytest.raises(L.PrivacyLedgerError, match="signature"):
        L.read_ledger(site.parent / "work")


def test_budget_refused_before_training_with_what_is_left(site):
    one, two = epsilon_spent([ONE_ROUND], DELTA), epsilon_spent([ONE_ROUND, ONE_ROUND], DELTA)
    budget = round((one + two) / 2, 3)
    _write_config(site.parent, epsilon_budget=budget)
    assert _reply(_train(site, round_no=1)).status == "trained"
    reply = _reply(_train(site, round_no=2))
    assert reply.status == "refused" and reply.reason == "refused-dp" and reply.state is None
    why = _refusal(site)  # the site's trail says what was spent and what is left
    assert "budget" in why and f"from {one:.3f}" in why and f"{budget - one:.3f} left" in why
    assert abs(L.read_ledger(site.parent / "work").epsilon(DELTA) - one) < 1e-9
    assert _ledger_count(site) == 1  # nothing spent


# ------------------------------------------------------------------------------------------ policy and the reply

@pytest.mark.parametrize("asked,why", [
    ({"noise_multiplier": 0.3}, "below this site's floor"),
    ({"max_grad_norm": 5.0}, "above this site's maximum"),
    ({"epochs": 3}, "exceed this site's maximum"),
    ({"batch_size": 2}, "outside this site's bounds"),
    ({"batch_size": 512}, "outside this site's bounds"),
])
def test_requests_outside_the_site_policy_are_refused(site, asked, why):
    reply = _reply(_train(site, **asked))
    assert reply.status == "refused" and reply.reason == "refused-dp" and reply.state is None
    assert why in _refusal(site) and _ledger_count(site) == 0


@pytest.mark.parametrize("noise", [0.0, -1.0, float("nan")])
def test_noise_zero_or_invalid_is_refused_before_training(site, noise):
    content = _request()
    content[P.KEY_REQUEST]["noise-multiplier"] = noise
    reply = _reply(_answer(content, site))
    assert reply.status == "refused" and "noise multiplier" in _refusal(site) and _ledger_count(site) == 0


def test_site_delta_above_one_tenth_over_n_is_refused(site, tiles):
    write_labelled_folder(site.parent / "train", tiles, prefix="more")  # N = 20: 1/(10 N) = 0.005
    _write_config(site.parent, delta=0.01)
    reply = _reply(_train(site))
    assert reply.status == "refused" and "delta" in _refusal(site) and _ledger_count(site) == 0


def test_only_the_model_and_the_privacy_spent_leave(site):
    content = _train(site)
    assert set(content.keys()) == {P.KEY_MODEL, P.KEY_MODEL_CONFIG, P.KEY_METRICS, P.KEY_INFO}
    assert set(content[P.KEY_METRICS].keys()) == {"epsilon", "epsilon-remaining", "delta", "examples"}
    assert dict(content[P.KEY_INFO]) == {"status": "trained"}
    assert content[P.KEY_METRICS]["examples"] == 100.0  # 10 tiles, rounded to the site's granularity of 100
    spend = _trail(site)[-1]
    assert spend["event"] == L.TRAIL_TRAIN and spend["epsilon"] == content[P.KEY_METRICS]["epsilon"]
    _write_config(site.parent, count_granularity=0)
    assert "examples" not in _train(site, round_no=2)[P.KEY_METRICS]


def test_the_coordinator_cannot_pick_which_labels_are_trained(site):
    """A class list that leaves out some of the site's labels is refused; the reply names no label."""
    spec = ModelSpec(arch=SPEC.arch, classes=("dense",), img_size=32, kwargs=SPEC.kwargs)
    content = _answer(_request(spec=spec), site)
    assert P.error_code(content) == "refused-dp" and set(content) == {P.KEY_ERROR}
    assert "do not cover this site's labels" in _refusal(site) and _ledger_count(site) == 0


def test_a_model_with_stochastic_depth_is_refused_without_spending(site):
    spec = ModelSpec(arch=SPEC.arch, classes=SPEC.classes, img_size=32, kwargs={**SPEC.kwargs, "depth": 2, "drop_path_rate": 0.1})
    content = _answer(_request(spec=spec), site)
    assert P.error_code(content) == "refused-dp" and "stochastic" in _refusal(site)
    assert _ledger_count(site) == 0


# ------------------------------------------------------------------------------------------ the coordinator

class _Transport:
    """Two sites answered by the real handler (one with a stricter floor) and one sending NaN weights."""

    def __init__(self, configs):
        self.configs = configs

    def exchange(self, requests, *, timeout):
        out = {}
        for node, (kind, content) in requests.items():
            assert kind == P.MSG_TRAIN
            if node == 3:
                reply = _answer(content, self.configs[0])
                reply[P.KEY_MODEL] = type(reply[P.KEY_MODEL])({k: type(a)(a.numpy() * math.nan) for k, a in reply[P.KEY_MODEL].items()})
                out[node] = Reply(content=reply)
            else:
                out[node] = reply_of_content(_answer(content, self.configs[node - 1]))
        return out


def test_coordinator_rounds_average_trained_sites_and_report_the_others(tmp_path, tiles):
    configs = []
    for name, dp in (("a", {}), ("b", {"min_noise_multiplier": 2.0})):
        write_labelled_folder(tmp_path / name / "train", tiles)
        configs.append(_write_config(tmp_path / name, **dp))
    torch.manual_seed(0)
    model = build_model(SPEC)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, epochs=1, batch_size=5, lr=0.05)
    report = federated_dp_finetune(_Transport(configs), {"a": 1, "b": 2, "c": 3}, model, SPEC, settings, rounds=2,
                                   out_dir=tmp_path / "dp_model", timeout=10)
    a, b, c = (report["privacy"][s] for s in "abc")
    assert a["status"] == "trained" and a["rounds"] == 2 and len(a["epsilon_by_round"]) == 2
    assert b["status"] == "refused" and b["reason"] == "refused-dp" and b["rounds"] == 0
    assert "below this site's floor 2" in _refusal(configs[1])  # the reason stays at the site
    assert c["status"] == "no answer" and "not finite" in c["reason"]
    assert report["rounds"] == [{"round": 1, "sites": ["a"]}, {"round": 2, "sites": ["a"]}]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert (tmp_path / "dp_model" / "model.safetensors").is_file()


def test_cli_shows_the_spend_refuses_a_damaged_ledger_and_an_officer_resets_it(site, capsys):
    from site_agent.cli import main

    from pixcell_fed.keys import public_key_text, write_key_pair

    _spend(site, 1)
    assert main(["privacy-ledger", "--config", str(site), "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ok"] and status["rounds"] == 1 and abs(status["epsilon"] - epsilon_spent([ONE_ROUND], DELTA)) < 1e-9
    assert abs(status["epsilon_remaining"] - (8.0 - status["epsilon"])) < 1e-9
    _damage_edit(L.ledger_path(site.parent / "work"))
    assert main(["privacy-ledger", "--config", str(site)]) == 3
    assert "DAMAGED" in capsys.readouterr().out
    key, _, public = write_key_pair(site.parent / "officer" / "officer.key")
    stranger, _, _ = write_key_pair(site.parent / "stranger" / "officer.key")
    config = yaml.safe_load(site.read_text())
    config["keys"] = {"officers": [public_key_text(public)]}  # the administrator lists the officer in site.yaml
    site.write_text(yaml.safe_dump(config))
    before = _ledger_files(site)
    assert main(["privacy-ledger-reset", "--config", str(site), "--key", str(stranger), "--reason", "x", "--yes"]) == 3
    assert "not one of the privacy officers" in capsys.readouterr().err and _ledger_files(site) == before
    assert main(["privacy-ledger-reset", "--config", str(site), "--key", str(key), "--reason", "restored", "--yes"]) == 0
    assert "1 round(s) carried over" in capsys.readouterr().out
    assert main(["privacy-ledger", "--config", str(site), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == 1
    assert _trail(site)[-1]["event"] == L.TRAIL_RESET
