"""Process-group helpers for torchrun: rank/world discovery, device choice, reductions.

One process per device. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python` run is
rank 0 of a world of 1 and never creates a process group.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Tuple

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed", "select_device", "is_distributed", "get_rank", "get_world_size", "is_main",
    "barrier", "any_rank", "all_reduce_mean", "broadcast_object", "cleanup",
]


def select_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:<local_rank> when CUDA is available, else cpu. `ascend` is MindSpore only."""
    device = (device or "auto").lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but PyTorch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"train.device {device!r} is not usable with the PyTorch backend (use auto, cpu or cuda)")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> Tuple[int, int, int, torch.device]:
    """Join the torchrun process group if there is one.

    Returns (rank, world_size, local_rank, device). Backend: NCCL on CUDA, gloo on CPU.
    timeout_s (train.collective_timeout_s): how long a collective waits for a rank that is gone
    before it fails (NCCL's watchdog then aborts the process). Calling it again after the group
    exists just returns the same values.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = select_device(device, local_rank)
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    if is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, local_rank, dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank: an all-reduce MAX of one number, on the
    device for NCCL (one host sync), on the CPU for gloo. In one process: `flag`, no collective."""
    if not is_distributed():
        return bool(flag)
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all ranks (a new tensor; the input is left as it was)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def broadcast_object(obj, src: int = 0):
    """The value of `obj` on rank `src`, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if is_distributed():
        dist.destroy_process_group()
