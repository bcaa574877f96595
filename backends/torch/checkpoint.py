"""Training checkpoints: atomic save, safe load, discovery and pruning.

A checkpoint is a plain dict that `torch.load(weights_only=True)` can read:

    {"model": canonical-named state_dict, "optimizer": optimizer.state_dict(),
     "scaler": GradScaler.state_dict() or None, "step": int (optimizer steps done),
     "epoch": int (epoch the next step belongs to), "config": plain dict of the PretrainConfig}

Files are named `checkpoint-<step>.pth` inside the run's output folder.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "CheckpointError", "CHECKPOINT_KEYS", "checkpoint_name", "save_checkpoint", "load_checkpoint",
    "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "check_model_state",
]

CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "config")
_NAME_RE = re.compile(r"^checkpoint-(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, foreign or made for another model."""


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint written after `step` optimizer steps."""
    return f"checkpoint-{int(step)}.pth"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, payload: Mapping) -> str:
    """Write `payload` to `path` atomically: temp file in the same folder, fsync, os.replace.

    A crash at any point leaves either the old file or the complete new one, never half a file.
    Returns `path`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)
    return path


def load_checkpoint(path: str, map_location="cpu", require: Iterable[str] = CHECKPOINT_KEYS) -> Dict:
    """Read a checkpoint with `torch.load(weights_only=True)` (never runs code from the file).

    require: payload keys that must be present (default: all training keys; pass () to read any
    weights-only dict). Raises FileNotFoundError or CheckpointError with one sentence naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint (corrupt, truncated or another "
                                  f"format)") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} holds Python objects{what} besides tensors and plain containers, so it cannot "
            f"be loaded safely; an official release (with a pickled argparse Namespace) must be converted "
            f"with `localmim convert` first") from None
    except Exception as e:  # the unpickler of a damaged file can raise almost anything (KeyError, IndexError...)
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint (corrupt, truncated or another "
                                  f"format)") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be read: "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a localmim checkpoint dict")
    missing = [k for k in require if k not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a localmim PyTorch training checkpoint: missing keys {missing} "
            f"(found {sorted(map(str, payload))[:8]})")
    return payload


def check_model_state(path: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys of `state` vs `expected`.

    path: only used in the message (the file the state came from).
    """
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped keys {_short(shapes)}")
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(parts))


def _short(items: List[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return f"[{head}{', ... %d more' % (len(items) - limit) if len(items) > limit else ''}]"


def list_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """All `checkpoint-<step>.pth` files in `folder` as (step, path), oldest step first."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _NAME_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def latest_checkpoint(folder: str) -> Optional[str]:
    """Path of the checkpoint with the highest step in `folder`, or None."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def prune_checkpoints(folder: str, keep: int) -> List[str]:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all). Returns removed paths."""
    if keep is None or keep <= 0:
        return []
    found = list_checkpoints(folder)
    removed = []
    for _, path in found[:-keep]:
        os.remove(path)
        removed.append(path)
    return removed
