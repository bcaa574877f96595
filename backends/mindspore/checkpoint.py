"""Training checkpoints for the MindSpore backend: atomic save, checked load, discovery, pruning.

The payload is the same as the torch backend's:

    {"model": canonical state {name: (shape) float32}, "optimizer": {state name: array},
     "scaler": {"scale_value", "scale_factor", "scale_window", "counter"} or None,
     "step": int (optimizer steps done), "epoch": int (epoch the next step belongs to),
     "config": plain dict of the PretrainConfig}

On disk it is one `checkpoint-<step>.ckpt` that `mindspore.load_checkpoint` reads, flattened to
named tensors (a list of {"name", "data"}: saving a plain dict[str, Tensor] hits a MindSpore 2.10
bug):

    <canonical model name>        e.g. blocks.0.attn.qkv.weight
    optim.<optimizer state name>  e.g. optim.exp_avg.blocks.0.attn.qkv.weight, optim.state_step
    scaler.<field>                loss-scaler state (fp16 only)
    meta.step, meta.epoch         int64 scalars
    meta.format                   the string "localmim-mindspore-pretrain-1"
    meta.config                   the config as JSON text (MindSpore stores strings natively)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np

from localmim.backends import runs
from localmim.backends.runs import CHECKPOINT_KEYS, CheckpointError
from localmim.core.files import write_atomically

__all__ = [
    "CheckpointError", "CHECKPOINT_KEYS", "FORMAT_TAG", "checkpoint_name", "save_checkpoint", "load_checkpoint",
    "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "check_model_state",
]

FORMAT_TAG = "localmim-mindspore-pretrain-1"
EXT = ".ckpt"
_PREFIXES = {"optimizer": "optim.", "scaler": "scaler."}
_FILES = runs.CheckpointFiles(EXT)  # name(step), list(folder), latest(folder), prune(folder, keep)
checkpoint_name, list_checkpoints = _FILES.name, _FILES.list
latest_checkpoint, prune_checkpoints = _FILES.latest, _FILES.prune


def _to_tensor(value):
    import mindspore as ms
    if isinstance(value, ms.Tensor):
        return value
    arr = np.asarray(value)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return ms.Tensor(np.ascontiguousarray(arr))


def _flatten(payload: Mapping) -> Tuple[List[Dict], Dict]:
    """payload -> (list of {"name", "data"} tensors, append_dict of strings)."""
    missing = [k for k in CHECKPOINT_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks keys {missing}")
    entries = []
    seen = set()

    def add(name, value):
        if name in seen:
            raise ValueError(f"checkpoint payload has the tensor name {name} twice")
        seen.add(name)
        entries.append({"name": name, "data": _to_tensor(value)})

    for name, value in payload["model"].items():
        if name.startswith(("optim.", "scaler.", "meta.")):
            raise ValueError(f"model parameter name {name} collides with a reserved checkpoint prefix")
        add(name, value)
    for section, prefix in _PREFIXES.items():
        for name, value in (payload.get(section) or {}).items():
            add(prefix + name, value)
    add("meta.step", np.array(int(payload["step"]), dtype=np.int64))
    add("meta.epoch", np.array(int(payload["epoch"]), dtype=np.int64))
    extra = {"meta.format": FORMAT_TAG, "meta.config": json.dumps(payload["config"], sort_keys=True)}
    return entries, extra


class _Quiet(logging.Filter):
    """Drops the MindSpore log lines that the one-sentence errors of this module replace:
    "[CRITICAL] ... Failed to save the checkpoint file" (CheckpointWriteError names the real file)
    and "[WARNING] ... the ckpt file do not contain the crc code" (CheckpointError says the file
    is broken)."""

    PHRASES = ("Failed to save the checkpoint file", "do not contain the crc code")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in str(record.msg) for p in self.PHRASES)


@contextlib.contextmanager
def _quiet_mindspore_log():
    try:
        from mindspore import log
        logger = log._get_logger()  # private, hence the fallback: without it the lines are printed
    except Exception:  # noqa: BLE001
        logger = None
    quiet = _Quiet()
    if logger is not None:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        if logger is not None:
            logger.removeFilter(quiet)


def save_checkpoint(path: str, payload: Mapping) -> str:
    """Write `payload` (see module docstring) to `path` atomically.

    mindspore.save_checkpoint writes a temporary file beside `path` whose name ends in .ckpt, as
    MindSpore requires, and core.files.write_atomically moves it over `path`: a crash leaves the
    old file or the new one, never half a file. A write that fails (full disk, quota, read-only or
    unwritable folder) leaves no temporary file and raises runs.CheckpointWriteError: one sentence
    naming `path`, the bytes needed and free. Returns `path`.
    """
    import mindspore as ms
    entries, extra = _flatten(payload)

    def write(tmp: str) -> None:
        try:
            ms.save_checkpoint(entries, tmp, append_dict=extra, crc_check=True)
        finally:  # MindSpore writes <stem>.tmp first and renames it; a failed write leaves it behind
            partial = os.path.splitext(tmp)[0] + ".tmp"
            if os.path.lexists(partial):
                os.remove(partial)

    try:
        with _quiet_mindspore_log():
            return write_atomically(path, write, suffix=EXT)
    except (OSError, RuntimeError) as e:
        raise runs.write_failure(path, e, runs.array_bytes(payload)) from e


def _to_numpy(value):
    return value.asnumpy() if hasattr(value, "asnumpy") else value


def load_checkpoint(path: str, require: Iterable[str] = CHECKPOINT_KEYS) -> Dict:
    """Read a checkpoint written by save_checkpoint back into the payload dict (numpy arrays).

    require: payload keys that must be present (default: all training keys; ("model",) reads a
    weights-only file; a plain MindSpore checkpoint without meta entries then gives its tensors
    as "model"). Raises FileNotFoundError, or CheckpointError with one sentence naming the file and
    the keys at fault.
    """
    import mindspore as ms
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with _quiet_mindspore_log():
            raw = ms.load_checkpoint(path, crc_check=True)
    except Exception as e:  # MindSpore raises ValueError / RuntimeError / TypeError on bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a MindSpore checkpoint and "
                              f"cannot be read ({msg})") from None
    if not raw:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    payload: Dict = {"model": {}, "optimizer": {}, "scaler": None}
    scaler: Dict[str, np.ndarray] = {}
    fmt = raw.get("meta.format")
    for name, value in raw.items():
        if name.startswith("optim."):
            payload["optimizer"][name[len("optim."):]] = _to_numpy(value)
        elif name.startswith("scaler."):
            scaler[name[len("scaler."):]] = _to_numpy(value)
        elif name.startswith("meta."):
            continue
        else:
            payload["model"][name] = _to_numpy(value)
    if scaler:  # all scalars; MindSpore stores 0-d tensors as shape (1,)
        payload["scaler"] = {k: np.asarray(v).reshape(()) for k, v in scaler.items()}
    if "state_step" in payload["optimizer"]:
        payload["optimizer"]["state_step"] = np.asarray(payload["optimizer"]["state_step"]).reshape(())
    if fmt is not None:
        if fmt != FORMAT_TAG:
            raise CheckpointError(f"checkpoint {path} has format {fmt!r}, expected {FORMAT_TAG!r}")
        try:
            payload["step"] = int(np.asarray(_to_numpy(raw["meta.step"])).reshape(-1)[0])
            payload["epoch"] = int(np.asarray(_to_numpy(raw["meta.epoch"])).reshape(-1)[0])
            payload["config"] = json.loads(raw["meta.config"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} has broken meta entries (meta.step, meta.epoch, "
                                  f"meta.config): {e}") from None
    else:
        payload.pop("optimizer")
        payload.pop("scaler")
    runs.require_keys(path, payload, require, "MindSpore",
                      f"no meta.format/meta.step/meta.config entries; found tensors {sorted(raw)[:8]}")
    return payload


def check_model_state(path: str, state: Mapping[str, np.ndarray], expected: Mapping[str, tuple]) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys of `state` vs `expected`.

    expected: {name: shape} of the model (e.g. model.state_shapes()). path: only for the message.
    """
    runs.check_model_state(path, state, expected)
