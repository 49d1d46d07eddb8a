"""Sharded synthesis under ``torchrun``: which rank does what, on which device, and where ranks meet.

``torchrun --nproc_per_node N site-agent synthesize ...`` (and ``--nnodes``/``--rdzv-endpoint`` across machines)
starts one process per device. Rank 0 alone tiles, splits, audits, builds the bundle and writes the trail; every
rank embeds and generates its share of whole global batches. A tile depends only on its batch's composition, its
seed, the weights and the kind of device, never on which rank made it, so a sharded run writes the same bytes as a
one-process run on the same kind of device. Shares are written as they finish (atomic files), so a rank killed
mid-run loses only its unfinished batch: rerunning the whole command skips every finished batch.

Ranks meet at named checkpoints (an ``all_gather`` of small Python objects on a gloo group, also when the devices
talk NCCL). A rank that fails tells the others at their next checkpoint, which then stop with its message; a rank
that dies is noticed by torchrun (which stops the others) or at the next checkpoint (connection lost); a rank that
waits longer than ``wait_timeout`` at a checkpoint stops with an error naming it, so no rank hangs forever.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from pixcell_fed.errors import ConfigError, DistributedError, ExitCode, PixcellFedError
from pixcell_fed.runlog import get_logger

log = get_logger("distributed")

T = TypeVar("T")

#: How long a rank waits at a checkpoint for the others: it covers rank 0's tiling (before the shares start) and
#: its audit (after they end), so it is long; ``site-agent synthesize --wait-timeout`` changes it.
DEFAULT_WAIT_TIMEOUT = timedelta(hours=24)
#: Set by torchrun (and by ``srun torchrun``) in every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Ranks:
    """This process's place in a sharded run: its rank, the number of ranks, its device, and the checkpoints.

    ``Ranks()`` is a one-process run: every share is everything and checkpoints return at once.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    launched: bool = False
    wait_timeout: timedelta = DEFAULT_WAIT_TIMEOUT
    _group: Any = field(default=None, repr=False)
    _done: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items of ``items``: every ``world_size``-th, starting at its rank (balanced to one item)."""
        return list(items[self.rank :: self.world_size])

    def share_batches(self, count: int, batch: int) -> list[int]:
        """Indices of ``count`` items that this rank handles when they are cut into whole global batches of ``batch``
        (batch b is ``[b * batch, (b + 1) * batch)``; batches are dealt out in turn)."""
        starts = self.share(range(0, count, batch))
        return [i for start in starts for i in range(start, min(count, start + batch))]

    def checkpoint(self, stage: str, payload: Any = None) -> list[Any]:
        """Wait until every rank has reached ``stage``; return every rank's ``payload`` (index = rank).

        Raises :class:`DistributedError` when another rank reported a failure, lost contact or took longer than
        ``wait_timeout``.
        """
        if not self.launched:
            return [payload]
        return list(self._exchange(stage, ("ok", payload)))

    @contextlib.contextmanager
    def reporting_failures(self) -> Iterator[Ranks]:
        """On this rank's own failure, tell the others (at their next checkpoint) before raising it.

        Without this, the others would learn of it only when torchrun stops them, or after ``wait_timeout``.
        """
        try:
            yield self
        except DistributedError:
            raise  # another rank's failure, a lost connection or a timeout: every rank already knows
        except Exception as exc:
            if self.launched and not self._done:
                what = exc.message if isinstance(exc, PixcellFedError) else f"{type(exc).__name__}: {exc}"
                code = int(getattr(exc, "exit_code", 1))
                log.error("%s failed: %s; telling the other ranks", self.name, what)
                try:
                    self._exchange("failure", ("failed", {"message": what, "exit_code": code}))
                except DistributedError as lost:
                    log.error("%s could not tell the other ranks: %s", self.name, lost.message)
            raise

    def finish(self, outcome: Any = None) -> list[Any]:
        """The last checkpoint: after it no failure is reported any more (every rank has left)."""
        payloads = self.checkpoint("the end of the run", outcome)
        self._done = True
        return payloads

    def _exchange(self, stage: str, message: tuple[str, Any]) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, message, group=self._group)
        except (RuntimeError, ValueError) as exc:  # gloo reports a timeout or a lost peer as a RuntimeError
            self._done = True
            raise DistributedError(
                f"{self.name} on {socket.gethostname()} stopped waiting for the other ranks at '{stage}': "
                f"{_first_line(exc)}",
                hint="another rank died or is stuck: its log (run.rank<N>.log in the run folder, or torchrun's "
                "output) says why. Rerun the same torchrun command: finished batches are kept. If rank 0 "
                "needs longer than the wait (tiling or auditing a very large archive), raise --wait-timeout",
            ) from exc
        failed = [(r, m[1]) for r, m in enumerate(gathered) if m[0] == "failed"]
        if failed:
            self._done = True
            rank, info = failed[0]
            error = DistributedError(
                f"rank {rank} failed, so {self.name} stops at '{stage}': {info['message']}",
                hint=f"fix what rank {rank} reports (its log says more), then rerun the same command: finished "
                "batches are kept",
            )
            if info["exit_code"] in set(ExitCode):  # the job's outcome is rank 0's (e.g. 3: the audit refused)
                error.exit_code = ExitCode(info["exit_code"])
            raise error
        return [m[1] for m in gathered]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process."""
    return all(os.environ.get(name) for name in TORCHRUN_ENV)


def rank_device(configured: str, local_rank: int) -> str:
    """The device of the rank with ``local_rank`` on its machine: ``auto``/``cuda`` -> ``cuda:<local rank>``.

    A fixed ``cuda:N`` would put every rank of a machine on one GPU, so it is refused under torchrun.
    """
    import torch

    if configured == "cpu":
        return "cpu"
    if configured not in ("auto", "cuda"):
        raise ConfigError(
            f"models.device is {configured!r}, but under torchrun each rank uses the GPU of its LOCAL_RANK",
            hint="set models.device: auto (or cuda, or cpu) for sharded runs",
        )
    if not torch.cuda.is_available():
        if configured == "cuda":
            raise ConfigError(
                "models.device is 'cuda', but this machine has no usable CUDA GPU",
                hint="set models.device: auto or cpu",
            )
        return "cpu"
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK {local_rank}, but this machine has {count} GPU(s)",
            hint=f"start at most {count} processes per machine (torchrun --nproc_per_node {count})",
        )
    return f"cuda:{local_rank}"


@contextlib.contextmanager
def launched_ranks(configured_device: str, *, wait_timeout: timedelta | None = None) -> Iterator[Ranks]:
    """The :class:`Ranks` of this process: from torchrun's variables (joining its process group for the block), or a
    one-process run on ``configured_device`` when torchrun did not start it.

    Each rank uses its own device (``cuda:<LOCAL_RANK>`` for ``auto``/``cuda``); the process group talks NCCL
    between GPUs and gloo between CPUs, and checkpoints always go through a gloo group.
    """
    wait = wait_timeout or DEFAULT_WAIT_TIMEOUT
    if not launched_by_torchrun():
        yield Ranks(device=configured_device, wait_timeout=wait)
        return
    import torch
    import torch.distributed as dist

    rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = rank_device(configured_device, local)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
        group = dist.new_group(backend="gloo", timeout=wait)
    else:
        dist.init_process_group("gloo", timeout=wait)
        group = None  # the default group is already gloo, with the same timeout
    ranks = Ranks(
        rank=rank, world_size=world, local_rank=local, device=device, launched=True, wait_timeout=wait, _group=group
    )
    log.info(
        "%s on %s uses %s (process group: %s; checkpoints wait at most %s)",
        ranks.name,
        socket.gethostname(),
        device,
        dist.get_backend(),
        wait,
    )
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def end_torchrun_process(code: int) -> NoReturn:
    """Leave a process that torchrun started, with ``code``, once its work is done and its process group is gone.

    The process group was destroyed in order (:func:`launched_ranks`), the summary printed and the logs written;
    what remains is the interpreter's teardown, in which C++ threads of the libraries a rank loaded (gloo,
    OpenMP, OpenCV, OpenSlide) are destroyed in no fixed order. Now and then one of them calls
    ``std::terminate`` ("terminate called without an active exception"): the rank dies by SIGABRT after
    finishing, and torchrun reports a failed job. Flushing and leaving without the teardown avoids that.
    """
    import logging

    from pixcell_fed.slides.workers import shutdown_shared_executors

    shutdown_shared_executors()  # the tile readers (normally stopped at exit)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def release_device_memory(device: str) -> None:
    """Return cached GPU memory after a rank's share (it then only waits for rank 0's audit)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


__all__ = [
    "DEFAULT_WAIT_TIMEOUT",
    "Ranks",
    "end_torchrun_process",
    "launched_by_torchrun",
    "launched_ranks",
    "rank_device",
    "release_device_memory",
]
