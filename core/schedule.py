"""Learning-rate scaling and the warmup + half-cosine schedule (docs/method.md#lr-schedule, MAE `lr_sched`).

Units: learning rates are absolute; time is in (fractional) epochs.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["scaled_lr", "lr_at", "lr_for_step"]


def _check_non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"schedule {name} must be a finite non-negative number, got {value!r}")
    return float(value)


def scaled_lr(blr: float, eff_batch: int) -> float:
    """The absolute lr for a base lr: blr * eff_batch / 256 (eff_batch = batch * accum * world)."""
    blr = _check_non_negative("blr", blr)
    if isinstance(eff_batch, bool) or not isinstance(eff_batch, numbers.Integral) or eff_batch < 1:
        raise ValueError(f"effective batch size must be a positive integer, got {eff_batch!r}")
    return blr * int(eff_batch) / 256.0


def lr_at(t_epochs: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The lr at fractional epoch t.

    t < warmup: lr * t / warmup (linear from 0);
    otherwise: min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (t - warmup) / (epochs - warmup))).
    With warmup_epochs = 0 the cosine starts at lr at t = 0. Past `epochs` the lr stays at min_lr
    (the reference never gets there; runs limited by a step count may).
    """
    t = _check_non_negative("time t_epochs", t_epochs)
    lr = _check_non_negative("lr", lr)
    min_lr = _check_non_negative("min_lr", min_lr)
    warmup = _check_non_negative("warmup_epochs", warmup_epochs)
    epochs = _check_non_negative("epochs", epochs)
    if epochs <= warmup:
        raise ValueError(f"schedule epochs ({epochs}) must be greater than warmup_epochs ({warmup})")
    if t < warmup:
        return lr * t / warmup
    progress = min((t - warmup) / (epochs - warmup), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_for_step(opt_step: int, steps_per_epoch: int, lr: float, min_lr: float,
                warmup_epochs: float, epochs: float) -> float:
    """The lr for an optimizer step, with t = opt_step / steps_per_epoch.

    opt_step counts optimizer steps from 0 over the whole run; steps_per_epoch is the number of
    optimizer steps per epoch (loader length // accum_iter). This equals the reference's
    per-iteration schedule (t = epoch + it / len(loader), updated when it % accum_iter == 0)
    whenever the loader length is divisible by accum_iter.
    """
    if isinstance(opt_step, bool) or not isinstance(opt_step, numbers.Integral) or opt_step < 0:
        raise ValueError(f"optimizer step must be a non-negative integer, got {opt_step!r}")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, numbers.Integral) \
            or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    return lr_at(int(opt_step) / int(steps_per_epoch), lr, min_lr, warmup_epochs, epochs)
