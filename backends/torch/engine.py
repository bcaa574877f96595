"""LocalMIM pretraining loop for PyTorch: one process or torchrun + DistributedDataParallel.

run_pretrain(cfg) trains the model of `cfg.build_spec()` on `cfg.data.path` and writes into
`cfg.train.output_dir`:
- config.yaml   the resolved config;
- log.jsonl     one object per logged step: step, epoch, loss, loss_b0..loss_b3, lr, images_per_s,
                step_time_s (losses: mean over the optimizer steps since the previous line, each
                step's loss being the mean of its micro-batches and of all ranks);
- checkpoint-<step>.pth (see checkpoint.py), the newest `keep_checkpoints` kept.

Counting: `step` is the number of optimizer steps done; steps_per_epoch = micro-batches per epoch
// accum_iter (left-over micro-batches of an epoch are skipped, as in the reference); the lr of
optimizer step s is core.schedule.lr_for_step(s, steps_per_epoch, ...). A run stops after
`train.max_steps` steps in total when set, else after `optim.epochs` epochs. Rerunning with the
same output folder resumes from its newest checkpoint and reproduces the uninterrupted run: data
order, augmentation and masks are functions of (seed, epoch, index), not of saved RNG state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from localmim.backends.torch import checkpoint as ckpt
from localmim.backends.torch import data as data_mod
from localmim.backends.torch import distributed as dist_utils
from localmim.backends.torch.swin import build_swin
from localmim.backends.torch.vit import build_model
from localmim.core import param_groups, schedule

__all__ = [
    "NonFiniteLossError", "resolve_precision", "autocast_context", "make_grad_scaler", "build_optimizer",
    "set_lr", "config_to_dict", "write_config", "build_pretrain_model", "forward_batch", "run_pretrain",
]

# On CPU a per-step finiteness check costs nothing, so a bad loss is caught at once; on accelerators
# the losses stay on the device until the next log line or checkpoint (no host sync in the step).
CHECK_EVERY_STEP_ON_CPU = True

LOG_KEYS = ("step", "epoch", "loss", "loss_b0", "loss_b1", "loss_b2", "loss_b3", "lr", "images_per_s",
            "step_time_s")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


# ---------------------------------------------------------------------------------------- setup
def build_pretrain_model(spec) -> torch.nn.Module:
    """LocalMIMViT for a ViTSpec, LocalMIMSwin for a SwinSpec."""
    if getattr(spec, "family", "vit") == "swin":
        return build_swin(spec)
    return build_model(spec)


def forward_batch(net, batch: Dict, device: torch.device):
    """Move one loader batch to `device` and run the model on it -> (loss, branch_losses)."""
    imgs = batch["images"].to(device, non_blocking=True)
    if "plan" in batch:
        plan = {k: v.to(device, non_blocking=True) for k, v in batch["plan"].items()}
        return net(imgs, plan)
    return net(imgs, batch["ids_keep"].to(device, non_blocking=True),
               batch["ids_restore"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True))


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA (when supported), fp32 elsewhere; fp32 | bf16 | fp16 pass through."""
    precision = (precision or "auto").lower()
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision {precision!r} must be one of auto, fp32, bf16, fp16")
    return precision


def autocast_context(precision: str, device: torch.device):
    """Autocast for bf16/fp16; a null context for fp32. Targets and the loss stay fp32 (the model)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A GradScaler (init scale 2**16) for fp16, None otherwise (bf16 needs no loss scaling)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def build_optimizer(model: torch.nn.Module, cfg, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over core.param_groups.pretrain_param_groups (frozen = parameters without grad).

    Each torch param group keeps the core group's "name" and "lr_scale"; `set_lr` applies them.
    """
    named = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    frozen = [n for n, p in named.items() if not p.requires_grad]
    groups = param_groups.pretrain_param_groups(shapes, cfg.optim.weight_decay, getattr(model.spec, "family", "vit"),
                                                frozen=frozen)
    torch_groups = [{"params": [named[n] for n in g["params"]], "weight_decay": g["weight_decay"],
                     "lr_scale": float(g.get("lr_scale", 1.0)), "name": g["name"]} for g in groups]
    betas = tuple(float(b) for b in cfg.optim.betas)
    if len(betas) != 2:
        raise ValueError(f"optim.betas must hold two numbers, got {cfg.optim.betas}")
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(torch_groups, lr=0.0, betas=betas, eps=float(cfg.optim.eps), **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr * its lr_scale."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def config_to_dict(cfg) -> Dict:
    """The config as plain nested dicts/lists (what checkpoints and config.yaml hold)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_config(cfg, path: str) -> None:
    """config.yaml via core.config.save_config when present, else a YAML dump of the dataclass."""
    try:
        from localmim.core.config import save_config
    except ImportError:
        save_config = None
    if save_config is not None:
        save_config(cfg, path)
        return
    import yaml
    _atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _trim_log(path: str, last_step: int) -> None:
    """Drop log lines past `last_step` (written after the checkpoint a resumed run starts from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    if kept != lines:
        _atomic_write_text(path, "".join(kept))


def _last_logged_loss(path: str) -> Optional[float]:
    if not os.path.exists(path):
        return None
    loss = None
    with open(path) as f:
        for line in f:
            try:
                loss = float(json.loads(line)["loss"])
            except (ValueError, KeyError, TypeError):
                pass
    return loss


# Keys that may change between a run and its resumption without changing its numbers.
_RESUME_FREE_KEYS = {"data.num_workers", "train.output_dir", "train.max_steps", "train.log_every",
                     "train.save_every_steps", "train.save_every_epochs", "train.keep_checkpoints",
                     "train.progress", "train.compile", "train.device"}


def _changed_keys(saved: Dict, current: Dict) -> List[str]:
    """Dotted config keys whose values differ between a checkpoint's config and this run's."""
    changed = []
    for section, body in current.items():
        old = saved.get(section, {}) if isinstance(saved, dict) else {}
        for key, value in body.items():
            name = f"{section}.{key}"
            if name not in _RESUME_FREE_KEYS and old.get(key, value) != value:
                changed.append(f"{name} ({old.get(key)!r} -> {value!r})")
    return changed


def _show_progress(setting: Optional[bool]) -> bool:
    if setting is not None:
        return bool(setting)
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# ---------------------------------------------------------------------------------------- loop
class _LossTracker:
    """Per-step [loss, loss_b0..] rows kept on the device; fetched (one sync) only when asked.

    fetch() all-reduces the pending rows over ranks, so every rank takes the same decision about a
    non-finite loss, and raises NonFiniteLossError naming the first bad step.
    """

    def __init__(self, output_dir: str, steps_per_epoch: int):
        self.pending: List[torch.Tensor] = []
        self.pending_steps: List[int] = []
        self.window: List[np.ndarray] = []
        self.output_dir = output_dir
        self.steps_per_epoch = steps_per_epoch
        self.last_row: Optional[np.ndarray] = None

    def add(self, row: torch.Tensor, step: int) -> None:
        self.pending.append(row)
        self.pending_steps.append(step)

    def fetch(self) -> None:
        if not self.pending:
            return
        rows = dist_utils.all_reduce_mean(torch.stack(self.pending)).double().cpu().numpy()
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            step = self.pending_steps[int(np.argmax(bad))]
            last = ckpt.latest_checkpoint(self.output_dir)
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


def run_pretrain(cfg) -> Dict:
    """Pretrain (or resume) as `cfg` says. Returns {"step", "loss", "checkpoint", "output_dir"}.

    Raises NonFiniteLossError (after leaving every earlier file intact) when the loss stops being
    finite.
    """
    spec = cfg.build_spec()
    was_initialized = dist_utils.is_distributed()
    rank, world, local_rank, device = dist_utils.init_distributed(cfg.train.device)
    try:
        return _run(cfg, spec, rank, world, device)
    finally:
        if not was_initialized:
            dist_utils.cleanup()


def _run(cfg, spec, rank: int, world: int, device: torch.device) -> Dict:
    out = os.path.abspath(cfg.train.output_dir)
    main = rank == 0
    if main:
        os.makedirs(out, exist_ok=True)
    dist_utils.barrier()
    log_path = os.path.join(out, "log.jsonl")
    accum = int(cfg.optim.accum_iter)
    if accum < 1:
        raise ValueError(f"optim.accum_iter must be >= 1, got {accum}")
    precision = resolve_precision(cfg.train.precision, device)

    torch.manual_seed(int(cfg.train.seed))
    model = build_pretrain_model(spec).to(device)
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    scaler = make_grad_scaler(precision, device)

    loader, sampler = data_mod.build_pretrain_loader(cfg, spec, rank=rank, world=world,
                                                     pin_memory=device.type == "cuda")
    steps_per_epoch = sampler.batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(f"{sampler.batches_per_epoch} micro-batches per epoch on each rank are fewer than "
                         f"optim.accum_iter {accum}: no optimizer step fits in an epoch")
    total = int(cfg.train.max_steps) if cfg.train.max_steps is not None else int(cfg.optim.epochs) * steps_per_epoch
    base_lr = cfg.resolved_lr(world)

    step = 0
    last_ckpt = ckpt.latest_checkpoint(out)
    if last_ckpt is not None:
        payload = ckpt.load_checkpoint(last_ckpt)
        ckpt.check_model_state(last_ckpt, payload["model"], model.state_dict())
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        step = int(payload["step"])
        changed = _changed_keys(payload.get("config") or {}, config_to_dict(cfg))
        if changed and main:
            warnings.warn(f"resuming from {last_ckpt} with a different config: {', '.join(changed)}; the run "
                          f"will not reproduce an uninterrupted one", RuntimeWarning, stacklevel=2)
        del payload
    if main:
        write_config(cfg, os.path.join(out, "config.yaml"))
        _trim_log(log_path, step)
    dist_utils.barrier()

    if step >= total:
        return {"step": step, "loss": _last_logged_loss(log_path), "checkpoint": last_ckpt, "output_dir": out}

    net = model
    if world > 1:
        # ViT blocks after the last tap never run
        unused = spec.family == "vit" and spec.taps[-1] < spec.depth - 1
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused)
    fwd = torch.compile(net) if cfg.train.compile else net

    tracker = _LossTracker(out, steps_per_epoch)
    sync_every_step = device.type == "cpu" and CHECK_EVERY_STEP_ON_CPU
    log_every = max(1, int(cfg.train.log_every))
    save_every = int(cfg.train.save_every_steps) if cfg.train.save_every_steps else 0
    save_epochs = int(cfg.train.save_every_epochs) if cfg.train.save_every_epochs else 0
    images_per_step = cfg.data.batch_size * accum * world
    bar = None
    if main and _show_progress(cfg.train.progress):
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def save(at_step: int) -> str:
        tracker.fetch()  # raises before anything is written if a loss went non-finite
        path = os.path.join(out, ckpt.checkpoint_name(at_step))
        if main:
            ckpt.save_checkpoint(path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "step": at_step, "epoch": at_step // steps_per_epoch, "config": config_to_dict(cfg)})
            ckpt.prune_checkpoints(out, int(cfg.train.keep_checkpoints))
        dist_utils.barrier()
        return path

    model.train()
    optimizer.zero_grad(set_to_none=True)
    t_window, steps_in_window = time.perf_counter(), 0
    step_row = None
    saved_at = None
    while step < total:
        epoch = step // steps_per_epoch
        first_micro = (step % steps_per_epoch) * accum
        sampler.set_epoch(epoch, first_micro, steps_per_epoch * accum)
        for micro, batch in enumerate(loader, start=first_micro):
            last_micro = (micro + 1) % accum == 0
            if micro % accum == 0:
                set_lr(optimizer, schedule.lr_for_step(step, steps_per_epoch, base_lr, cfg.optim.min_lr,
                                                       cfg.optim.warmup_epochs, cfg.optim.epochs))
                step_row = None
            sync_ctx = net.no_sync() if (world > 1 and not last_micro) else contextlib.nullcontext()
            with sync_ctx:
                with autocast_context(precision, device):
                    loss, branch_losses = forward_batch(fwd, batch, device)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            row = torch.cat([loss.detach().float().reshape(1), branch_losses.detach().float().reshape(-1)]) / accum
            step_row = row if step_row is None else step_row + row
            if not last_micro:
                continue

            if cfg.optim.clip_grad:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.optim.clip_grad))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_in_window += 1
            tracker.add(step_row, step)
            if sync_every_step:
                tracker.fetch()
            if bar is not None:
                bar.update(1)

            if step % log_every == 0 or step == total:
                mean = tracker.take_window()
                elapsed = time.perf_counter() - t_window
                record = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": float(mean[0])}
                for k, v in enumerate(mean[1:]):
                    record[f"loss_b{k}"] = float(v)
                record["lr"] = float(optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0))
                record["images_per_s"] = images_per_step * steps_in_window / max(elapsed, 1e-9)
                record["step_time_s"] = elapsed / steps_in_window
                if main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                        ips=f"{record['images_per_s']:.0f}")
                    else:
                        print(f"step {step}/{total} epoch {record['epoch']} loss {record['loss']:.4f} "
                              f"lr {record['lr']:.3e} {record['images_per_s']:.1f} img/s", flush=True)
                t_window, steps_in_window = time.perf_counter(), 0

            epoch_done = step % steps_per_epoch == 0
            if step == total or (save_every and step % save_every == 0) or \
                    (epoch_done and save_epochs and (step // steps_per_epoch) % save_epochs == 0):
                last_ckpt = save(step)
                saved_at = step
                if steps_in_window == 0:
                    t_window = time.perf_counter()  # keep checkpoint writing out of images_per_s
            if step >= total:
                break
    if saved_at != step:
        last_ckpt = save(step)
    tracker.fetch()
    if bar is not None:
        bar.close()
    loss = float(tracker.last_row[0]) if tracker.last_row is not None else None
    return {"step": step, "loss": loss, "checkpoint": last_ckpt, "output_dir": out}
