"""LocalMIM pretraining loop for PyTorch: one process or torchrun + DistributedDataParallel.

run_pretrain(cfg) trains the model of `cfg.build_spec()` on `cfg.data.path` and writes
config.yaml, log.jsonl and checkpoint-<step>.pth into `cfg.train.output_dir`; backends/runs.py
describes those files, the step counting and resumption (the framework-free half of the loop).
The lr of each step is set on the torch param groups (lr x the group's lr_scale) before it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from localmim.backends import runs
from localmim.backends.runs import LOG_KEYS, NonFiniteLossError, config_to_dict, write_config  # noqa: F401
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


# ---------------------------------------------------------------------------------------- loop
def _gather_losses(rows: List[torch.Tensor]) -> np.ndarray:
    """Per-step loss rows kept on the device -> their mean over ranks as float64 numpy (one sync)."""
    return dist_utils.all_reduce_mean(torch.stack(rows)).double().cpu().numpy()


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
    accum = runs.accum_steps(cfg)
    precision = resolve_precision(cfg.train.precision, device)

    torch.manual_seed(int(cfg.train.seed))
    model = build_pretrain_model(spec).to(device)
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    scaler = make_grad_scaler(precision, device)

    loader, sampler = data_mod.build_pretrain_loader(cfg, spec, rank=rank, world=world,
                                                     pin_memory=device.type == "cuda")
    steps_per_epoch, total = runs.plan_steps(cfg, sampler.batches_per_epoch, accum)
    base_lr = cfg.resolved_lr(world)

    step = 0
    last_ckpt, payload = runs.load_latest(ckpt, out, model.state_dict)
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        step = int(payload["step"])
        runs.warn_config_change(last_ckpt, payload.get("config"), cfg, main)
        del payload
    log_path = runs.start_output(cfg, out, step, main)
    dist_utils.barrier()

    if step >= total:
        return {"step": step, "loss": runs.last_logged_loss(log_path), "checkpoint": last_ckpt, "output_dir": out}

    net = model
    if world > 1:
        # ViT blocks after the last tap never run
        unused = spec.family == "vit" and spec.taps[-1] < spec.depth - 1
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused)
    fwd = torch.compile(net) if cfg.train.compile else net

    tracker = runs.LossTracker(out, steps_per_epoch, _gather_losses, ckpt.latest_checkpoint)
    sync_every_step = device.type == "cpu" and CHECK_EVERY_STEP_ON_CPU
    log_every, save_every, save_epochs = runs.loop_intervals(cfg)

    def states():
        return model.state_dict(), optimizer.state_dict(), scaler.state_dict() if scaler is not None else None

    def save(at_step: int) -> str:
        tracker.fetch()  # raises before anything is written if a loss went non-finite
        path = runs.save_run_checkpoint(ckpt, out, at_step, steps_per_epoch, cfg, states, main)
        dist_utils.barrier()
        return path

    model.train()
    optimizer.zero_grad(set_to_none=True)
    logger = runs.StepLogger(log_path, total, step, steps_per_epoch, cfg.data.batch_size * accum * world, main,
                             cfg.train.progress)
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
            tracker.add(step_row, step)
            if sync_every_step:
                tracker.fetch()
            logger.step_done()

            if step % log_every == 0 or step == total:
                group = optimizer.param_groups[0]
                logger.log(step, tracker.take_window(), group["lr"] / group.get("lr_scale", 1.0))

            if runs.save_due(step, total, steps_per_epoch, save_every, save_epochs):
                last_ckpt = save(step)
                saved_at = step
                logger.restart_clock_if_empty()  # keep checkpoint writing out of images_per_s
            if step >= total:
                break
    if saved_at != step:
        last_ckpt = save(step)
    tracker.fetch()
    logger.close()
    return {"step": step, "loss": tracker.last_loss, "checkpoint": last_ckpt, "output_dir": out}
