"""Chunk packing, the record helpers and the generic error codes of the federation protocol; reply validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixcell_fed.errors import FederationError
from pixcell_fed.federation import protocol as P
from pixcell_fed.federation import validation as V
from pixcell_fed.training.models import ModelSpec


def test_pack_unpack_roundtrip_and_inconsistent_layouts():
    items = [("a.png", b"\x89PNG" + bytes(range(200))), ("b.png", b""), ("c.png", b"xyz" * 1000)]
    packed = P.pack_files(items)
    assert packed.data.dtype == np.uint8 and packed.data.size == sum(len(b) for _, b in items)
    assert P.unpack_files(packed.data, packed.names, packed.sizes) == items
    # sizes that do not add up, negative sizes, non-integer sizes or names: the whole reply is unusable
    for names, sizes, data in ((packed.names, packed.sizes, packed.data[:-1]),
                               (packed.names, (205, -1, 3001), packed.data),
                               (packed.names, (204.0, 0, 3000), packed.data),
                               (("a.png", 7, "c.png"), packed.sizes, packed.data),
                               (packed.names[:2], packed.sizes, packed.data)):
        with pytest.raises(FederationError):
            P.unpack_files(data, names, sizes)


def test_records_roundtrip():
    from flwr.app import RecordDict

    content = RecordDict()
    P.packed_to_records(P.pack_files([("x.png", b"1234")]), content, missing=["gone.png"])
    assert P.records_to_files(content) == ([("x.png", b"1234")], ["gone.png"])
    with pytest.raises(FederationError):
        P.records_to_files(RecordDict())

    state = torch.nn.Linear(3, 2).state_dict()
    P.model_to_records(state, ModelSpec(arch="x", classes=("a", "b"), pretrained_file="/srv/w"), content)
    back, spec = P.records_to_model(content)
    assert spec == ModelSpec(arch="x", classes=("a", "b"))  # never a path of the coordinator's
    assert torch.equal(back["weight"], state["weight"]) and torch.equal(back["bias"], state["bias"])
    req = P.request_record(files=["a", "b"])
    assert list(req[P.KEY_REQUEST]["files"]) == ["a", "b"] and req[P.KEY_REQUEST]["protocol"] == P.PROTOCOL_VERSION


def test_weights_travel_as_plain_numeric_arrays_only():
    from flwr.app import Array, ArrayRecord

    ok = ArrayRecord({"w": Array(np.ones((2, 2), dtype=np.float32))})
    assert P.arrays_to_tensors(ok)["w"].shape == (2, 2)
    with pytest.raises(P.Refusal) as info:
        P.arrays_to_tensors(ok, max_bytes=4)
    assert info.value.code == "refused-weights"
    strings = ArrayRecord({"w": Array(dtype="<U3", shape=(1,), stype="numpy.ndarray", data=b"")})
    with pytest.raises(P.Refusal, match="not a plain numeric"):
        P.arrays_to_tensors(strings)


def test_error_codes_are_generic():
    reply = P.error_record("not-approved")
    assert P.error_code(reply) == "not-approved" and set(reply) == {P.KEY_ERROR}
    assert P.error_code(P.error_record("a detailed reason with /a/path")) == "internal"
    assert P.error_code(P.request_record()) is None
    with pytest.raises(ValueError):
        P.Refusal("because /etc/passwd exists", "detail")


def test_reply_values_are_validated_against_strict_patterns():
    for bad in ("../x", "/abs", "a/b", "", ".", "x" * 65, "é", None, 3):
        with pytest.raises(V.ReplyRejected):
            V.site_name(bad, "site")
    assert V.site_name("hospital-a_2", "site") == "hospital-a_2"
    for bad in ("..", "../run", "a/b", "", None):
        with pytest.raises(V.ReplyRejected):
            V.run_id(bad, "run")
    assert V.run_id("run-2025.01", "run") == "run-2025.01"
    for bad in ("../" + "a" * 32 + ".png", "A" * 32 + ".png", "a" * 32 + ".PNG", "tile.png"):
        with pytest.raises(V.ReplyRejected):
            V.tile_name(bad, "tile")
    for bad in (-1, True, 1.5, "3", 10 ** 12):
        with pytest.raises(V.ReplyRejected):
            V.count(bad, "n")


def test_signed_files_of_a_manifest_reply():
    base = {n: b"x" for n in P.REQUIRED_SIGNED_FILES}
    assert V.signed_files(list(base.items()), "r") == base
    for bad in ([*base.items(), ("signatures/../../x", b"")], [*base.items(), ("tiles/a.png", b"")],
                [(n, b) for n, b in base.items() if n != "bundle.json"], [*base.items(), ("audit.json", b"y")]):
        with pytest.raises(V.ReplyRejected):
            V.signed_files(bad, "r")


def test_metrics_of_an_evaluation_reply():
    good = {"accuracy": 0.5, "balanced_accuracy": 0.25, "macro_f1": 1.0, "n": 12.0, "extra": 3.0}
    assert V.metrics(good, ("accuracy", "balanced_accuracy", "macro_f1"), "r") == {k: v for k, v in good.items() if k != "extra"}
    for bad in ({**good, "accuracy": 1.5}, {**good, "macro_f1": float("nan")}, {**good, "n": 2.5},
                {k: v for k, v in good.items() if k != "n"}):
        with pytest.raises(V.ReplyRejected):
            V.metrics(bad, ("accuracy", "balanced_accuracy", "macro_f1"), "r")


def test_names_come_from_keys():
    from pixcell_fed.bundle.trust import TrustedSite, TrustStore, auth_key_der
    from pixcell_fed.federation.node_identity import NodeIdentity, identify_nodes
    from pixcell_fed.testing.federation import _pem, auth_key_for_tests

    trust = TrustStore({s: TrustedSite(s, None, (), auth_key_der(auth_key_for_tests(s))) for s in ("a", "b")})
    found = identify_nodes([NodeIdentity(5, _pem(auth_key_for_tests("b")), "b"),
                            NodeIdentity(3, _pem(auth_key_for_tests("a")), ""),        # no registered name: the key decides
                            NodeIdentity(4, _pem(auth_key_for_tests("a")), "a"),       # a second node with a's key
                            NodeIdentity(6, _pem(auth_key_for_tests("c")), "b"),       # b's name, an unknown key
                            NodeIdentity(7, None, "a"),                                 # no key at all
                            NodeIdentity(8, b"garbage", "a")], trust)
    assert found.sites == {"a": 3, "b": 5} and sorted(found.ignored) == [4, 6, 7, 8]
