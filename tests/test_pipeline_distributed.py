"""Sharded ``site-agent synthesize`` under torchrun with 2 CPU processes (gloo), on real H&E pixels and tiny twins.

A sharded run writes the same tile bytes as a one-process run; a run whose rank 1 is SIGKILLed mid-generation,
then rerun, finishes with the same tiles without redoing the batches that were finished; ranks that wait for a
rank which failed or stalls stop with a clear error instead of hanging.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from pixcell_fed.errors import ExitCode
from pixcell_fed.pipeline.distributed import Ranks
from pixcell_fed.testing.sites import SlideSpec, make_site, write_twin_models

# 20 conditioning tiles: two embedding batches (16 + 4 on CPU) and ten generation batches of 2
CONFIG = {"synthesis": {"max_conditioning_tiles": 20, "steps": 3, "batch_size": 2},
          "split": {"holdout_fraction": 0.34}}
SLIDES = [SlideSpec(f"slide-{i}.svs", label="tumour" if i % 2 else "normal", seed=i) for i in range(3)]


def _env(tag: str = "") -> dict[str, str]:
    return {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1", "PIXCELL_FED_TEST_TAG": tag}


def _torchrun(site_yaml: Path, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.2", "-m", "site_agent.cli", "synthesize", "--config", str(site_yaml)]


def _run_dir(folder: Path) -> Path:
    (run,) = [p for p in (folder / "work" / "runs").iterdir() if p.is_dir()]
    return run


def _tile_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (_run_dir(folder) / "synthetic").glob("*.png")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_twin_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, models):
    """The reference: the same site synthesised by one plain process."""
    folder = tmp_path_factory.mktemp("one")
    site_yaml = make_site(folder, name="site-a", models=models, slides=SLIDES, config=CONFIG)
    proc = subprocess.run([sys.executable, "-m", "site_agent.cli", "synthesize", "--config", str(site_yaml)],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    return folder, _tile_hashes(folder)


@pytest.mark.slow
def test_sharded_run_writes_the_same_tiles_as_one_process(tmp_path, models, one_process):
    _, reference = one_process
    site_yaml = make_site(tmp_path, name="site-a", models=models, slides=SLIDES, config=CONFIG)
    proc = subprocess.run(_torchrun(site_yaml), capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert len(reference) == 20 and _tile_hashes(tmp_path) == reference
    assert proc.stdout.count("run run-") == 1  # only rank 0 prints the summary
    assert "rank 1 of 2 on" in proc.stderr and "uses cpu (process group: gloo" in proc.stderr
    run = _run_dir(tmp_path)
    assert (run / "bundle" / "bundle.json").is_file() and (run / "audit" / "audit.json").is_file()
    rank1 = (run / "run.rank1.log").read_text()
    assert "embedded 4 new tiles" in rank1  # the second global embedding batch
    assert "rank 1 of 2 generates 10 synthetic tiles in 5 batches" in rank1
    assert "rank 0 of 2 generates 10 synthetic tiles in 5 batches" in (run / "run.log").read_text()
    assert not (run / "run.rank1.log").read_text().count("audit:")  # rank 0 alone audits


def _pids_of_rank(tag: str, rank: int) -> list[int]:
    """Processes this test started (marked by its tag in their environment) that torchrun made rank ``rank``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PIXCELL_FED_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_rank_killed_mid_run_then_rerun_finishes_with_the_same_tiles(tmp_path, models, one_process):
    reference_folder, reference = one_process
    records = pd.read_parquet(_run_dir(reference_folder) / "synthetic.parquet")["synthetic_file"].tolist()
    batches = [records[i:i + 2] for i in range(0, len(records), 2)]
    rank1_first, rank1_last = batches[1], batches[9]  # rank 1 makes batches 1, 3, 5, 7, 9 of a fresh run
    site_yaml = make_site(tmp_path, name="site-a", models=models, slides=SLIDES, config=CONFIG)
    tag = uuid.uuid4().hex
    launcher = subprocess.Popen(_torchrun(site_yaml), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=_env(tag), start_new_session=True)
    try:
        deadline = time.time() + 600
        synthetic = None
        while time.time() < deadline and launcher.poll() is None:
            runs = list((tmp_path / "work" / "runs").glob("run-*/synthetic"))
            if runs and all((runs[0] / name).is_file() for name in rank1_first):
                synthetic = runs[0]
                break
            time.sleep(0.02)
        assert synthetic is not None, "rank 1 never finished its first batch"
        (pid,) = _pids_of_rank(tag, 1)
        os.kill(pid, signal.SIGKILL)
        _, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0, "torchrun should report the killed rank"
    assert not _pids_of_rank(tag, 0) and not _pids_of_rank(tag, 1)  # torchrun stopped rank 0 too
    assert not all((synthetic / name).is_file() for name in rank1_last), "rank 1 finished before it was killed"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in synthetic.glob("*.png")}
    finished = sum(all(name in before for name in batch) for batch in batches)
    assert 0 < finished < len(batches)

    rerun = subprocess.run(_torchrun(site_yaml), capture_output=True, text=True, env=_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    assert _tile_hashes(tmp_path) == reference
    log = (_run_dir(tmp_path) / "run.log").read_text()
    assert f"in {len(batches) - finished} batches ({finished} batches already done)" in log
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in synthetic.glob("*.png")}
    assert all(after[name] == stamp for name, stamp in before.items())  # finished tiles were not rewritten
    assert not list(tmp_path.rglob("*.tmp"))


CHECKPOINT_SCRIPT = """
import sys, time
from datetime import timedelta
from pixcell_fed.errors import DistributedError
from pixcell_fed.pipeline.distributed import launched_ranks

mode = sys.argv[1]
with launched_ranks("cpu", wait_timeout=timedelta(seconds=float(sys.argv[2]))) as ranks:
    try:
        with ranks.reporting_failures():
            print(f"rank {ranks.rank} shares {ranks.share_batches(10, 3)}", flush=True)
            if mode == "fail" and ranks.rank == 1:
                raise ValueError("the disk of rank 1 is full")
            if mode == "stall" and ranks.rank == 0:
                time.sleep(60)
            print(f"rank {ranks.rank} got {ranks.checkpoint('stage one', ranks.rank * 10)}", flush=True)
            ranks.finish()
    except DistributedError as exc:
        print(f"rank {ranks.rank} stopped (exit {int(exc.exit_code)}): {exc.message}", flush=True)
        sys.exit(int(exc.exit_code))
"""


def _checkpoint_run(tmp_path: Path, mode: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "ranks.py"
    script.write_text(CHECKPOINT_SCRIPT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=0.2", str(script), mode, str(timeout_s)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    return proc, time.monotonic() - t0


def test_ranks_exchange_payloads_at_checkpoints_and_split_whole_batches(tmp_path):
    proc, _ = _checkpoint_run(tmp_path, "ok", 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 shares [0, 1, 2, 6, 7, 8]" in proc.stdout and "rank 1 shares [3, 4, 5, 9]" in proc.stdout
    assert proc.stdout.count("got [0, 10]") == 2


def test_a_failing_rank_stops_the_others_with_its_message(tmp_path):
    proc, _ = _checkpoint_run(tmp_path, "fail", 120)
    assert proc.returncode != 0
    assert "rank 0 stopped (exit 1): rank 1 failed, so rank 0 of 2 stops at 'stage one': ValueError: the disk of " \
           "rank 1 is full" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow
def test_a_rank_waiting_for_a_stalled_rank_stops_at_its_timeout(tmp_path):
    proc, seconds = _checkpoint_run(tmp_path, "stall", 3)
    assert proc.returncode != 0
    assert "rank 1 stopped (exit 1): rank 1 of 2 on" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "stopped waiting for the other ranks at 'stage one'" in proc.stdout
    assert seconds < 55  # the stalled rank 0 sleeps 60 s: rank 1 gave up at its timeout and torchrun stopped rank 0


def test_one_process_shares_everything_and_checkpoints_return_at_once():
    ranks = Ranks()
    assert ranks.share_batches(5, 2) == [0, 1, 2, 3, 4] and ranks.checkpoint("x", 7) == [7]
    two = Ranks(rank=1, world_size=2)
    assert two.share_batches(7, 2) == [2, 3, 6] and two.share(list("abcde")) == ["b", "d"]


@pytest.mark.gpu
def test_sharded_run_on_gpus_talks_nccl_and_writes_the_same_tiles_as_one_gpu_process(tmp_path, models):
    import torch

    assert torch.cuda.is_available(), "run the gpu tests on a machine with a CUDA GPU"
    nproc = min(2, torch.cuda.device_count())  # one rank per GPU (a one-GPU machine runs one rank, still over NCCL)
    config = {**CONFIG, "models": {"device": "auto"}, "audit": {"device": "auto"}}
    one = make_site(tmp_path / "one", name="site-a", models=models, slides=SLIDES, config=config)
    plain = subprocess.run([sys.executable, "-m", "site_agent.cli", "synthesize", "--config", str(one)],
                           capture_output=True, text=True, env=_env(), timeout=900)
    assert plain.returncode == 0, plain.stderr[-3000:]
    sharded_yaml = make_site(tmp_path / "two", name="site-a", models=models, slides=SLIDES, config=config)
    sharded = subprocess.run(_torchrun(sharded_yaml, nproc), capture_output=True, text=True, env=_env(), timeout=900)
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert "process group: nccl" in sharded.stderr and "uses cuda:0" in sharded.stderr
    assert _tile_hashes(tmp_path / "two") == _tile_hashes(tmp_path / "one")
