"""Multi-process training through torchrun: the process group, rank-0 helpers and reductions.

chargpt uses PyTorch's own distributed engine (DistributedDataParallel over NCCL on GPUs, gloo
on CPUs) rather than anything home-made. `torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE;
`DistEnv.from_env()` reads them and joins the process group, and a plain `python`/`chargpt`
process is simply world size 1 with no process group at all. Only rank 0 prints and writes
files; the helpers here all-reduce losses and gather the per-rank state a checkpoint needs.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chargpt.errors import ConfigError, TrainingError, report, warn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistEnv:
        """Read torchrun's variables; without them this is a single process."""
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as e:
            raise ConfigError(f"invalid torchrun environment: {e}") from None
        return cls(rank=rank, local_rank=local_rank, world_size=world_size)

    def device_for(self, requested: torch.device) -> torch.device:
        """One GPU per process: rank r on a node uses cuda:LOCAL_RANK."""
        if self.enabled and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def init(self, device: torch.device) -> None:
        """Join the process group (NCCL for CUDA, gloo otherwise); a no-op for one process."""
        if not self.enabled or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A collective waiting on a dead peer fails after this long, so torchrun can restart
        # the job; generous by default because rank 0 may be preparing a large corpus.
        seconds = _timeout_seconds()
        # Joining can hang outright after an elastic restart (seen with gloo on a loaded
        # machine, where the timeout above did not fire): give up and let torchrun retry.
        timeout = datetime.timedelta(seconds=seconds)
        with _watchdog(seconds, lambda: _give_up_joining(self.rank, seconds)):
            dist.init_process_group(backend=backend, timeout=timeout,
                                    store=self._store(timeout), rank=self.rank,
                                    world_size=self.world_size)

    def _store(self, timeout: datetime.timedelta) -> dist.Store:
        """The rendezvous store, namespaced by torchrun's restart attempt.

        After an elastic restart the new workers must not read the addresses that the dead
        attempt's workers published (gloo then connects to a closed port, or waits forever)."""
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", "29500"))
        agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(host, port, self.world_size,
                              is_master=not agent_hosts_it and self.rank == 0,
                              timeout=timeout, wait_for_workers=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"chargpt/attempt-{attempt}/", store)

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def leave(self) -> None:
        """Wait for every rank (no rank leaves while rank 0 may still be writing), then leave
        the process group. Torch has hung here, rarely, past gloo's own timeout (a CI run
        waited 300 s with a 60 s timeout): a watchdog then ends the process after the
        timeout. This rank's work is done and written by now, so it exits with success."""
        if not (self.enabled and dist.is_initialized()):
            return
        seconds = _timeout_seconds()
        with _watchdog(seconds, lambda: _give_up_leaving(self.rank, seconds)):
            dist.barrier()
            dist.destroy_process_group()


def _timeout_seconds() -> float:
    """How long a collective may wait on a peer: CHARGPT_DIST_TIMEOUT, 30 minutes by default."""
    value = os.environ.get("CHARGPT_DIST_TIMEOUT", "1800")
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"CHARGPT_DIST_TIMEOUT must be a number of seconds, not {value!r}"
                          ) from None
    if not 0 < seconds <= 1e7:  # timedelta and the watchdog's timer refuse infinity
        raise ConfigError(f"CHARGPT_DIST_TIMEOUT must be between 0 and 1e7 seconds, not {value!r}")
    return seconds


@contextmanager
def _watchdog(seconds: float, give_up: Callable[[], None]) -> Iterator[None]:
    """Run `give_up` from another thread if the block has not finished after `seconds`: the
    main thread may be stuck inside torch, where no exception or timeout reaches it."""
    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _give_up_leaving(rank: int, seconds: float) -> None:
    """The watchdog of `leave`: the run is complete, only torch's goodbye hung."""
    warn(f"rank {rank} could not leave the process group within {seconds:.0f} s "
         "(CHARGPT_DIST_TIMEOUT); its work is complete and written, so it exits")
    sys.stdout.flush()
    os._exit(0)


def _give_up_joining(rank: int, seconds: float) -> None:
    """The watchdog's way out: the main thread is stuck inside torch, so no exception reaches
    the CLI; the error is reported here and the process exits with torchrun's retry status."""
    report(TrainingError(f"rank {rank} could not join the process group within {seconds:.0f} s "
                         "(CHARGPT_DIST_TIMEOUT); exiting so that torchrun can restart the job"))
    os._exit(75)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def gather_tensors(t: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (e.g. RNG states), in rank order."""
    if not env.enabled:
        return [t]
    # gloo and NCCL both move tensors of a fixed shape without pickling anything.
    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t)
    return parts


def broadcast_flag(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (e.g. a stop signal seen by one process)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
