"""The site's side of the protocol: serve the approved bundle, evaluate models within the site's own limits.

Each Flower message starts a fresh ClientApp process, so these handlers load nothing in advance: they read the
bundle folder and the held-out folder named in the SuperNode's node config (and the site's own ``site.yaml``
when the node config names it), answer, and exit. The chunk path stays light (no pandas).

* Only an approved bundle is served: every manifest and chunk request checks ``bundle.json``'s state and the
  officer's signature over it first, and refuses otherwise.
* Every transfer is appended to the site's audit trail before its bytes leave (which coordinator run, which
  files, when, to which coordinator); a bundle whose trail cannot be written is not served.
* :func:`answer` is the one boundary: a refusal or a failure reaches the coordinator as one generic code
  (:data:`~pixcell_fed.federation.protocol.ERROR_CODES`); the detail stays in the site's log,
  ``<work_dir>/federation/requests.log``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.bundle import layout as L
from pixcell_fed.config.schema import FederationEvaluationConfig, LocalTrainingConfig
from pixcell_fed.errors import BundleError, UsageError
from pixcell_fed.federation import protocol as P
from pixcell_fed.runlog import get_logger

if TYPE_CHECKING:
    from flwr.app import RecordDict

log = get_logger(__name__)

REQUEST_LOG = "federation/requests.log"
MAX_NAMES_PER_REQUEST = 1_000_000


@dataclass(frozen=True)
class SiteSettings:
    """What a SuperNode's node config (and the site's own ``site.yaml``) tells the ClientApp."""

    site_name: str
    bundle_dir: Path | None
    eval_dir: Path | None
    train_dir: Path | None = None
    config_file: Path | None = None  # the site's own site.yaml: evaluation limits, DP policy, work folder
    evaluation: FederationEvaluationConfig = field(default_factory=FederationEvaluationConfig)
    work_dir: Path | None = None  # query budget and request log; default: the bundle's work folder
    coordinator: str = "the consortium coordinator"  # the SuperLink this site serves, as recorded in the trail
    allow_local_training: bool = False  # opt-in of the augmentation round (off without a site.yaml)
    local_training: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSettings:
        def path(key: str) -> Path | None:
            value = str(node_config.get(key, "") or "")
            return Path(value) if value else None

        name = str(node_config.get(P.NODE_SITE_NAME, "") or "")
        extra: dict[str, Any] = {}
        config_path = path(P.NODE_SITE_CONFIG)
        if config_path is not None:
            from pixcell_fed.config import load_site_config

            cfg = load_site_config(config_path)
            if name and name != cfg.site.name:
                raise UsageError(
                    f"the node config names site {name!r}, {config_path} names {cfg.site.name!r}",
                    hint="start the SuperNode with 'site-agent serve --config site.yaml'",
                )
            name = cfg.site.name
            extra = {
                "config_file": config_path,
                "evaluation": cfg.federation.evaluation,
                "work_dir": cfg.site.work_dir,
                "coordinator": cfg.federation.superlink,
                "allow_local_training": cfg.federation.allow_local_training,
                "local_training": cfg.federation.local_training,
            }
        if not name:
            raise UsageError(
                f"the SuperNode has no '{P.NODE_SITE_NAME}' in its node config",
                hint="start it with 'site-agent serve --config site.yaml'",
            )
        return cls(
            site_name=name,
            bundle_dir=path(P.NODE_BUNDLE_DIR),
            eval_dir=path(P.NODE_EVAL_DIR),
            train_dir=path(P.NODE_TRAIN_DIR),
            **extra,
        )

    @property
    def site_work_dir(self) -> Path | None:
        if self.work_dir is not None:
            return self.work_dir
        from pixcell_fed.bundle.state import work_dir_of_bundle

        return work_dir_of_bundle(self.bundle_dir) if self.bundle_dir is not None else None


# ------------------------------------------------------------------------------------------------ the boundary


@contextlib.contextmanager
def _request_log(site: SiteSettings | None) -> Iterator[None]:
    work = site.site_work_dir if site is not None else None
    if work is None or not Path(work).is_dir():
        yield
        return
    from pixcell_fed.runlog import run_log

    with run_log(Path(work) / REQUEST_LOG):
        yield


def answer(
    kind: str, content: RecordDict, site: SiteSettings, *, flower_run: int | str, state: RecordDict | None = None
) -> RecordDict:
    """Answer one message, or refuse it with a generic code (the reason goes to the site's log only)."""
    with _request_log(site):
        try:
            reply = _dispatch(kind, content, site, flower_run, state)
        except P.Refusal as exc:
            log.warning(
                "site %s refused a %s request of coordinator run %s (%s): %s",
                site.site_name,
                kind,
                flower_run,
                exc.code,
                exc.message,
            )
            return P.error_record(exc.code)
        except Exception:
            log.exception("site %s failed a %s request of coordinator run %s", site.site_name, kind, flower_run)
            return P.error_record("internal")
        log.info("site %s answered a %s request of coordinator run %s", site.site_name, kind, flower_run)
        return reply


def answer_node(
    kind: str,
    content: RecordDict,
    node_config: Mapping[str, Any],
    *,
    flower_run: int | str,
    state: RecordDict | None = None,
) -> RecordDict:
    """:func:`answer` for a ClientApp: the site's settings come from the SuperNode's node config."""
    try:
        site = SiteSettings.from_node_config(node_config)
    except Exception:
        log.exception("the SuperNode's node config or site.yaml is unusable")
        return P.error_record("unavailable")
    return answer(kind, content, site, flower_run=flower_run, state=state)


def _dispatch(
    kind: str, content: RecordDict, site: SiteSettings, flower_run: int | str, state: RecordDict | None
) -> RecordDict:
    if P.KEY_REQUEST not in content or content[P.KEY_REQUEST].get("protocol") != P.PROTOCOL_VERSION:
        raise P.Refusal("bad-request", f"a {kind} request without protocol version {P.PROTOCOL_VERSION}")
    if kind == P.MSG_MANIFEST:
        return handle_manifest(content, site, flower_run)
    if kind == P.MSG_CHUNK:
        return handle_chunk(content, site, flower_run)
    if kind == P.MSG_EVALUATE:
        return handle_evaluate(content, site, flower_run)
    if kind == P.MSG_AUGMENTATION:
        return handle_augmentation(content, site, flower_run)
    if kind == P.MSG_TRAIN:
        return handle_train(content, site, state)
    raise P.Refusal("bad-request", f"unknown message type {kind!r}")


# -------------------------------------------------------------------------------------------- the bundle


def servable_bundle(site: SiteSettings) -> tuple[Path, dict]:
    """The site's bundle and its ``bundle.json``, if approved by an officer signature over exactly this state."""
    bundle = site.bundle_dir
    if bundle is None or not (bundle / L.BUNDLE_JSON).is_file():
        raise P.Refusal("unavailable", f"no bundle at {bundle}")
    try:
        info = L.read_bundle_json(bundle)
    except BundleError as exc:
        raise P.Refusal("unavailable", f"bundle {bundle}: {exc.message}") from exc
    if info["site"] != site.site_name:
        raise P.Refusal("unavailable", f"bundle {bundle} belongs to site {info['site']!r}, this is {site.site_name!r}")
    if info["state"] != L.STATE_APPROVED:
        raise P.Refusal("not-approved", f"bundle {bundle} is {info['state']}: only an approved bundle is served")
    try:
        key, signature = L.read_signature(bundle, L.OFFICER_SIG, role="officer")
    except (BundleError, OSError) as exc:
        raise P.Refusal("not-approved", f"bundle {bundle}: no valid officer signature ({exc})") from exc
    if not L.signature_valid(key, signature, L.statement(info, role="officer")):
        raise P.Refusal("not-approved", f"bundle {bundle}: the officer's signature does not match bundle.json")
    return bundle, info


def _record(event: str, site: SiteSettings, work: Path | None, flower_run: int | str, **fields: Any) -> None:
    """Append to the site's audit trail before anything leaves (fail closed: no trail, no answer)."""
    from pixcell_fed.bundle.state import trail_path
    from pixcell_fed.bundle.trail import append_event

    if work is None:
        raise P.Refusal(
            "unavailable",
            f"site {site.site_name}: no work folder whose audit trail could record this "
            "(serve a bundle where synthesize built it: <work>/runs/<run>/bundle)",
        )
    append_event(trail_path(work), event, coordinator_run=str(flower_run), to=site.coordinator, **fields)


def _record_export(
    bundle: Path, info: dict, site: SiteSettings, flower_run: int | str, *, part: str, files: list[str], n_bytes: int
) -> None:
    from pixcell_fed.bundle.state import work_dir_of_bundle

    _record(
        "export",
        site,
        work_dir_of_bundle(bundle),
        flower_run,
        run_id=info["run_id"],
        part=part,
        files=files,
        bytes=n_bytes,
    )


def handle_manifest(request: RecordDict, site: SiteSettings, flower_run: int | str) -> RecordDict:
    """Answer ``query.manifest``: protocol version, tile count and the bundle's signed files."""
    from flwr.app import ConfigRecord, RecordDict

    bundle, info = servable_bundle(site)
    names = [n for n in P.SIGNED_FILES if n != L.SUMMARY_HTML or info["files"][L.SUMMARY_HTML] is not None]
    missing = [n for n in names if not (bundle / n).is_file()]
    if missing:
        raise P.Refusal("unavailable", f"bundle {bundle} lacks {', '.join(missing)}")
    items = [(n, (bundle / n).read_bytes()) for n in names]
    _record_export(bundle, info, site, flower_run, part="manifest", files=names, n_bytes=sum(len(b) for _, b in items))
    content = RecordDict(
        {
            P.KEY_SITE: ConfigRecord(
                {
                    "site-name": site.site_name,
                    "protocol": P.PROTOCOL_VERSION,
                    "n-tiles": int(info["counts"]["tiles"]),
                    "has-eval": bool(site.eval_dir and site.eval_dir.is_dir()),
                }
            )
        }
    )
    P.packed_to_records(P.pack_files(items), content)
    return content


def _manifest_names(bundle: Path) -> set[str]:
    """The tile names of the bundle's manifest, read with pyarrow alone (the chunk path stays light: unlike
    ``pq.read_table``, ``ParquetFile.read`` does not import pandas)."""
    import pyarrow.parquet as pq

    return {str(n) for n in pq.ParquetFile(bundle / L.MANIFEST).read(columns=["file_name"]).column(0).to_pylist()}


def handle_chunk(request: RecordDict, site: SiteSettings, flower_run: int | str) -> RecordDict:
    """Answer ``query.chunk``: the requested tiles of the manifest, packed into one array; others are 'missing'."""
    from flwr.app import RecordDict

    from pixcell_fed.bundle.png import TILE_NAME_RE

    bundle, info = servable_bundle(site)
    wanted = request[P.KEY_REQUEST].get("files", [])
    names = [n for n in wanted if isinstance(n, str)] if isinstance(wanted, list) else []
    if not isinstance(wanted, list) or len(wanted) > MAX_NAMES_PER_REQUEST or len(names) != len(wanted):
        raise P.Refusal("bad-request", "a chunk request must name tiles as a list of strings")
    listed = _manifest_names(bundle)
    items, missing = [], []
    for name in names:
        if not TILE_NAME_RE.match(name):
            continue  # not a tile name: never looked up, never echoed
        path = bundle / L.TILES / name
        # serve prepared files only: a manifest entry, a plain file in tiles/
        if name not in listed or path.is_symlink() or not path.is_file():
            missing.append(name)
            continue
        items.append((name, path.read_bytes()))
    _record_export(
        bundle, info, site, flower_run, part="tiles", files=[n for n, _ in items], n_bytes=sum(len(b) for _, b in items)
    )
    content = RecordDict()
    P.packed_to_records(P.pack_files(items), content, missing=missing)
    return content


# -------------------------------------------------------------------------------------------- evaluation


def handle_evaluate(request: RecordDict, site: SiteSettings, flower_run: int | str) -> RecordDict:
    """Answer ``evaluate``: rounded aggregate metrics of the model on the site's held-out tiles, within its limits."""
    from flwr.app import MetricRecord, RecordDict

    from pixcell_fed.federation.evaluation import evaluate_request

    metrics = evaluate_request(request, site.evaluation, site.eval_dir, site.site_work_dir, flower_run)
    _record("evaluate", site, site.site_work_dir, flower_run, metrics=metrics)
    return RecordDict({P.KEY_METRICS: MetricRecord(dict(metrics))})


def handle_augmentation(request: RecordDict, site: SiteSettings, flower_run: int | str) -> RecordDict:
    """Answer ``evaluate.augmentation``: what the pool adds here, if the site allows local training: the two sets
    of rounded metrics and their difference only, within the site's recipe, budget and evaluation limits, each
    answer charged to its query budget (:mod:`~pixcell_fed.federation.augmentation_value`)."""
    from pixcell_fed.federation.augmentation_value import TRAIL_EVENT, SiteLocalTraining, answer_record, measure

    ctx = SiteLocalTraining(
        site.site_name,
        site.allow_local_training,
        site.train_dir,
        site.eval_dir,
        site.site_work_dir,
        site.local_training,
        site.evaluation,
    )
    values, baseline = measure(request, ctx, flower_run)
    _record(TRAIL_EVENT, site, site.site_work_dir, flower_run, sent=values, baseline=baseline)
    return answer_record(values, baseline)


def handle_train(request: RecordDict, site: SiteSettings, state: RecordDict | None = None) -> RecordDict:
    """Answer ``train``: one DP-SGD round on the site's real tiles, within the site's own DP policy and budget
    (weights and privacy spent back; otherwise :class:`~pixcell_fed.federation.protocol.Refusal` ``refused-dp``,
    its reason in the site's audit trail and log). ``state`` (Flower's node state) is not used: the site's privacy
    ledger lives in its work folder, so it survives runs and restarts."""
    from pixcell_fed.federation.dp_rounds import site_dp_context, site_round

    # never fall back to eval-dir: tiles used for training must not be the held-out evaluation set
    ctx = site_dp_context(site.site_name, site.train_dir, site.bundle_dir, site.config_file)
    return site_round(request, ctx)
