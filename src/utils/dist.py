"""Small helpers over torch.distributed that also work when no process group exists.

The pipeline runs in every process of a multi-process job (as a Lightning script does); these helpers
keep decisions (reuse a stage or not) identical on all ranks and reduce sums across ranks.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_only

T = TypeVar("T")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """Rank from the process group, or from the launcher's environment before the group exists."""
    if is_dist():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_rank_zero() -> bool:
    return global_rank() == 0


# What Lightning's DDP launcher sets in the launching process's environment.
LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_externally() -> bool:
    """True in processes started by a launcher (torchrun, SLURM, or Lightning for ranks >= 1)."""
    return any(k in os.environ for k in ("LOCAL_RANK", "SLURM_PROCID", "RANK"))


def shutdown(forget_launch: bool = False) -> None:
    """End the process group (all ranks), e.g. between the jobs of a multirun. ``forget_launch``: this
    process launched its DDP children itself; clear the environment the launcher left behind, so the
    next job launches (and rendezvous on a fresh port) again."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
    if forget_launch:
        for key in LAUNCH_ENV:
            os.environ.pop(key, None)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s value of ``obj`` on every rank (identity without a process group)."""
    if not is_dist():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_device() -> torch.device:
    """Where tensors must be to be reduced across ranks: this rank's GPU under NCCL, else the CPU
    (torchmetrics states are synced where they live)."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (in place; returned for chaining). Works for gloo and nccl."""
    if not is_dist():
        return tensor
    backend = dist.get_backend()
    if backend == "nccl" and not tensor.is_cuda:
        moved = tensor.cuda()
        dist.all_reduce(moved)
        tensor.copy_(moved.cpu())
        return tensor
    dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj: T) -> list[T]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def global_mean_count(count: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a per-rank count (no gradient).

    A loss that is a batch-global mean, sum / count, must divide by the count of the GLOBAL batch for
    1 and N processes to agree: with DDP averaging gradients over N ranks, each rank divides its own sum
    by (global count / N), which is this value. Without a process group it is the count itself.
    """
    count = count.detach().clone().float()
    if not is_dist():
        return count
    return all_reduce_sum(count) / world_size()
