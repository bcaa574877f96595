"""Framework-neutral parts of a pretraining run, shared by the torch and MindSpore backends.

What a run writes into `cfg.train.output_dir` (the same with both backends):
- config.yaml   the resolved config;
- log.jsonl     one object per logged step: step, epoch, loss, loss_b0..loss_b3, lr, images_per_s,
                step_time_s (losses: mean over the optimizer steps since the previous line, each
                step's loss being the mean of its micro-batches and of all ranks);
- checkpoint-<step><ext> (ext ".pth" for torch, ".ckpt" for MindSpore; see each backend's
                checkpoint.py), the newest `train.keep_checkpoints` kept;
- tensorboard/  with `train.tensorboard: true`, TensorBoard event files (backends/tensorboard.py):
                the log.jsonl scalars and, every `train.tensorboard_images_every_epochs` epochs,
                the reconstruction figure of the engine's figure hook.

Counting: `step` is the number of optimizer steps done; steps_per_epoch = micro-batches per epoch
// accum_iter (left-over micro-batches of an epoch are skipped, as in the reference); the lr of
optimizer step s is core.schedule.lr_for_step(s, steps_per_epoch, ...). A run stops after
`train.max_steps` steps in total when set, else after `optim.epochs` epochs. Rerunning with the
same output folder resumes from its newest valid checkpoint (train.resume) and reproduces the
uninterrupted run: data order, augmentation and masks are functions of (seed, epoch, index), not
of saved RNG state.

This module owns everything about that folder that does not touch a framework: checkpoint naming
/ listing / pruning, the model-state key check, log.jsonl writing and trimming at resume, the
per-step loss tracker, the config-change check at resume, the step / checkpoint schedule and the
fault policies (section faults: train.resume, train.on_save_error, the Preempted stop); the
loop that uses them is backends/loop.py, and files are written through core.files. It imports
numpy, json, yaml (through core.config) and localmim.core only, never torch or mindspore.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from localmim.core import config as core_config
from localmim.core.config import save_config
from localmim.core.files import _TEMP_PREFIX as TEMP_PREFIX
from localmim.core.files import write_text_atomically

__all__ = [
    "CHECKPOINT_KEYS", "LOG_KEYS", "RESUME_FREE_KEYS", "CheckpointError", "NonFiniteLossError",
    "CheckpointFiles", "require_keys", "check_model_state",
    "load_latest", "config_to_dict", "write_config", "trim_log", "last_logged_loss", "changed_config_keys",
    "warn_config_change", "spec_from_checkpoint",
    "show_progress", "accum_steps", "plan_steps", "loop_intervals", "save_due", "start_output",
    "save_run_checkpoint", "open_tensorboard", "figure_due", "LossTracker", "StepLogger",
    "PREEMPTED_EXIT_STATUS", "RESUME_POLICIES", "SAVE_ERROR_POLICIES", "BROKEN_SUFFIX", "Preempted",
    "CheckpointWriteError", "ResumeError", "array_bytes", "free_bytes", "write_failure", "checkpoint_not_written",
    "resume_checkpoint", "remove_stale_temporaries",
]

CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "config")
LOG_KEYS = ("step", "epoch", "loss", "loss_b0", "loss_b1", "loss_b2", "loss_b3", "lr", "images_per_s",
            "step_time_s")
# Keys that may change between a run and its resumption without changing its numbers.
RESUME_FREE_KEYS = frozenset({"data.num_workers", "train.output_dir", "train.max_steps", "train.log_every",
                              "train.save_every_steps", "train.save_every_epochs", "train.keep_checkpoints",
                              "train.progress", "train.compile", "train.device", "train.tensorboard",
                              "train.tensorboard_images_every_epochs", "train.resume", "train.on_save_error",
                              "train.collective_timeout_s", "eval.knn_data", "eval.every_epochs",
                              "train.jit_level", "train.compile_mode", "train.eval_every_epochs",
                              "data.eval_batch_size"})


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, foreign or made for another model."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


# ---------------------------------------------------------------------------------------- checkpoints
class CheckpointFiles:
    """The `checkpoint-<step><ext>` files of a run's output folder (ext with its dot: ".pth", ".ckpt").

    Backends bind the methods as their module functions (checkpoint_name, list_checkpoints, ...).
    """

    def __init__(self, ext: str):
        self.ext = ext
        self._pattern = re.compile(r"^checkpoint-(\d+)" + re.escape(ext) + "$")

    def name(self, step: int) -> str:
        """File name of the checkpoint written after `step` optimizer steps."""
        return f"checkpoint-{int(step)}{self.ext}"

    def list(self, folder: str) -> List[Tuple[int, str]]:
        """All checkpoint files in `folder` as (step, path), oldest step first."""
        if not folder or not os.path.isdir(folder):
            return []
        found = []
        for name in os.listdir(folder):
            m = self._pattern.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(folder, name)))
        return sorted(found)

    def latest(self, folder: str) -> Optional[str]:
        """Path of the checkpoint with the highest step in `folder`, or None."""
        found = self.list(folder)
        return found[-1][1] if found else None

    def prune(self, folder: str, keep: int) -> List[str]:
        """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all). Returns removed paths."""
        if keep is None or keep <= 0:
            return []
        removed = []
        for _, path in self.list(folder)[:-keep]:
            os.remove(path)
            removed.append(path)
        return removed


def require_keys(path: str, payload: Mapping, require: Iterable[str], backend: str, found: str) -> None:
    """Raise CheckpointError when `payload` lacks any of the `require` keys.

    backend: "PyTorch" / "MindSpore" (for the message); found: what the file holds, for the message.
    """
    missing = [k for k in require if k not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a localmim {backend} training checkpoint: missing keys {missing} ({found})")


def _short(items: List[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return f"[{head}{', ... %d more' % (len(items) - limit) if len(items) > limit else ''}]"


def check_model_state(path: str, state: Mapping[str, object], expected: Mapping[str, Sequence[int]]) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys of `state` vs `expected`.

    state: {name: array-like} (numpy, torch or MindSpore). expected: {name: shape} of the model.
    path: only used in the message (the file the state came from). The message format is the one
    both backends have always used (not core.state.check_state's, which tools print differently).
    """
    shape_of = {k: tuple(np.shape(v)) for k, v in state.items()}
    want = {k: tuple(v) for k, v in expected.items()}
    missing = sorted(set(want) - set(shape_of))
    unexpected = sorted(set(shape_of) - set(want))
    shapes = sorted(f"{k}: {shape_of[k]} vs model {want[k]}" for k in want if k in shape_of and shape_of[k] != want[k])
    parts = [f"{label} keys {_short(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
    if parts:
        raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(parts))


# ---------------------------------------------------------------------------------------- config
def config_to_dict(cfg) -> Dict:
    """The config as plain nested dicts/lists (what checkpoints and config.yaml hold)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def write_config(cfg, path: str) -> None:
    """config.yaml of a run (core.config.save_config)."""
    save_config(cfg, path)


def changed_config_keys(saved: Dict, current: Dict) -> List[str]:
    """Dotted config keys whose values differ between a checkpoint's config and this run's,
    as 'section.key (old -> new)', ignoring RESUME_FREE_KEYS and keys the saved config lacks."""
    changed = []
    for section, body in current.items():
        old = saved.get(section, {}) if isinstance(saved, dict) else {}
        for key, value in body.items():
            name = f"{section}.{key}"
            if name not in RESUME_FREE_KEYS and old.get(key, value) != value:
                changed.append(f"{name} ({old.get(key)!r} -> {value!r})")
    return changed


def spec_from_checkpoint(path: str, config: Dict):
    """The model spec a training checkpoint's saved config describes (CheckpointError naming the
    file when the config does not load)."""
    try:
        cfg = core_config.config_from_dict(config, where=f"checkpoint {path} config")
    except core_config.ConfigError as e:
        raise CheckpointError(str(e)) from None
    return cfg.build_spec()


def warn_config_change(path: str, saved: Optional[Dict], cfg, main: bool) -> None:
    """Warn (rank 0) when a run resumes from `path` with a config that changes its numbers."""
    changed = changed_config_keys(saved or {}, config_to_dict(cfg))
    if changed and main:
        warnings.warn(f"resuming from {path} with a different config: {', '.join(changed)}; the run "
                      f"will not reproduce an uninterrupted one", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------- log.jsonl
def _parse(line: str):
    """A log.jsonl line as its object, or None when it does not parse (a torn last line)."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def trim_log(path: str, last_step: int) -> None:
    """Drop log lines past `last_step` (written after the checkpoint a resumed run starts from)
    and lines that do not parse (a torn last line from a killed run)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if _parse(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (KeyError, TypeError):
            continue
    if kept != lines:
        write_text_atomically(path, "".join(kept))


def last_logged_loss(path: str) -> Optional[float]:
    """The loss of the last line of log.jsonl that has one, or None."""
    if not os.path.exists(path):
        return None
    loss = None
    with open(path) as f:
        for line in f:
            try:
                loss = float(_parse(line)["loss"])
            except (ValueError, KeyError, TypeError):
                pass
    return loss


def show_progress(setting: Optional[bool]) -> bool:
    """train.progress: True / False, or None = a progress bar when stderr is a terminal."""
    if setting is not None:
        return bool(setting)
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# ---------------------------------------------------------------------------------------- schedule
def accum_steps(cfg) -> int:
    """optim.accum_iter, checked to be >= 1."""
    accum = int(cfg.optim.accum_iter)
    if accum < 1:
        raise ValueError(f"optim.accum_iter must be >= 1, got {accum}")
    return accum


def plan_steps(cfg, batches_per_epoch: int, accum: int) -> Tuple[int, int]:
    """(steps_per_epoch, total optimizer steps) of a run whose ranks see `batches_per_epoch`
    micro-batches an epoch: train.max_steps when set, else optim.epochs whole epochs."""
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"{batches_per_epoch} micro-batches per epoch on each rank are fewer than "
                         f"optim.accum_iter {accum}: no optimizer step fits in an epoch")
    total = int(cfg.train.max_steps) if cfg.train.max_steps is not None else int(cfg.optim.epochs) * steps_per_epoch
    return steps_per_epoch, total


def loop_intervals(cfg) -> Tuple[int, int, int]:
    """(log_every, save_every_steps, save_every_epochs) with 0 meaning never for the last two."""
    log_every = max(1, int(cfg.train.log_every))
    save_every = int(cfg.train.save_every_steps) if cfg.train.save_every_steps else 0
    save_epochs = int(cfg.train.save_every_epochs) if cfg.train.save_every_epochs else 0
    return log_every, save_every, save_epochs


def save_due(step: int, total: int, steps_per_epoch: int, save_every: int, save_epochs: int) -> bool:
    """Whether a checkpoint is written after optimizer step `step` (the last step always is)."""
    epoch_done = step % steps_per_epoch == 0
    return step == total or bool(save_every and step % save_every == 0) or \
        bool(epoch_done and save_epochs and (step // steps_per_epoch) % save_epochs == 0)


# ---------------------------------------------------------------------------------------- run steps
def remove_stale_temporaries(out: str) -> List[str]:
    """Delete the temporary files a killed run left in `out` (core.files names them .tmp-<file>.*,
    MindSpore's own partial file ends in .tmp). Only a run that owns the folder calls this, before
    it writes anything. Returns the removed paths."""
    removed = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        path = os.path.join(out, name)
        if name.startswith(TEMP_PREFIX) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def start_output(cfg, out: str, step: int, main: bool) -> str:
    """Remove stale temporary files, write config.yaml and trim log.jsonl to `step` (rank 0 only).
    Returns the log.jsonl path."""
    log_path = os.path.join(out, "log.jsonl")
    if main:
        remove_stale_temporaries(out)
        for path, write in ((os.path.join(out, "config.yaml"), lambda p: write_config(cfg, p)),
                            (log_path, lambda p: trim_log(p, step))):
            try:
                write(path)
            except OSError as e:  # a full or read-only output folder: one sentence naming the file
                raise write_failure(path, e, None, what="run file") from e
    return log_path


def open_tensorboard(cfg, out: str, step: int, main: bool):
    """A backends.tensorboard.TensorBoardWriter on <out>/tensorboard when train.tensorboard is true
    (rank 0 only; `step`: the steps already done), else None."""
    if not (main and cfg.train.tensorboard):
        return None
    from localmim.backends.tensorboard import TENSORBOARD_DIR, TensorBoardWriter
    return TensorBoardWriter(os.path.join(out, TENSORBOARD_DIR), start_step=step)


def epoch_end_due(step: int, total: int, steps_per_epoch: int, every_epochs: int) -> bool:
    """Whether something done every `every_epochs` epochs (an evaluation, the TensorBoard
    figure) is due after optimizer step `step`: at the end of every `every_epochs`-th epoch and
    after the last step (every_epochs 0: never)."""
    if every_epochs <= 0:
        return False
    epoch_done = step % steps_per_epoch == 0 and (step // steps_per_epoch) % every_epochs == 0
    return epoch_done or step == total


figure_due = epoch_end_due  # the TensorBoard reconstruction figure's cadence (train.tensorboard_images_every_epochs)


def load_latest(ckpt, out: str, expected: Callable[[], Mapping]) -> Tuple[Optional[str], Optional[Dict]]:
    """(newest checkpoint of `out`, its payload) for a resumed run, or (None, None) for a new one.

    ckpt: the backend's checkpoint module (latest_checkpoint, load_checkpoint, check_model_state);
    expected(): what its check_model_state compares the payload's model state with.
    """
    path = ckpt.latest_checkpoint(out)
    if path is None:
        return None, None
    payload = ckpt.load_checkpoint(path)
    ckpt.check_model_state(path, payload["model"], expected())
    return path, payload


def save_run_checkpoint(ckpt, out: str, at_step: int, steps_per_epoch: int, cfg, states: Callable[[], Tuple],
                        main: bool) -> str:
    """Write `checkpoint-<at_step>` with a backend checkpoint module and prune old ones (rank 0).

    ckpt: the backend's checkpoint module (checkpoint_name, save_checkpoint, prune_checkpoints).
    states(): (model state, optimizer state, scaler state or None), only called on rank 0.
    Returns the checkpoint path (on every rank).
    """
    path = os.path.join(out, ckpt.checkpoint_name(at_step))
    if main:
        model_state, optimizer_state, scaler_state = states()
        ckpt.save_checkpoint(path, {
            "model": model_state, "optimizer": optimizer_state, "scaler": scaler_state,
            "step": at_step, "epoch": at_step // steps_per_epoch, "config": config_to_dict(cfg)})
        ckpt.prune_checkpoints(out, int(cfg.train.keep_checkpoints))
    return path


# ---------------------------------------------------------------------------------------- faults
# What a long run on a shared cluster meets, handled the same way in both backends: a stop
# request (backends/loop.py StopSignals), a checkpoint that cannot be written (train.on_save_error)
# and a newest checkpoint that cannot be read (train.resume).
PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL of sysexits.h: stopped on request with a checkpoint; rerun to resume
RESUME_POLICIES = ("latest_valid", "latest", "none")  # train.resume, or the path of a checkpoint
SAVE_ERROR_POLICIES = ("stop", "warn")                # train.on_save_error
BROKEN_SUFFIX = ".broken"  # a checkpoint that does not load is moved aside under its name + this


class Preempted(Exception):
    """The run stopped on SIGTERM / SIGUSR1 after a whole optimizer step and wrote its checkpoint.

    signal_name: e.g. "SIGTERM" (or "a stop signal on another rank"); step / total: optimizer steps
    done / planned; checkpoint: the file written. The CLI exits with PREEMPTED_EXIT_STATUS; the same
    command resumes from `checkpoint` and reproduces the uninterrupted run.
    """

    exit_status = PREEMPTED_EXIT_STATUS

    def __init__(self, signal_name: str, step: int, total: int, checkpoint: str):
        super().__init__(f"stopped by {signal_name} after step {step} of {total} and wrote {checkpoint}; "
                         f"run the same command again to resume")
        self.signal_name, self.step, self.total, self.checkpoint = signal_name, step, total, checkpoint


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written: full disk, quota, read-only or unwritable folder.

    The message is one sentence naming the file, the bytes it needs and the bytes free there.
    """


class ResumeError(CheckpointError):
    """train.resume cannot be followed in this output folder (the message says why)."""


def array_bytes(tree) -> int:
    """Bytes of the arrays in a nested payload (anything with an integer .nbytes: numpy, torch and
    MindSpore tensors); strings and numbers count 0. What a checkpoint file needs, roughly."""
    if isinstance(tree, Mapping):
        return sum(array_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(array_bytes(v) for v in tree)
    n = getattr(tree, "nbytes", None)
    return int(n) if isinstance(n, (int, np.integer)) else 0


def free_bytes(path: str) -> Optional[int]:
    """Bytes free to this user on the filesystem that holds `path` (or its nearest existing
    parent folder), or None when that cannot be asked."""
    folder = os.path.dirname(os.path.abspath(path))
    while folder and not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


def _size(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df -H prints them)."""
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1000:
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def write_failure(path: str, error: BaseException, needed: Optional[int],
                  what: str = "checkpoint") -> CheckpointWriteError:
    """The CheckpointWriteError for a failed write of `path` (what backends raise).

    error: the OSError of the write (ENOSPC, EDQUOT, EACCES, EROFS, ...) or the framework's
    RuntimeError; needed: the bytes of the payload's arrays (array_bytes), None when unknown;
    what: the kind of file, for the message.
    """
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
    free = free_bytes(path)
    room = [f"it needs about {_size(needed)}"] if needed is not None else []
    if free is not None:
        room.append(f"{_size(free)} are free there")
    return CheckpointWriteError(f"cannot write {what} {path}: {reason}" + "".join(
        f"{'; ' if i == 0 else ' and '}{part}" for i, part in enumerate(room)))


def checkpoint_not_written(error: Optional[CheckpointWriteError], path: str, policy: str, final: bool,
                           kept: Optional[str], step: int, main: bool) -> None:
    """Follow train.on_save_error after the checkpoint `path` of step `step` failed on rank 0.

    error: rank 0's CheckpointWriteError (None on the other ranks, which learn of it through the
    loop's any_rank); kept: the newest checkpoint on disk. "stop", and the last checkpoint of a run
    or of a preemption under any policy (nothing would come after it): raise CheckpointWriteError
    on every rank. "warn": a RuntimeWarning on rank 0, and the run goes on.
    """
    base = str(error) if error is not None else f"rank 0 could not write checkpoint {path}"
    kept_text = f"the newest checkpoint, {kept}, is kept" if kept else "no earlier checkpoint exists"
    if policy == "warn" and not final:
        if main:
            warnings.warn(f"{base}; training goes on without it (train.on_save_error=warn) and {kept_text}",
                          RuntimeWarning, stacklevel=3)
        return
    raise CheckpointWriteError(f"{base}; training stopped after step {step} and {kept_text}")


def _load_valid(ckpt, path: str, expected: Callable[[], Mapping]) -> Dict:
    """The payload of `path`, checked to fit the model (CheckpointError / FileNotFoundError)."""
    payload = ckpt.load_checkpoint(path)
    ckpt.check_model_state(path, payload["model"], expected())
    return payload


def _set_aside(broken: List[Tuple[str, str]], resumed: str, main: bool) -> None:
    """Rank 0: move each broken checkpoint to <name>.broken (out of listing and pruning, kept for a
    look) and warn, naming it, why, and the checkpoint the run resumes from instead."""
    if not main:
        return
    for path, why in broken:
        try:
            os.replace(path, path + BROKEN_SUFFIX)
            where = f"it was moved to {path + BROKEN_SUFFIX}"
        except OSError as e:
            where = f"it could not be moved aside ({e.strerror or e})"
        warnings.warn(f"{why}; {where} and the run resumes from {resumed} (train.resume=latest_valid)",
                      RuntimeWarning, stacklevel=4)


def _newest_valid(ckpt, out: str, found: List[Tuple[int, str]], expected, main: bool):
    broken: List[Tuple[str, str]] = []
    for _, path in reversed(found):
        try:
            payload = _load_valid(ckpt, path, expected)
        except FileNotFoundError:  # set aside by rank 0 meanwhile
            continue
        except CheckpointError as e:
            broken.append((path, str(e)))
            continue
        _set_aside(broken, path, main)
        return path, payload
    if broken:
        more = f" (and {len(broken) - 1} older ones)" if len(broken) > 1 else ""
        raise ResumeError(f"no checkpoint in {out} can be resumed: {broken[0][1]}{more}; use another output "
                          f"folder to start over, or train.resume=<checkpoint path>")
    return None, None


def _from_path(ckpt, out: str, given: str, found: List[Tuple[int, str]], expected):
    path = os.path.abspath(os.path.expanduser(given))
    payload = _load_valid(ckpt, path, expected)
    step = int(payload["step"])
    newer = [p for s, p in found if s > step and os.path.abspath(p) != path]
    if newer:
        names = ", ".join(os.path.basename(p) for p in newer[:4]) + (" ..." if len(newer) > 4 else "")
        raise ResumeError(f"train.resume={given} starts at step {step}, but {out} holds newer checkpoints "
                          f"({names}) that this run would overwrite; move them away or choose another output "
                          f"folder (train.resume=latest_valid continues from the newest)")
    return path, payload


def resume_checkpoint(ckpt, out: str, policy: str, expected: Callable[[], Mapping],
                      main: bool) -> Tuple[Optional[str], Optional[Dict]]:
    """(checkpoint, payload) a run starts from as train.resume says, or (None, None) to start over.

    policy: "latest_valid" (the newest checkpoint of `out` that loads and fits the model; newer
    broken ones are moved to <name>.broken with a warning; ResumeError when checkpoints exist but
    none loads), "latest" (the newest, or its CheckpointError), "none" (start over; ResumeError
    when `out` already holds checkpoints, which the new run would overwrite) or a checkpoint path
    (ResumeError when `out` holds newer checkpoints). ckpt: the backend's checkpoint module
    (list_checkpoints, load_checkpoint, check_model_state); expected(): the model's {name: shape}.
    """
    found = ckpt.list_checkpoints(out)
    if policy == "none":
        if found:
            raise ResumeError(f"train.resume=none starts over, but {out} holds checkpoints "
                              f"({os.path.basename(found[-1][1])} and {len(found) - 1} more) that the new run "
                              f"would overwrite; choose another output folder or train.resume=latest_valid")
        return None, None
    if policy == "latest":
        return (found[-1][1], _load_valid(ckpt, found[-1][1], expected)) if found else (None, None)
    if policy == "latest_valid":
        return _newest_valid(ckpt, out, found, expected, main)
    return _from_path(ckpt, out, policy, found, expected)


class LossTracker:
    """Per-step [loss, loss_b0..] rows, kept as the backend made them; fetched only when asked.

    gather(pending rows) -> (n, 1 + branches) numpy array averaged over ranks (one host sync);
    latest(output_dir) -> newest checkpoint path or None, for the error message. fetch() raises
    NonFiniteLossError naming the first bad step, on every rank alike.
    """

    def __init__(self, output_dir: str, steps_per_epoch: int, gather: Callable[[List], np.ndarray],
                 latest: Callable[[str], Optional[str]]):
        self.pending: List = []
        self.pending_steps: List[int] = []
        self.window: List[np.ndarray] = []
        self.output_dir = output_dir
        self.steps_per_epoch = steps_per_epoch
        self.last_row: Optional[np.ndarray] = None
        self._gather, self._latest = gather, latest

    def add(self, row, step: int) -> None:
        self.pending.append(row)
        self.pending_steps.append(step)

    def fetch(self) -> None:
        if not self.pending:
            return
        rows = self._gather(self.pending)
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            step = self.pending_steps[int(np.argmax(bad))]
            last = self._latest(self.output_dir)
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {(step - 1) // self.steps_per_epoch}); "
                f"last good checkpoint: {last if last else 'none'}")
        self.window.extend(rows)
        self.last_row = rows[-1]
        self.pending, self.pending_steps = [], []

    def take_window(self) -> np.ndarray:
        self.fetch()
        mean = np.mean(np.stack(self.window), axis=0)
        self.window = []
        return mean

    @property
    def last_loss(self) -> Optional[float]:
        """The loss of the last fetched step, or None."""
        return float(self.last_row[0]) if self.last_row is not None else None


class StepLogger:
    """log.jsonl lines, the console line or tqdm bar, TensorBoard, and the throughput window of a run.

    Created where the throughput clock starts. step_done() after each optimizer step; log(step,
    mean, lr) writes one LOG_KEYS object (mean: the tracker's window mean [loss, loss_b0..]; lr:
    the schedule's lr of that step, without group scales), the same values to `board` (a
    backends.tensorboard.TensorBoardWriter or None), and restarts the window. figure(step, make)
    writes make(step) (an (H, W, 3) uint8 image) to the board, its time kept out of images_per_s.
    close() closes the bar and the board.
    """

    def __init__(self, log_path: str, total: int, start_step: int, steps_per_epoch: int, images_per_step: int,
                 main: bool, progress: Optional[bool], board=None):
        self.log_path, self.total, self.main, self.board = log_path, total, main, board
        self.steps_per_epoch, self.images_per_step = steps_per_epoch, images_per_step
        self.bar = None
        if main and show_progress(progress):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.t_window, self.steps_in_window = time.perf_counter(), 0

    def step_done(self) -> None:
        self.steps_in_window += 1
        if self.bar is not None:
            self.bar.update(1)

    def restart_clock_if_empty(self) -> None:
        """Restart the throughput clock when no step is pending (keeps checkpoint writing out of it)."""
        if self.steps_in_window == 0:
            self.t_window = time.perf_counter()

    def log(self, step: int, mean: np.ndarray, lr: float, extra: Optional[Mapping[str, float]] = None) -> Dict:
        """extra: more fields of the step object (`log_fields()`, e.g. MindSpore's skipped_steps)."""
        elapsed = time.perf_counter() - self.t_window
        record = {"step": step, "epoch": (step - 1) // self.steps_per_epoch, "loss": float(mean[0])}
        for k, v in enumerate(mean[1:]):
            record[f"loss_b{k}"] = float(v)
        record["lr"] = float(lr)
        record["images_per_s"] = self.images_per_step * self.steps_in_window / max(elapsed, 1e-9)
        record["step_time_s"] = elapsed / self.steps_in_window
        record.update(extra or {})
        if self.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.board is not None:
                self.board.scalars(step, record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     ips=f"{record['images_per_s']:.0f}")
            else:
                print(f"step {step}/{self.total} epoch {record['epoch']} loss {record['loss']:.4f} "
                      f"lr {record['lr']:.3e} {record['images_per_s']:.1f} img/s", flush=True)
        self.t_window, self.steps_in_window = time.perf_counter(), 0
        return record

    def log_eval(self, step: int, evaluate: Callable[[int], Mapping[str, float]]) -> Dict:
        """Run evaluate(step) (on every rank) and write its record {"step", "epoch", **metrics} to
        log.jsonl, the board and the console; the evaluation's time is kept out of images_per_s."""
        start = time.perf_counter()
        record = {"step": step, "epoch": (step - 1) // self.steps_per_epoch}
        record.update({k: float(v) for k, v in evaluate(step).items()})
        self.t_window += time.perf_counter() - start
        if self.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.board is not None:
                self.board.scalars(step, record)
            shown = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "epoch"))
            line = f"eval step {step}/{self.total} epoch {record['epoch']} {shown}"
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
        return record

    def figure(self, step: int, make: Callable[[int], np.ndarray]) -> None:
        if not (self.main and self.board is not None):
            return
        start = time.perf_counter()
        self.board.image("reconstruction", step, make(step))
        self.t_window += time.perf_counter() - start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()
            self.board = None
