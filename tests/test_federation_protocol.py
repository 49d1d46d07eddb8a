"""Chunk packing and the record helpers of the federation protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixcell_fed.errors import FederationError
from pixcell_fed.federation import protocol as P
from pixcell_fed.training.models import ModelSpec


def test_pack_unpack_roundtrip_and_corruption():
    items = [("a.png", b"\x89PNG" + bytes(range(200))), ("b.png", b""), ("c.png", b"xyz" * 1000)]
    packed = P.pack_files(items)
    assert packed.data.dtype == np.uint8 and packed.data.size == sum(len(b) for _, b in items)
    good, bad = P.unpack_files(packed.data, packed.names, packed.sizes, packed.sha256)
    assert good == dict(items) and bad == []

    corrupt = packed.data.copy()
    corrupt[len(items[0][1]) + 5] ^= 1  # a byte inside c.png
    good, bad = P.unpack_files(corrupt, packed.names, packed.sizes, packed.sha256)
    assert bad == ["c.png"] and set(good) == {"a.png", "b.png"}

    # sizes that do not add up make the whole reply unusable
    good, bad = P.unpack_files(packed.data[:-1], packed.names, packed.sizes, packed.sha256)
    assert good == {} and bad == list(packed.names)


def test_records_roundtrip():
    from flwr.app import RecordDict

    content = RecordDict()
    P.packed_to_records(P.pack_files([("x.png", b"1234")]), content, missing=["gone.png"])
    good, bad, missing = P.records_to_files(content)
    assert good == {"x.png": b"1234"} and bad == [] and missing == ["gone.png"]

    with pytest.raises(FederationError):
        P.records_to_files(RecordDict())

    state = torch.nn.Linear(3, 2).state_dict()
    P.model_to_records(state, ModelSpec(arch="x", classes=("a", "b")), content)
    back, spec = P.records_to_model(content)
    assert spec == ModelSpec(arch="x", classes=("a", "b"))
    assert torch.equal(back["weight"], state["weight"]) and torch.equal(back["bias"], state["bias"])
    req = P.request_record(files=["a", "b"])
    assert list(req[P.KEY_REQUEST]["files"]) == ["a", "b"] and req[P.KEY_REQUEST]["protocol"] == P.PROTOCOL_VERSION
