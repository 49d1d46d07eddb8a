"""The wire protocol between the coordinator and the sites: message names, record keys and chunk packing.

Every exchange is one Flower message with a ``RecordDict``:

* ``query.manifest`` -- the site answers with its name, tile count and the bundle's signed files (manifest,
  bundle.json, audit.json, signatures), packed like a chunk, so that the coordinator can verify the bundle
  before accepting any tile.
* ``query.chunk`` -- the coordinator names the tile files it wants; the site answers with ONE concatenated
  uint8 ``Array`` (Flower cuts it into 5 MiB pieces itself) plus the size and sha256 of every file. One array
  per reply is what makes large transfers fast (see docs/federation.md).
* ``evaluate`` -- the coordinator sends a model (``ArrayRecord`` of weights + ``ConfigRecord`` describing it);
  the site answers with metrics only.
* ``train`` -- one round of the DP fine-tune on the site's real tiles; the site answers with updated weights,
  the number of examples and the privacy spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from pixcell_fed.errors import FederationError
from pixcell_fed.hashing import sha256_bytes

if TYPE_CHECKING:  # flwr and numpy are imported where used
    import numpy as np
    from flwr.app import RecordDict

    from pixcell_fed.training.models import ModelSpec

PROTOCOL_VERSION = 1

MSG_MANIFEST = "query.manifest"
MSG_CHUNK = "query.chunk"
MSG_EVALUATE = "evaluate"
MSG_TRAIN = "train"

# record keys
KEY_REQUEST = "request"          # ConfigRecord sent by the coordinator
KEY_SITE = "site"                # ConfigRecord: site-name, protocol, n-tiles, total-bytes
KEY_DATA = "data"                # ArrayRecord holding one uint8 Array under ARRAY_NAME
KEY_FILES = "files"              # ConfigRecord: names, sizes, sha256, missing
KEY_MODEL = "model"              # ArrayRecord: model weights
KEY_MODEL_CONFIG = "model-config"  # ConfigRecord: spec (JSON string) of the model
KEY_METRICS = "metrics"          # MetricRecord
KEY_INFO = "info"                # ConfigRecord with small string facts (e.g. error reasons)
ARRAY_NAME = "bytes"

# node-config keys of a SuperNode (``flower-supernode --node-config``)
NODE_SITE_NAME = "site-name"
NODE_BUNDLE_DIR = "bundle-dir"
NODE_EVAL_DIR = "eval-dir"
NODE_TRAIN_DIR = "train-dir"
NODE_SITE_CONFIG = "site-config"  # the site's own site.yaml (its DP policy and work folder)

# the signed files of a bundle that travel with the manifest (tiles travel in chunks)
BUNDLE_SIGNED_FILES = ("manifest.parquet", "bundle.json", "audit.json")
BUNDLE_SIGNATURES_DIR = "signatures"


sha256_hex = sha256_bytes


@dataclass(frozen=True)
class Packed:
    """Files concatenated into one uint8 array, with their names, sizes and sha256."""

    data: "np.ndarray"
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    sha256: tuple[str, ...]


def pack_files(items: Sequence[tuple[str, bytes]]) -> Packed:
    """Concatenate ``(name, bytes)`` pairs into one uint8 array, recording sizes and hashes."""
    import numpy as np

    names = tuple(name for name, _ in items)
    blobs = [blob for _, blob in items]
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, dtype=np.uint8)
    return Packed(data=data, names=names, sizes=tuple(len(b) for b in blobs), sha256=tuple(sha256_hex(b) for b in blobs))


def unpack_files(data: "np.ndarray | bytes", names: Sequence[str], sizes: Sequence[int],
                 sha256: Sequence[str]) -> tuple[dict[str, bytes], list[str]]:
    """Split a packed array back into files; returns (good files by name, names whose bytes did not verify).

    A file is good only if its slice has the announced size and sha256. A reply whose sizes do not add up to the
    array length marks every file as bad (the reply is unusable, ask again).
    """
    raw = bytes(data) if isinstance(data, (bytes, bytearray)) else data.tobytes()
    if not (len(names) == len(sizes) == len(sha256)):
        return {}, list(names)
    if sum(int(s) for s in sizes) != len(raw) or any(int(s) < 0 for s in sizes):
        return {}, list(names)
    good: dict[str, bytes] = {}
    bad: list[str] = []
    offset = 0
    for name, size, digest in zip(names, sizes, sha256):
        blob = raw[offset:offset + int(size)]
        offset += int(size)
        if sha256_hex(blob) == digest:
            good[name] = blob
        else:
            bad.append(name)
    return good, bad


# ----------------------------------------------------------------------------------------------------- records

def packed_to_records(packed: Packed, content: "RecordDict", *, missing: Sequence[str] = ()) -> None:
    """Put a packed set of files into ``content`` (KEY_DATA + KEY_FILES)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    content[KEY_DATA] = ArrayRecord({ARRAY_NAME: Array(packed.data)})
    content[KEY_FILES] = ConfigRecord({
        "names": list(packed.names), "sizes": [int(s) for s in packed.sizes], "sha256": list(packed.sha256),
        "missing": list(missing),
    })


def records_to_files(content: "RecordDict") -> tuple[dict[str, bytes], list[str], list[str]]:
    """Read KEY_DATA + KEY_FILES: (good files, corrupt names, names the site reported missing)."""
    if KEY_DATA not in content or KEY_FILES not in content:
        raise FederationError("a site's reply carries no files", hint="check that the site runs the same pixcell-fed version")
    files = content[KEY_FILES]
    array = content[KEY_DATA][ARRAY_NAME]
    good, bad = unpack_files(array.numpy(), list(files.get("names", [])), list(files.get("sizes", [])),
                             list(files.get("sha256", [])))
    return good, bad, list(files.get("missing", []))


def request_record(**values: object) -> "RecordDict":
    """A coordinator request: one ConfigRecord under KEY_REQUEST (lists of strings, ints, floats, strings)."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({KEY_REQUEST: ConfigRecord({"protocol": PROTOCOL_VERSION, **values})})


def model_to_records(state: dict, spec: "ModelSpec", content: "RecordDict") -> None:
    """Put model weights (a state dict of tensors) and its spec (:meth:`ModelSpec.to_wire`) into ``content``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    content[KEY_MODEL] = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})
    content[KEY_MODEL_CONFIG] = ConfigRecord({"spec": spec.to_wire()})


def records_to_model(content: "RecordDict") -> tuple[dict, "ModelSpec"]:
    """Model weights (torch tensors) and the validated spec back from ``content``."""
    import torch

    from pixcell_fed.training.models import ModelSpec, SpecError

    if KEY_MODEL not in content or KEY_MODEL_CONFIG not in content:
        raise FederationError("the message carries no model", hint="the coordinator must send 'model' and 'model-config'")
    try:
        spec = ModelSpec.from_wire(str(content[KEY_MODEL_CONFIG]["spec"]))
    except (SpecError, KeyError) as exc:
        raise FederationError(f"the message's model spec is invalid: {exc}",
                              hint="check that both sides run the same pixcell-fed version") from exc
    # not ArrayRecord.to_torch_state_dict(): it refuses when flwr was imported before torch (a fresh ClientApp)
    state = {k: torch.from_numpy(a.numpy().copy()) for k, a in content[KEY_MODEL].items()}
    return state, spec
