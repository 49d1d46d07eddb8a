"""The site's side of the protocol: serve prepared files (bundle metadata and tiles) and evaluate models.

Each Flower message starts a fresh ClientApp process, so these handlers load nothing in advance: they read the
approved bundle folder and the held-out evaluation folder named in the SuperNode's node config, answer, and
exit. They never read anything outside those folders: a requested name must be a tile listed in the bundle's
manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pixcell_fed.errors import FederationError, UsageError
from pixcell_fed.federation import protocol as P

if TYPE_CHECKING:
    from flwr.app import RecordDict


@dataclass(frozen=True)
class SiteSettings:
    """What a SuperNode's node config tells the ClientApp."""

    site_name: str
    bundle_dir: Path | None
    eval_dir: Path | None
    train_dir: Path | None = None
    config_file: Path | None = None  # the site's own site.yaml: its DP policy and work folder

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "SiteSettings":
        name = str(node_config.get(P.NODE_SITE_NAME, "") or "")
        if not name:
            raise UsageError(f"the SuperNode has no '{P.NODE_SITE_NAME}' in its node config",
                             hint="start it with 'site-agent serve --config site.yaml'")

        def path(key: str) -> Path | None:
            value = str(node_config.get(key, "") or "")
            return Path(value) if value else None

        return cls(site_name=name, bundle_dir=path(P.NODE_BUNDLE_DIR), eval_dir=path(P.NODE_EVAL_DIR),
                   train_dir=path(P.NODE_TRAIN_DIR), config_file=path(P.NODE_SITE_CONFIG))


def _bundle_dir(site: SiteSettings) -> Path:
    if site.bundle_dir is None or not (site.bundle_dir / "manifest.parquet").is_file():
        raise FederationError(f"site {site.site_name}: no approved bundle at {site.bundle_dir}",
                              hint="approve a bundle ('site-agent approve') and point the SuperNode's bundle-dir to it")
    return site.bundle_dir


def _signed_files(bundle: Path) -> list[tuple[str, bytes]]:
    """Every file of the bundle except the tiles, with its path relative to the bundle (POSIX)."""
    out = []
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle)
        if path.is_file() and rel.parts[0] != "tiles" and not path.name.startswith("."):
            out.append((rel.as_posix(), path.read_bytes()))
    return out


def _manifest_names(bundle: Path) -> list[str]:
    import pandas as pd

    return [str(n) for n in pd.read_parquet(bundle / "manifest.parquet", columns=["file_name"])["file_name"]]


def handle_manifest(request: "RecordDict", site: SiteSettings) -> "RecordDict":
    """Answer ``query.manifest``: site name, tile count and bytes, and the bundle's signed files."""
    import pandas as pd
    from flwr.app import ConfigRecord, RecordDict

    bundle = _bundle_dir(site)
    frame = pd.read_parquet(bundle / "manifest.parquet", columns=["file_name", "size"])
    content = RecordDict({P.KEY_SITE: ConfigRecord({
        "site-name": site.site_name, "protocol": P.PROTOCOL_VERSION, "n-tiles": int(len(frame)),
        "total-bytes": int(frame["size"].sum()) if len(frame) else 0,
        "has-eval": bool(site.eval_dir and site.eval_dir.is_dir()),
    })})
    P.packed_to_records(P.pack_files(_signed_files(bundle)), content)
    _record_export(bundle, site, n_tiles=int(len(frame)))
    return content


def _record_export(bundle: Path, site: SiteSettings, *, n_tiles: int) -> None:
    """Append an ``export`` entry to the site's audit trail before anything of the bundle leaves (fail closed)."""
    from pixcell_fed.bundle.layout import read_bundle_json
    from pixcell_fed.bundle.state import trail_path, work_dir_of_bundle
    from pixcell_fed.bundle.trail import append_event

    work = work_dir_of_bundle(bundle)
    if work is None:
        raise FederationError(f"site {site.site_name}: cannot record the export of {bundle} in the site's audit trail",
                              hint="serve the bundle where synthesize built it (<work>/runs/<run>/bundle)")
    append_event(trail_path(work), "export", run_id=read_bundle_json(bundle)["run_id"], tiles=n_tiles,
                 to="consortium coordinator (Flower)")


def handle_chunk(request: "RecordDict", site: SiteSettings) -> "RecordDict":
    """Answer ``query.chunk``: the requested tiles (manifest names only) packed into one array."""
    from flwr.app import RecordDict

    bundle = _bundle_dir(site)
    wanted = [str(n) for n in request[P.KEY_REQUEST].get("files", [])]
    listed = set(_manifest_names(bundle))
    items, missing = [], []
    for name in wanted:
        path = bundle / "tiles" / name
        # serve prepared files only: a name must be a manifest entry, a plain file name, and exist
        if name not in listed or "/" in name or "\\" in name or name in ("", ".", "..") or not path.is_file():
            missing.append(name)
            continue
        items.append((name, path.read_bytes()))
    content = RecordDict()
    P.packed_to_records(P.pack_files(items), content, missing=missing)
    return content


def handle_evaluate(request: "RecordDict", site: SiteSettings) -> "RecordDict":
    """Answer ``evaluate``: metrics of the received model on the site's real held-out tiles (metrics only)."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from pixcell_fed.federation.evaluation import evaluate_model

    if site.eval_dir is None:
        raise FederationError(f"site {site.site_name}: no eval-dir configured", hint="set federation.eval_dir in site.yaml")
    state, spec = P.records_to_model(request)
    metrics = evaluate_model(state, spec, site.eval_dir)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return RecordDict({P.KEY_METRICS: MetricRecord(numeric),
                       P.KEY_INFO: ConfigRecord({"site-name": site.site_name, "probe": str(metrics.get("probe", ""))})})


def handle_train(request: "RecordDict", site: SiteSettings, state: "RecordDict | None" = None) -> "RecordDict":
    """Answer ``train``: one DP-SGD round on the site's real tiles, within the site's own DP policy and budget
    (weights and privacy spent back, or a refusal with its reason). ``state`` (Flower's node state) is not used:
    the site's privacy ledger lives in its work folder, so it survives runs and restarts."""
    from pixcell_fed.federation.dp_rounds import site_dp_context, site_round

    # never fall back to eval-dir: tiles used for training must not be the held-out evaluation set
    ctx = site_dp_context(site.site_name, site.train_dir, site.bundle_dir, site.config_file)
    return site_round(request, ctx)
