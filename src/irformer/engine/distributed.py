"""torchrun / DDP plumbing: process-group setup, rank-0 checks, reductions.

Under ``torchrun --nproc_per_node N`` the environment carries ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; without them
everything here degrades to a single process and no process group is created.
Every torchrun launch joins a process group and trains through DDP, even with
one process, so ``torchrun --nproc_per_node 1`` on one GPU runs the same NCCL
code as eight. NCCL is used when the process has a GPU, gloo otherwise (CPU
training and the 2-process CPU test).

Data sharding is not done with ``DistributedSampler`` but by the trainer's
sample stream (:mod:`irformer.engine.data`): rank ``r`` takes slice ``r`` of
every global batch, so N processes with batch B see exactly the samples one
process with batch N*B would.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from irformer.errors import DeviceUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    process_group: bool = False
    """A process group was joined (every torchrun launch, one process included)."""

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the console, the logs and the checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Collectives and DDP are in use: a process group, or more than one rank."""
        return self.process_group or self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment and join the process group when launched by it.

    Launched means ``WORLD_SIZE`` > 1, or ``RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` set (torchrun with one process). ``device``: ``"cpu"``,
    ``"cuda"`` or None (CUDA when available). Each rank uses GPU ``LOCAL_RANK``.
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {device!r} requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    launched = world > 1 or all(
        name in os.environ for name in ("RANK", "MASTER_ADDR", "MASTER_PORT")
    )
    if launched and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
        )
        logger.info("joined %s process group: rank %d of %d", backend, rank, world)
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local,
        device=dev,
        process_group=dist.is_available() and dist.is_initialized(),
    )


def cleanup_distributed() -> None:
    """Leave the process group (no-op for single-process runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wrap ``model`` when distributed; identity otherwise.

    Parameters are broadcast from rank 0 at construction, so every rank starts
    from rank 0's initialisation.
    """
    if not info.distributed:
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (for saving, EMA and probes)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_mean(value: Tensor, info: DistInfo) -> Tensor:
    """Mean of ``value`` over ranks (a detached copy; the input is untouched)."""
    out = value.detach().clone()
    if info.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= info.world_size
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. while rank 0 writes a checkpoint)."""
    if info.distributed:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's boolean, on every rank (e.g. "stop now")."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())
