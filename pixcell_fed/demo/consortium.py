"""Run a complete consortium on this machine with the same commands a real deployment uses.

Three simulated hospitals, each with slides written from the real CMU H&E slide in its own stain and with slide
labels, run ``site-agent synthesize`` (one of them with differentially private conditioning); a demo privacy officer
per site approves; the coordinator admits the sites
(signing, officer and SuperNode keys) to its trust file, starts ``coordinator serve`` (SuperLink on loopback behind
the Fleet-only TLS front) and registers each site's SuperNode key under the name the trust file binds it to; each
site pins the consortium app (``site-agent app-hash``) and joins with ``site-agent serve`` (SuperNode plus its
pinned launcher); ``coordinator run`` pools the bundles, trains a small classifier, has every site evaluate it
on its real held-out tiles and asks what the pool adds (hospital-a allows local training on its own labelled
tiles; the others answer that they do not). Only the slides and the models (tiny UNTRAINED twins) differ from a
real deployment. A second run reuses everything already made: models, slides, keys, runs, bundles, certificates.

A fourth hospital leaks (:data:`LEAKING_SITE`): its generator is a *memorising twin*
(:mod:`pixcell_fed.simulation.memorising_twin`) that returns copies and region copies of its real tiles. Its
``site-agent synthesize`` (run through :mod:`pixcell_fed.demo.leaking_site`, the only place that lets site-agent
load such a twin) ends with the audit's FAIL and exit 3, and builds no bundle: that is the expected outcome. The
site then chooses to send the consortium a signed refusal notice (``site-agent refusal-notice``: the audit's
numbers-only shareable summary, no tile, no tile hash), which the lead drops into the coordinator's
``refusals/`` folder; the consortium report lists the site as refused, with the audit's reasons. The coordinator
never asks that site for anything, and the site never serves: it has nothing to share.

The real slide comes from the local cache that ``scripts/setup.sh`` fills, or from the file the user gives
(``--slide``): nothing is fetched at run time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixcell_fed.errors import FederationError, PixcellFedError
from pixcell_fed.runlog import get_logger

log = get_logger("demo")

#: (site name, stain variation) of the three simulated hospitals: their slides differ in stain.
SITES = (
    ("hospital-a", {"hematoxylin": 1.0, "eosin": 1.0}),
    ("hospital-b", {"hematoxylin": 1.25, "eosin": 0.8}),
    ("hospital-c", {"hematoxylin": 0.85, "eosin": 1.3, "bias": 0.03}),
)
LABELS = ("normal", "tumour")
SLIDES_PER_LABEL = 3
#: A small timm classifier for a 2-core CPU (the real deployment picks its backbone in the run settings).
DEMO_TRAINING = {
    "arch": "vit_tiny_patch16_224",
    "img-size": 64,
    "model-kwargs": json.dumps({"patch_size": 16, "depth": 2, "embed_dim": 96, "num_heads": 2}),
    "epochs": 3,
    "batch-size": 16,
    "lr": 0.001,
}
DEMO_SITE_CONFIG: dict[str, dict[str, Any]] = {
    "synthesis": {"max_conditioning_tiles": 32},
    "split": {"holdout_fraction": 0.34},
}
#: (site name, stain variation) of the leaking hospital, whose generator memorised its tiles: its audit refuses.
LEAKING_SITE = ("hospital-d", {"hematoxylin": 1.1, "eosin": 0.9, "bias": -0.02})
#: The hospital that allows local training: it measures what the pool adds on its own labelled tiles (issue 15).
LOCAL_TRAINING_SITE = "hospital-a"
DEMO_LOCAL_TRAINING = {"epochs": 2, "max_tiles": 200, "batch_size": 16, "bootstrap": 500}
#: One hospital conditions synthesis with differential privacy (docs/privacy.md): its audit reports, its bundle,
#: 'coordinator verify' and the consortium report state its per-tile and per-slide guarantee. The clip norm suits
#: the untrained UNI2-h twin, whose embeddings have norm about 6.9; a real site chooses it from public tiles.
DP_SITE = "hospital-c"
DP_SITE_SYNTHESIS = {"conditioning": "dp", "max_tiles_per_slide": 8, "dp": {"epsilon": 8.0, "clip_norm": 7.0}}


def site_config(name: str) -> dict:
    """The demo's site.yaml overrides for site ``name``."""
    if name != DP_SITE:
        return DEMO_SITE_CONFIG
    return {**DEMO_SITE_CONFIG, "synthesis": {**DEMO_SITE_CONFIG["synthesis"], **DP_SITE_SYNTHESIS}}


@dataclass
class DemoResult:
    """Where the demo's outputs are."""

    out: Path
    audit_reports: dict[str, Path] = field(default_factory=dict)
    bundles: dict[str, Path] = field(default_factory=dict)
    consortium_report: Path | None = None
    consortium_json: Path | None = None
    refused: dict[str, Path] = field(default_factory=dict)  # site whose own audit refused -> its audit report
    verdicts: dict[str, str] = field(default_factory=dict)  # site -> its audit's verdict


def _env(flwr_home: Path) -> dict[str, str]:
    from pixcell_fed.federation.deployment import flower_env

    return {**flower_env(flwr_home), "PIXCELL_FED_NO_PROGRESS": os.environ.get("PIXCELL_FED_NO_PROGRESS", "1")}


def _cli(tool: str, *args: str, env: dict[str, str], log_file: Path, timeout: float = 1800, expect: int = 0) -> str:
    """Run ``site-agent`` or ``coordinator`` (this installation's) and return its stdout; raise unless it exits
    ``expect``. ``leaking-site-agent`` is site-agent in a process that may load the memorising twin."""
    module = {
        "site-agent": "site_agent.cli",
        "coordinator": "coordinator.cli",
        "leaking-site-agent": "pixcell_fed.demo.leaking_site",
    }[tool]
    log.info("$ %s %s", tool, " ".join(args))
    with open(log_file, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {tool} {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        fh.write(proc.stdout)
        fh.write(f"[exit {proc.returncode}]\n")
    if proc.returncode != expect:
        raise FederationError(f"'{tool} {args[0]}' exited {proc.returncode}, expected {expect}", hint=f"see {log_file}")
    return proc.stdout


def _slides(site_index: int):
    from pixcell_fed.simulation.sites import SlideSpec

    specs = []
    for k in range(SLIDES_PER_LABEL * len(LABELS)):
        label = LABELS[k % len(LABELS)]
        specs.append(
            SlideSpec(
                f"slide-{k + 1:02d}.svs", label=label, seed=100 * site_index + k, label_text=f"DEMO-{site_index}-{k}"
            )
        )
    return specs


def _make_sites(out: Path, models, source: Path | None) -> dict[str, Path]:
    from pixcell_fed.simulation.sites import make_site
    from pixcell_fed.simulation.slide_writer import StainVariation

    configs = {}
    for i, (name, stain) in enumerate(SITES):
        configs[name] = make_site(
            out / "sites" / name,
            name=name,
            models=models,
            slides=_slides(i),
            stain=StainVariation(**stain),
            config=site_config(name),
            source=source,
        )
    return configs


def _real_slide(out: Path, slide: str | Path | None) -> Path | None:
    """The real slide to write the hospitals' slides from: ``slide`` (checked), else the cached copy; None when
    every slide of a previous run is already there. Raises UsageError (nothing is ever downloaded here)."""
    from pixcell_fed.simulation.real_slide import cached_real_slide, check_real_slide

    if slide is not None:
        return check_real_slide(slide)
    written = all(
        (out / "sites" / name / "slides" / spec.file_name).is_file()
        for i, (name, _) in enumerate((*SITES, LEAKING_SITE))
        for spec in _slides(i)
    )
    return None if written else cached_real_slide()


def _make_leaking_site(out: Path, models, source: Path | None):
    """The leaking hospital: its slides, and a memorising twin that memorised every tissue tile of them.
    Returns (site.yaml, the site's models)."""
    import dataclasses

    from pixcell_fed.simulation.memorising_twin import save_memorising_twin
    from pixcell_fed.simulation.sites import make_site
    from pixcell_fed.simulation.slide_writer import StainVariation

    name, stain = LEAKING_SITE
    site_dir = out / "sites" / name
    config = make_site(
        site_dir,
        name=name,
        models=models,
        slides=_slides(len(SITES)),
        stain=StainVariation(**stain),
        config=DEMO_SITE_CONFIG,
        source=source,
    )
    # the twin's memory is the site's own real tiles: it stays in the site's folder
    leaking = dataclasses.replace(models, pixcell_dir=save_memorising_twin(site_dir / "memorising-twin", config))
    return make_site(site_dir, name=name, models=leaking, slides=[]), leaking


def _audit_verdict(audit_json: Path) -> str:
    try:
        return str(json.loads(audit_json.read_text(encoding="utf-8")).get("verdict"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _bundle_of(site_dir: Path) -> Path:
    bundles = sorted((site_dir / "work" / "runs").glob("*/bundle/bundle.json"), key=lambda p: p.stat().st_mtime)
    if not bundles:
        raise FederationError(f"no bundle under {site_dir / 'work'}", hint="see the demo log")
    return bundles[-1].parent


def _allow_local_training(config: Path, bundle: Path, models) -> None:
    """The site's labelled training tiles (its conditioning slides' real tiles) and its opt-in to local training."""
    from pixcell_fed.simulation.sites import make_site, write_local_training_set

    site_dir = config.parent
    write_local_training_set(bundle.parent, site_dir / "labels.csv", site_dir / "train")
    make_site(
        site_dir,
        name=config.parent.name,
        models=models,
        slides=[],
        config={
            "federation": {"allow_local_training": True, "train_dir": "train", "local_training": DEMO_LOCAL_TRAINING}
        },
    )


def run_demo(out: str | Path, *, slide: str | Path | None = None, timeout_s: float = 1500.0) -> DemoResult:
    """Run the demo consortium in ``out`` (reusing what a previous run made) and return where its outputs are.

    ``slide``: the real slide CMU-1-Small-Region.svs (default: the copy ``scripts/setup.sh`` cached). Raises
    :class:`~pixcell_fed.errors.UsageError` when neither is there; nothing is downloaded.
    """
    from pixcell_fed.bundle.layout import STATE_APPROVED, read_bundle_json
    from pixcell_fed.federation import deployment as D
    from pixcell_fed.federation.services import start_coordinator_serve
    from pixcell_fed.simulation.sites import make_site, write_twin_models

    out = Path(out).resolve()
    source = _real_slide(out, slide)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    demo_log = logs / "demo-commands.log"
    coord = out / "coordinator"
    flwr_home = coord / "flwr-home"
    env = _env(flwr_home)
    result = DemoResult(out=out)
    started = time.monotonic()

    log.info("1/6 tiny untrained model twins and three simulated hospitals (real H&E, site-specific stains)")
    models = write_twin_models(out / "models")
    configs = _make_sites(out, models, source)

    log.info("2/6 each site: site-agent synthesize (tiles -> embeddings -> synthetic tiles -> audit -> bundle)")
    for name, config in configs.items():
        _cli("site-agent", "synthesize", "--config", str(config), env=env, log_file=demo_log)
        site_dir = config.parent
        result.bundles[name] = _bundle_of(site_dir)
        result.audit_reports[name] = result.bundles[name].parent / "audit" / "audit.html"
        result.verdicts[name] = _audit_verdict(result.bundles[name].parent / "audit" / "audit.json")

    leaking_name = LEAKING_SITE[0]
    log.info(
        "2b/6 %s, whose generator is a memorising twin: its audit FAILS, synthesize exits 3, no bundle", leaking_name
    )
    leaking_config, leaking_models = _make_leaking_site(out, models, source)
    _cli("leaking-site-agent", "synthesize", "--config", str(leaking_config), env=env, log_file=demo_log, expect=3)
    leaking_dir = leaking_config.parent
    if list((leaking_dir / "work" / "runs").glob("*/bundle")):
        raise PixcellFedError(f"{leaking_name} built a bundle although its audit failed", hint=f"see {demo_log}")
    (refused_report,) = sorted((leaking_dir / "work" / "runs").glob("*/audit/audit.html"))
    result.refused[leaking_name] = refused_report
    result.verdicts[leaking_name] = _audit_verdict(refused_report.parent / "audit.json")

    _allow_local_training(configs[LOCAL_TRAINING_SITE], result.bundles[LOCAL_TRAINING_SITE], models)

    log.info("3/6 each site's demo privacy officer approves; the coordinator admits the site to its trust file")
    trust_file = coord / "trust.yaml"
    for name, config in configs.items():
        site_dir = config.parent
        officer, auth = site_dir / "officer", site_dir / "keys" / "flower"
        if not (officer / "officer.key").is_file():
            _cli("site-agent", "officer-key", "--out", str(officer), env=env, log_file=demo_log)
        # the site's administrator lists the officer's public key in site.yaml: only listed keys can decide
        make_site(
            site_dir,
            name=name,
            models=models,
            slides=[],
            config={"keys": {"officers": [(officer / "officer.pub").read_text().strip()]}},
        )
        if read_bundle_json(result.bundles[name])["state"] != STATE_APPROVED:
            _cli(
                "site-agent",
                "approve",
                str(result.bundles[name]),
                "--key",
                str(officer / "officer.key"),
                "--config",
                str(config),
                "--yes",
                env=env,
                log_file=demo_log,
            )
        if not (auth / f"{name}_auth").is_file():
            _cli("site-agent", "auth-key", "--config", str(config), "--out", str(auth), env=env, log_file=demo_log)
        _cli(
            "coordinator",
            "trust-add",
            str(trust_file),
            "--site",
            name,
            "--signing-key",
            str(site_dir / "keys" / "site_signing.pub"),
            "--officer",
            str(officer / "officer.pub"),
            "--auth-key",
            str(auth / f"{name}_auth.pub"),
            env=env,
            log_file=demo_log,
        )
        _cli("coordinator", "verify", str(result.bundles[name]), "--trust", str(trust_file), env=env, log_file=demo_log)

    # the leaking site is a consortium member (its keys are in the trust file) that has nothing to share; it
    # chooses to send the lead a signed refusal notice (numbers only), which the lead drops into refusals/
    leaking_officer = leaking_dir / "officer"
    if not (leaking_officer / "officer.key").is_file():
        _cli("site-agent", "officer-key", "--out", str(leaking_officer), env=env, log_file=demo_log)
    make_site(
        leaking_dir,
        name=leaking_name,
        models=leaking_models,
        slides=[],
        config={"keys": {"officers": [(leaking_officer / "officer.pub").read_text().strip()]}},
    )
    _cli(
        "coordinator",
        "trust-add",
        str(trust_file),
        "--site",
        leaking_name,
        "--signing-key",
        str(leaking_dir / "keys" / "site_signing.pub"),
        "--officer",
        str(leaking_officer / "officer.pub"),
        env=env,
        log_file=demo_log,
    )
    refusals = coord / "work" / "refusals"
    refusals.mkdir(parents=True, exist_ok=True)
    _cli(
        "site-agent",
        "refusal-notice",
        "--config",
        str(leaking_config),
        "--out",
        str(refusals / f"{leaking_name}.json"),
        env=env,
        log_file=demo_log,
    )

    log.info("4/6 coordinator serve (SuperLink on loopback, Fleet-only TLS front); register-site binds keys to names")
    port, internal = D.free_port(), D.free_port()
    superlink = f"127.0.0.1:{internal}"  # the Control API: on the coordinator's machine only
    certs = coord / "certs"
    processes: list = []
    try:
        processes.append(
            start_coordinator_serve(
                certs, port=port, internal_port=internal, env=env, log_path=logs / "coordinator-serve.log"
            )
        )
        for name, config in configs.items():
            auth = config.parent / "keys" / "flower"
            _cli(
                "coordinator",
                "register-site",
                str(auth / f"{name}_auth.pub"),
                "--name",
                name,
                "--trust",
                str(trust_file),
                "--superlink",
                superlink,
                "--ca",
                str(certs / "ca.crt"),
                "--flwr-home",
                str(flwr_home),
                env=env,
                log_file=demo_log,
            )
            pin = _cli("site-agent", "app-hash", env=env, log_file=demo_log).strip()
            make_site(
                config.parent,
                name=name,
                models=models,
                slides=[],
                config={
                    "federation": {
                        "superlink": f"127.0.0.1:{port}",
                        "root_certificates": str(certs / "ca.crt"),
                        "auth_private_key": str(auth / f"{name}_auth"),
                        "port": D.free_port(),
                        "app_sha256": [pin],
                    }
                },
            )

        log.info("5/6 the sites join: site-agent serve (SuperNode + launcher running only the pinned app)")
        for name, config in configs.items():
            processes.append(
                D.Process(
                    f"site-serve-{name}",
                    [sys.executable, "-m", "site_agent.cli", "serve", "--config", str(config)],
                    log_path=logs / f"site-serve-{name}.log",
                    env=env,
                )
            )

        log.info("6/6 coordinator run: pool the verified bundles -> train a classifier -> evaluate at every site")
        settings = {
            "work-dir": str(coord / "work"),
            "trust-file": str(trust_file),
            "expected-sites": ",".join(configs),
            "min-sites": len(configs),
            "wait-for-sites-s": 120.0,
            "chunk-mb": 16.0,
            "reply-timeout-s": 300.0,
            **DEMO_TRAINING,
        }
        settings_file = D.write_run_config(coord / "run-settings.toml", settings)
        remaining = max(60.0, timeout_s - (time.monotonic() - started))
        report = _cli(
            "coordinator",
            "run",
            "--settings",
            str(settings_file),
            "--superlink",
            superlink,
            "--ca",
            str(certs / "ca.crt"),
            "--flwr-home",
            str(flwr_home),
            env=env,
            log_file=demo_log,
            timeout=remaining,
        )
        log.info(report.strip())
    finally:
        for process in reversed(processes):
            process.stop()
    result.consortium_report = coord / "work" / "report" / "report.html"
    result.consortium_json = coord / "work" / "report" / "report.json"
    if not result.consortium_report.is_file():
        raise PixcellFedError("the consortium report was not written", hint=f"see the logs in {logs}")
    return result
