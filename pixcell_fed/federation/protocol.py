"""The wire protocol between the coordinator and the sites: message names, record keys, packing, error codes.

Every exchange is one Flower message with a ``RecordDict``:

* ``query.manifest`` -- the site answers with its protocol version, tile count and the bundle's signed files
  (:data:`SIGNED_FILES`), packed like tiles, so that the coordinator verifies the bundle before asking for any tile.
* ``query.chunk`` -- the coordinator names the tile files it wants; the site answers with ONE concatenated uint8
  ``Array`` (Flower cuts it into 5 MiB pieces itself) plus the name and size of every file. One array per reply
  is what makes large transfers fast (see docs/federation.md). The coordinator checks every tile against the
  sha256 of the site-signed manifest, never against anything the reply says.
* ``evaluate`` -- the coordinator sends a model (``ArrayRecord`` of plain arrays + ``ConfigRecord`` with its spec);
  the site answers with rounded aggregate metrics only.
* ``train`` -- one round of the DP fine-tune on the site's real tiles.
* ``evaluate.augmentation`` -- what the pool adds at a site (opt-in): the site fine-tunes from the model sent and
  from a generic start on its own tiles and answers with the two sets of metrics and their difference only
  (:mod:`pixcell_fed.federation.augmentation_value`), within its evaluation limits and query budget.

A site that cannot or will not answer replies with one generic code from :data:`ERROR_CODES` under
:data:`KEY_ERROR` and keeps the detail in its own log: error texts would tell the coordinator which files exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pixcell_fed.bundle import layout as L
from pixcell_fed.errors import FederationError

if TYPE_CHECKING:  # flwr and numpy are imported where used
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, RecordDict

    from pixcell_fed.training.models import ModelSpec

PROTOCOL_VERSION = 2

MSG_MANIFEST = "query.manifest"
MSG_CHUNK = "query.chunk"
MSG_EVALUATE = "evaluate"
MSG_TRAIN = "train"
MSG_AUGMENTATION = "evaluate.augmentation"

# record keys
KEY_REQUEST = "request"  # ConfigRecord sent by the coordinator
KEY_SITE = "site"  # ConfigRecord: site-name, protocol, n-tiles, has-eval
KEY_DATA = "data"  # ArrayRecord holding one uint8 Array under ARRAY_NAME
KEY_FILES = "files"  # ConfigRecord: names, sizes, missing
KEY_MODEL = "model"  # ArrayRecord: model weights
KEY_MODEL_CONFIG = "model-config"  # ConfigRecord: spec (JSON string) of the model
KEY_METRICS = "metrics"  # MetricRecord
KEY_INFO = "info"  # ConfigRecord with small string facts
KEY_ERROR = "error"  # ConfigRecord: code (one of ERROR_CODES)
ARRAY_NAME = "bytes"

# node-config keys of a SuperNode (``flower-supernode --node-config``)
NODE_SITE_NAME = "site-name"
NODE_BUNDLE_DIR = "bundle-dir"
NODE_EVAL_DIR = "eval-dir"
NODE_TRAIN_DIR = "train-dir"
NODE_SITE_CONFIG = "site-config"  # the site's own site.yaml: evaluation limits, DP policy, work folder, SuperLink

#: the files of a bundle that travel with the manifest reply, in this order (tiles travel in chunks);
#: the audit summary page only when the bundle has one
SIGNED_FILES = (L.BUNDLE_JSON, L.MANIFEST, L.AUDIT, L.SUMMARY_HTML, L.SITE_SIG, L.OFFICER_SIG)
REQUIRED_SIGNED_FILES = (L.BUNDLE_JSON, L.MANIFEST, L.AUDIT, L.SITE_SIG, L.OFFICER_SIG)

#: the only answers a site gives when it does not answer a request; the reasons stay in the site's log
ERROR_CODES = (
    "bad-request",  # a request the protocol does not allow (malformed, wrong version, unknown names)
    "not-approved",  # the served bundle is not approved by the site's privacy officer (or was rejected)
    "unavailable",  # the site has nothing to serve for this request (no bundle, no held-out set, config)
    "refused-model",  # an evaluation model outside the site's registry, kinds or keyword-argument allow-list
    "refused-weights",  # weights that are not plain numeric arrays of the model's exact shapes
    "too-few-tiles",  # a class of the held-out set is smaller than the site's minimum
    "budget-exhausted",  # the site's per-run or per-day evaluation budget is spent
    "refused-dp",  # a DP request outside the site's DP policy or past its privacy budget
    "not-allowed",  # an optional measurement the site does not take part in (federation.allow_local_training)
    "internal",  # anything else (the detail is in the site's log)
)
#: numeric dtypes weights may travel as (never object arrays, which would need pickle)
WEIGHT_DTYPES = frozenset({"float16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"})
MAX_SPEC_CHARS = 65536


class Refusal(FederationError):
    """A site refuses a request; only :attr:`code` travels back to the coordinator."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(detail, hint=f"the coordinator is told only {code!r}")
        self.code = code


@dataclass(frozen=True)
class Packed:
    """Files concatenated into one uint8 array, with their names and sizes."""

    data: np.ndarray
    names: tuple[str, ...]
    sizes: tuple[int, ...]


def pack_files(items: Sequence[tuple[str, bytes]]) -> Packed:
    """Concatenate ``(name, bytes)`` pairs into one uint8 array, recording the sizes."""
    import numpy as np

    names = tuple(name for name, _ in items)
    blobs = [blob for _, blob in items]
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, dtype=np.uint8)
    return Packed(data=data, names=names, sizes=tuple(len(b) for b in blobs))


def unpack_files(data: np.ndarray | bytes, names: Sequence[Any], sizes: Sequence[Any]) -> list[tuple[str, bytes]]:
    """Split a packed array back into ``(name, bytes)``; :class:`FederationError` when the layout is inconsistent.

    Names are returned as the reply wrote them: the caller validates them before any use.
    """
    raw = bytes(data) if isinstance(data, (bytes, bytearray)) else data.tobytes()
    if len(names) != len(sizes) or not all(isinstance(n, str) for n in names):
        raise FederationError("a reply's file list is malformed (names and sizes differ)")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes) or sum(sizes) != len(raw):
        raise FederationError("a reply's file sizes do not add up to its data")
    out, offset = [], 0
    for name, size in zip(names, sizes):
        out.append((name, raw[offset : offset + size]))
        offset += size
    return out


# ----------------------------------------------------------------------------------------------------- records


def packed_to_records(packed: Packed, content: RecordDict, *, missing: Sequence[str] = ()) -> None:
    """Put a packed set of files into ``content`` (KEY_DATA + KEY_FILES)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    content[KEY_DATA] = ArrayRecord({ARRAY_NAME: Array(packed.data)})
    content[KEY_FILES] = ConfigRecord(
        {"names": list(packed.names), "sizes": [int(s) for s in packed.sizes], "missing": list(missing)}
    )


def records_to_files(content: RecordDict) -> tuple[list[tuple[str, bytes]], list[Any]]:
    """Read KEY_DATA + KEY_FILES: ``([(name, bytes)], names the site reported missing)``, unvalidated names."""
    if KEY_DATA not in content or KEY_FILES not in content:
        raise FederationError(
            "a site's reply carries no files", hint="check that the site runs the same pixcell-fed version"
        )
    from flwr.app import ArrayRecord, ConfigRecord

    files = content[KEY_FILES]
    arrays = content[KEY_DATA]
    if (
        not isinstance(files, ConfigRecord)
        or not isinstance(arrays, ArrayRecord)
        or ARRAY_NAME not in arrays
        or arrays[ARRAY_NAME].dtype != "uint8"
        or arrays[ARRAY_NAME].stype != "numpy.ndarray"
    ):
        raise FederationError("a site's reply carries its files in an unexpected form")
    names, sizes, missing = (_list_field(files, key) for key in ("names", "sizes", "missing"))
    return unpack_files(arrays[ARRAY_NAME].numpy(), names, sizes), missing


def _list_field(record: ConfigRecord, key: str) -> list[Any]:
    """A list-valued field of a site's reply ([] when absent); :class:`FederationError` when it is not a list."""
    value = record.get(key, [])
    if not isinstance(value, list):
        raise FederationError(f"a site's reply carries its '{key}' in an unexpected form")
    return list(value)


def request_record(**values: ConfigRecordValues) -> RecordDict:
    """A coordinator request: one ConfigRecord under KEY_REQUEST (lists of strings, ints, floats, strings)."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({KEY_REQUEST: ConfigRecord({"protocol": PROTOCOL_VERSION, **values})})


def error_record(code: str) -> RecordDict:
    """A site's refusal: the generic code only."""
    from flwr.app import ConfigRecord, RecordDict

    if code not in ERROR_CODES:
        code = "internal"
    return RecordDict({KEY_ERROR: ConfigRecord({"code": code, "protocol": PROTOCOL_VERSION})})


def error_code(content: RecordDict) -> str | None:
    """The generic code of a site's refusal, or None when ``content`` is an answer (unknown codes read 'internal')."""
    if KEY_ERROR not in content:
        return None
    code = content[KEY_ERROR].get("code")
    return code if isinstance(code, str) and code in ERROR_CODES else "internal"


def model_to_records(state: dict, spec: ModelSpec, content: RecordDict) -> None:
    """Put model weights (a state dict of tensors) and its spec (:meth:`ModelSpec.to_wire`: no training history,
    never a weights file) into ``content``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    content[KEY_MODEL] = ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})
    content[KEY_MODEL_CONFIG] = ConfigRecord({"spec": spec.to_wire()})


def arrays_to_tensors(record: ArrayRecord, *, max_bytes: int | None = None) -> dict:
    """Weights as torch tensors, accepting plain numeric numpy arrays only (never a pickle, whatever it claims)."""
    import torch

    state, total = {}, 0
    for name, array in record.items():
        if array.stype != "numpy.ndarray" or array.dtype not in WEIGHT_DTYPES:
            raise Refusal(
                "refused-weights",
                f"weight {name!r} travels as {array.stype!r} {array.dtype!r}, not a plain numeric numpy array",
            )
        total += len(array.data)
        if max_bytes is not None and total > max_bytes:
            raise Refusal("refused-weights", f"the weights exceed {max_bytes} bytes")
        try:
            values = array.numpy()  # np.load(..., allow_pickle=False) inside Flower; the dtype is checked again below
        except ValueError as exc:
            raise Refusal("refused-weights", f"weight {name!r} is not a plain array ({exc})") from exc
        if str(values.dtype) not in WEIGHT_DTYPES:
            raise Refusal("refused-weights", f"weight {name!r} decodes to dtype {values.dtype}")
        # not ArrayRecord.to_torch_state_dict(): it refuses when flwr was imported before torch (a fresh ClientApp)
        state[str(name)] = torch.from_numpy(values.copy())
    return state


def records_to_model(content: RecordDict, *, max_bytes: int | None = None) -> tuple[dict, ModelSpec]:
    """Model weights (torch tensors, plain arrays only) and the validated spec (:meth:`ModelSpec.from_wire`) back
    from ``content``; :class:`Refusal` otherwise."""
    from pixcell_fed.training.models import ModelSpec, SpecError

    if KEY_MODEL not in content or KEY_MODEL_CONFIG not in content:
        raise Refusal("bad-request", "the message carries no model ('model' and 'model-config')")
    text = content[KEY_MODEL_CONFIG].get("spec")
    if not isinstance(text, str) or len(text) > MAX_SPEC_CHARS:
        raise Refusal("refused-model", "the model spec is not a short JSON string")
    try:
        spec = ModelSpec.from_wire(text)
    except SpecError as exc:
        raise Refusal("refused-model", f"the model spec is invalid: {exc}") from exc
    from flwr.app import ArrayRecord

    weights = content[KEY_MODEL]
    if not isinstance(weights, ArrayRecord):
        raise Refusal("refused-model", "the model weights are not an array record")
    return arrays_to_tensors(weights, max_bytes=max_bytes), spec


def config_values(record: Any, keys: Mapping[str, type]) -> dict[str, Any]:
    """The typed values of ``keys`` present in a ConfigRecord (others ignored); :class:`Refusal` on a wrong type."""
    out = {}
    for key, kind in keys.items():
        if key not in record:
            continue
        value = record[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise Refusal("bad-request", f"request field {key!r} is not a {kind.__name__}")
        out[key] = value
    return out
