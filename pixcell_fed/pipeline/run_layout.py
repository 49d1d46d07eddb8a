"""Where a synthesize run keeps its files, and how a rerun finds the run it should continue.

A run is found again by a fingerprint of everything that determines its outputs (the resolved config and the
slide inventory), so the same command continues the same run. The run id, which names the run folder
``<work>/runs/<run_id>/`` and is shipped in the bundle, is random: it reveals nothing about the slides. The
fingerprint -> run id index stays in the work folder.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcell_fed.atomic import write_json_atomic
from pixcell_fed.bundle.state import AUDIT_DIR, BUNDLE_DIR, RUN_JSON, RUNS_DIR, trail_path

RUN_INDEX = "index.json"


@dataclass(frozen=True)
class RunLayout:
    """The files of one synthesize run, all inside the site's work folder (never shipped)."""

    root: Path

    @property
    def tiles_dir(self) -> Path:
        return self.root / "tiles"

    @property
    def tiles_table(self) -> Path:
        return self.tiles_dir / "tiles.parquet"

    @property
    def split_file(self) -> Path:
        return self.root / "split.json"

    @property
    def embeddings_cache(self) -> Path:
        return self.root / "embeddings"

    @property
    def privatized_conditioning(self) -> Path:
        """The dp-privatized conditioning embeddings (``synthesis.conditioning: dp``), drawn once per tile and kept
        so that a resumed run reuses them: in their own folder, never beside the clean cache, never shipped."""
        return self.root / "conditioning" / "privatized.npz"

    @property
    def synthetic_dir(self) -> Path:
        return self.root / "synthetic"

    @property
    def synthetic_table(self) -> Path:
        return self.root / "synthetic.parquet"

    @property
    def audit_dir(self) -> Path:
        return self.root / AUDIT_DIR

    @property
    def eval_dir(self) -> Path:
        """Real held-out tiles as ``eval/<label>/<tile>.png``: what the site evaluates shared models on (internal)."""
        return self.root / "eval"

    @property
    def log_file(self) -> Path:
        return self.root / "run.log"

    def rank_log_file(self, rank: int) -> Path:
        """The log of one rank of a sharded run (rank 0 writes ``run.log``)."""
        return self.log_file if rank == 0 else self.root / f"run.rank{rank}.log"

    @property
    def state_file(self) -> Path:
        """``run.json``: the run's state (read by ``site-agent status``) and its finished stages."""
        return self.root / RUN_JSON

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def bundle_dir(self) -> Path:
        return self.root / BUNDLE_DIR

    def read_state(self) -> dict[str, Any]:
        if self.state_file.is_file():
            return json.loads(self.state_file.read_text())
        return {}

    def update_state(self, **fields: Any) -> dict[str, Any]:
        state = {**self.read_state(), **fields}
        write_json_atomic(self.state_file, state)
        return state


def run_fingerprint(resolved_config: dict[str, Any], slide_inventory: list[tuple[str, int]]) -> str:
    """A stable hash of the resolved config and the (file name, size) of every slide."""
    payload = json.dumps({"config": resolved_config, "slides": sorted(slide_inventory)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def find_or_create_run(work_dir: Path, fingerprint: str) -> RunLayout:
    """The run folder for ``fingerprint``: the existing one (to continue it) or a new one with a random id."""
    index_file = work_dir / RUNS_DIR / RUN_INDEX
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    run_id = index.get(fingerprint)
    if run_id is None:
        run_id = f"run-{secrets.token_hex(6)}"
        write_json_atomic(index_file, {**index, fingerprint: run_id})
    layout = RunLayout(work_dir / RUNS_DIR / run_id)
    layout.root.mkdir(parents=True, exist_ok=True)
    return layout


__all__ = ["RunLayout", "find_or_create_run", "run_fingerprint", "trail_path"]
