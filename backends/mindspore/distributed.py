"""Device choice and data-parallel helpers for msrun: rank/world discovery, reductions.

One process per device. msrun sets MS_ROLE=MS_WORKER (MS_SCHED in its scheduler process), MS_WORKER_NUM, RANK_ID and RANK_SIZE in
each worker; a plain `python` run is rank 0 of a world of 1 and never initialises communication.
Under msrun `init_distributed` selects DATA_PARALLEL with gradients_mean before
`mindspore.communication.init()` (HCCL on Ascend, MindSpore's own CPU collectives on CPU), as
the MindSpore data-parallel sample does; the engine then reduces gradients with
`nn.DistributedGradReducer`.

MindSpore fixes the device once per process: `select_device` may be called again with the same
device, but asking for another one afterwards is an error that says so.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np

__all__ = [
    "select_device", "ascend_available", "launched_by_msrun", "init_distributed", "is_distributed",
    "get_rank", "get_world_size", "is_main", "barrier", "any_rank", "all_reduce_mean", "cleanup",
]

_STATE = {"initialized": False, "rank": 0, "world": 1}


def ascend_available() -> bool:
    """True when this MindSpore build can run on an Ascend NPU here."""
    import mindspore as ms
    try:
        return bool(ms.hal.is_available("Ascend"))
    except Exception:  # older builds without the hal query, or a broken driver install
        return False


def select_device(device: str = "auto") -> str:
    """Set the MindSpore device for this process and return "CPU" or "Ascend".

    auto -> Ascend when available, else CPU. "cuda"/"gpu" is refused: MindSpore 2.3+ wheels are
    released for Ascend and CPU only.
    """
    import mindspore as ms
    device = (device or "auto").lower()
    if device in ("cuda", "gpu"):
        raise ValueError(f"train.device {device!r} is not supported by the MindSpore backend: MindSpore 2.3+ "
                         f"wheels support Ascend and CPU only (use the PyTorch backend for CUDA GPUs)")
    if device == "auto":
        target = "Ascend" if ascend_available() else "CPU"
    elif device == "ascend":
        if not ascend_available():
            raise RuntimeError("train.device is 'ascend' but MindSpore finds no usable Ascend NPU here "
                               "(check the CANN toolkit and driver install)")
        target = "Ascend"
    elif device == "cpu":
        target = "CPU"
    else:
        raise ValueError(f"train.device {device!r} must be one of auto, cpu, ascend for the MindSpore backend")
    device_id = int(os.environ.get("DEVICE_ID", "0")) if target == "Ascend" else None
    try:
        if device_id is None:
            ms.set_device(target)
        else:
            ms.set_device(target, device_id)
    except RuntimeError as e:
        current = ms.get_context("device_target")
        raise RuntimeError(f"train.device asks for {target} but this process already runs MindSpore on "
                           f"{current}, and MindSpore cannot change the device once set ({str(e).splitlines()[0]})"
                           ) from None
    return target


def launched_by_msrun() -> bool:
    """True inside a process that msrun (or MindSpore's dynamic-cluster launch) started.

    msrun also runs the script in a scheduler process (MS_ROLE=MS_SCHED); it must call
    communication.init() too, which serves the cluster and never returns to the script.
    """
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and "MS_SCHED_PORT" in os.environ


def init_distributed(device: str = "auto") -> Tuple[int, int, str]:
    """Pick the device and join the msrun cluster if there is one.

    Returns (rank, world_size, device_target). Calling it again returns the same values.
    """
    import mindspore as ms
    target = select_device(device)
    if _STATE["initialized"]:
        return _STATE["rank"], _STATE["world"], target
    if launched_by_msrun():
        from mindspore.communication import get_group_size, get_rank, init
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        init()
        _STATE.update(initialized=True, rank=int(get_rank()), world=int(get_group_size()))
    return _STATE["rank"], _STATE["world"], target


def is_distributed() -> bool:
    return _STATE["initialized"] and _STATE["world"] > 1


def get_rank() -> int:
    return _STATE["rank"]


def get_world_size() -> int:
    return _STATE["world"]


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def all_reduce_mean(values: np.ndarray) -> np.ndarray:
    """Mean of a numpy array over all ranks (float64 result; the input is left as it was)."""
    values = np.asarray(values, dtype=np.float32)
    if not is_distributed():
        return values.astype(np.float64)
    import mindspore as ms
    from mindspore import ops
    # The ops.AllReduce primitive (what DistributedGradReducer uses): comm_func.all_reduce has no
    # CPU kernel in PyNative mode ("Create kernelmod for op InnerCommAllReduce failed").
    if "all_reduce" not in _STATE:
        _STATE["all_reduce"] = ops.AllReduce(ops.ReduceOp.SUM)
    out = _STATE["all_reduce"](ms.Tensor(values))
    return out.asnumpy().astype(np.float64) / _STATE["world"]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank: an all-reduce of one number (a SUM:
    MindSpore's CPU AllReduce has no MAX). In one process: `flag`, no collective."""
    if not is_distributed():
        return bool(flag)
    return bool(all_reduce_mean(np.array([1.0 if flag else 0.0], np.float32))[0] > 0)


def barrier() -> None:
    """Wait for every rank (an all-reduce of one number; no-op in a single process)."""
    if is_distributed():
        all_reduce_mean(np.zeros(1, np.float32))


def cleanup() -> None:
    """Leave the communication group (no-op when there is none)."""
    if _STATE["initialized"]:
        from mindspore.communication import release
        try:
            release()
        except Exception:  # some CPU builds release the cluster at process exit only
            pass
        _STATE.update(initialized=False, rank=0, world=1)
