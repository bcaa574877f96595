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
import zipfile
from typing import Dict, Iterable, Mapping

import torch

from localmim.backends import runs
from localmim.backends.runs import CHECKPOINT_KEYS, CheckpointError
from localmim.core.files import write_atomically

__all__ = [
    "CheckpointError", "CHECKPOINT_KEYS", "checkpoint_name", "save_checkpoint", "load_checkpoint",
    "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "check_model_state",
]

EXT = ".pth"
_FILES = runs.CheckpointFiles(EXT)  # name(step), list(folder), latest(folder), prune(folder, keep)
checkpoint_name, list_checkpoints = _FILES.name, _FILES.list
latest_checkpoint, prune_checkpoints = _FILES.latest, _FILES.prune


class _RecordingFile:
    """A binary file for torch.save that keeps the OSError of a failed write: torch's zip writer
    reports it only as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos ..."."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


def save_checkpoint(path: str, payload: Mapping) -> str:
    """Write `payload` to `path` atomically (core.files.write_atomically).

    A crash at any point leaves either the old file or the complete new one, never half a file.
    A write that fails (full disk, quota, read-only or unwritable folder) leaves no temporary file
    and raises runs.CheckpointWriteError: one sentence naming `path`, the bytes needed and free.
    Returns `path`.
    """
    payload = dict(payload)
    files = []

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object, as before: the zip's inner folder stays "archive"
            files.append(_RecordingFile(f))
            torch.save(payload, files[-1])

    try:
        return write_atomically(path, write)
    except OSError as e:
        raise runs.write_failure(path, e, runs.array_bytes(payload)) from e
    except RuntimeError as e:  # the zip writer's; the OSError behind it names the cause
        cause = files[-1].error if files and files[-1].error is not None else e
        raise runs.write_failure(path, cause, runs.array_bytes(payload)) from e


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
    runs.require_keys(path, payload, require, "PyTorch", f"found {sorted(map(str, payload))[:8]}")
    return payload


def check_model_state(path: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple]) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys of `state` vs `expected`.

    expected: {name: shape} of the model (e.g. model.state_shapes()). path: only for the message.
    """
    runs.check_model_state(path, state, expected)
