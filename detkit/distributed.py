"""Thin helpers over ``torch.distributed`` that also work when it is not initialised."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over all ranks (the value itself without DDP); keeps no graph."""
    if not is_distributed():
        return value.detach()
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / get_world_size()


def any_rank(flag: Tensor) -> bool:
    """Whether the boolean scalar ``flag`` is true on any rank (one all-reduce under DDP)."""
    value = flag.detach().float().reshape(1)
    if is_distributed():
        if dist.get_backend() == "nccl" and not value.is_cuda:
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without DDP."""
    if not is_distributed():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = ["is_distributed", "get_rank", "get_world_size", "reduce_mean", "any_rank", "barrier", "all_gather_objects"]
