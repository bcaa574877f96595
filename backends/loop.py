"""The training loop of both backends: epochs, accumulation, the lr of every optimizer step,
logging, checkpoints, exact resume, the non-finite check and the progress bar.

`train(cfg, stepper, loader, sampler, ckpt, ...)` drives a backend's step object; everything that
touches a framework is in that object, so the two backends cannot drift apart here. A step object
(the `TrainStep` of `backends/torch/engine.py` and `backends/mindspore/engine.py`) has:

- `set_lr(lr)`            the lr of the next optimizer step (each param group gets lr x its lr_scale);
- `micro(batch, sync)`    forward + backward of one loader batch, gradient and loss row added to the
                          step's running sums; `sync` is True on the last micro-batch of a step (DDP
                          reduces gradients then). Must not wait for the device;
- `apply()`               the optimizer update from the summed gradients (reduce over ranks, unscale,
                          clip, step, zero) -> the step's loss row [loss, loss_b0, ...] (mean of its
                          micro-batches), still on the device;
- `gather(rows)`          a list of loss rows -> (n, 1 + branches) numpy array, mean over ranks: the
                          one host sync, made only for a log line, a checkpoint or the CPU check;
- `states()`              (model state, optimizer state, scaler state or None) for a checkpoint;
- `load_states(payload, path)` the inverse, from a checkpoint payload;
- `model_shapes()`        {name: shape-like} of the model, to check a checkpoint's model state.

Counting and files are those of `backends/runs.py`: `step` is the number of optimizer steps done;
optimizer step s uses core.schedule.lr_for_step(s, steps_per_epoch, ...); micro-batch b of an epoch
is the sampler's batch b, so a resumed run starts at batch (step % steps_per_epoch) * accum of its
epoch and reproduces the uninterrupted run. This module imports numpy and localmim only.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from typing import Callable, Dict, Optional

import numpy as np

from localmim.backends import runs
from localmim.core import schedule

__all__ = ["CHECK_EVERY_STEP_ON_CPU", "STOP_SIGNALS", "StopSignals", "ignore_stop_signals", "seed_host", "train"]

# On CPU a per-step finiteness check costs nothing, so a bad loss is caught at once; on accelerators
# the losses stay on the device until the next log line or checkpoint (no host sync in the step).
CHECK_EVERY_STEP_ON_CPU = True


def seed_host(seed: int) -> None:
    """Seed the host-side global generators (Python's and numpy's) both backends may touch."""
    random.seed(int(seed))
    np.random.seed(int(seed))


# What SLURM (scancel, --signal=USR1@<s>) and Kubernetes (pod deletion) send before they kill a job.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopSignals:
    """SIGTERM / SIGUSR1 handlers for the length of a run: a signal only records its name in
    `requested` (the first one wins); the loop then stops after the current optimizer step,
    writes a checkpoint and raises runs.Preempted. restore() puts the previous handlers back.

    Python allows handlers in the main thread only; elsewhere nothing is installed and the signals
    keep their previous effect. A second signal changes nothing: SIGKILL ends a stuck run.
    """

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)  # Windows has no SIGUSR1
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """worker_init_fn of data-loader processes: SLURM signals every process of a job step, and a
    loader worker that died of it would end the run before the main process writes its checkpoint."""
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _lr_of(cfg, base_lr: float, steps_per_epoch: int) -> Callable[[int], float]:
    """Optimizer step index -> its lr (warmup + cosine, counted in optimizer steps)."""
    o = cfg.optim
    return lambda s: schedule.lr_for_step(s, steps_per_epoch, base_lr, o.min_lr, o.warmup_epochs, o.epochs)


def train(cfg, stepper, loader, sampler, ckpt, *, rank: int = 0, world: int = 1, on_cpu: bool = True,
          barrier: Callable[[], None] = lambda: None,
          any_rank: Optional[Callable[[bool], bool]] = None,
          figure: Optional[Callable[[int], np.ndarray]] = None,
          evaluate: Optional[Callable[[int], Dict[str, float]]] = None, eval_every_epochs: int = 1) -> Dict:
    """Train (or resume) as `cfg` says with `stepper` on the batches of `loader`.

    loader / sampler: an iterable of batches of the sampler's current window and the
    ShardedBatchSampler behind it (`set_epoch(epoch, start_batch, num_batches)`,
    `batches_per_epoch`). ckpt: the backend's checkpoint module. barrier: the backend's collective
    barrier (a no-op in one process). The output folder must exist. figure: rank 0's hook for
    TensorBoard, step -> (H, W, 3) uint8 reconstruction figure of the current model (None: no
    images); with train.tensorboard it is drawn as runs.figure_due says. evaluate: step -> metrics
    (the same dict on every rank; the hook does its own reduction over ranks), called on every rank
    at the end of every `eval_every_epochs`-th epoch and after the last step, before that step's
    checkpoint, and logged as its own log.jsonl record (the fine-tuning accuracies).

    Returns {"step", "loss" (the last step's loss, or the last logged one when nothing was left to
    do), "checkpoint" (the newest checkpoint path), "output_dir"}. Raises NonFiniteLossError
    naming the first bad step, before any later checkpoint is written.

    Faults (runs.py, section faults): train.resume picks the checkpoint to start from
    (runs.resume_checkpoint). On SIGTERM / SIGUSR1 (StopSignals) the run finishes the current
    optimizer step, logs it, writes a checkpoint and raises runs.Preempted. any_rank(flag) -> True
    on every rank when flag is True on any rank (the backend's collective; None: one process): the
    ranks agree on the step to stop at after every step on CPU and in one process, and at log lines
    and checkpoints on accelerators (the steps that sync the host anyway), and learn of a checkpoint
    rank 0 could not write (runs.checkpoint_not_written, train.on_save_error).
    """
    out = os.path.abspath(cfg.train.output_dir)
    main = rank == 0
    accum = runs.accum_steps(cfg)
    steps_per_epoch, total = runs.plan_steps(cfg, sampler.batches_per_epoch, accum)
    lr_of = _lr_of(cfg, cfg.resolved_lr(world), steps_per_epoch)

    if any_rank is None:
        if world > 1:
            raise ValueError("loop.train needs the backend's any_rank collective when world > 1")
        any_rank = bool
    step = 0
    last_ckpt, payload = runs.resume_checkpoint(ckpt, out, cfg.train.resume, stepper.model_shapes, main)
    if payload is not None:
        stepper.load_states(payload, last_ckpt)
        step = int(payload["step"])
        runs.warn_config_change(last_ckpt, payload.get("config"), cfg, main)
        del payload
    log_path = runs.start_output(cfg, out, step, main)
    barrier()
    if step >= total:
        return {"step": step, "loss": runs.last_logged_loss(log_path), "checkpoint": last_ckpt, "output_dir": out}

    tracker = runs.LossTracker(out, steps_per_epoch, stepper.gather, ckpt.latest_checkpoint)
    check_every_step = on_cpu and CHECK_EVERY_STEP_ON_CPU
    log_every, save_every, save_epochs = runs.loop_intervals(cfg)

    def save(at_step: int, final: bool = False) -> Optional[str]:
        """Write checkpoint-<at_step> (rank 0); its path, or None when it failed under train.on_save_error=warn."""
        tracker.fetch()  # raises before anything is written if a loss went non-finite
        error = None
        try:
            path = runs.save_run_checkpoint(ckpt, out, at_step, steps_per_epoch, cfg, stepper.states, main)
        except runs.CheckpointWriteError as e:
            path, error = os.path.join(out, ckpt.checkpoint_name(at_step)), e
        if any_rank(error is not None):  # every rank learns of rank 0's failure; also the barrier
            runs.checkpoint_not_written(error, path, cfg.train.on_save_error, final, last_ckpt, at_step, main)
            return None
        return path

    logger = runs.StepLogger(log_path, total, step, steps_per_epoch, cfg.data.batch_size * accum * world, main,
                             cfg.train.progress, board=runs.open_tensorboard(cfg, out, step, main))
    figure_every = int(cfg.train.tensorboard_images_every_epochs)
    saved_at: Optional[int] = None
    lr = lr_of(step)
    agree_every_step = on_cpu or world == 1  # a stop needs no host sync there; elsewhere at log lines / saves
    stop = StopSignals()
    log_fields = getattr(stepper, "log_fields", dict)  # extra log.jsonl fields of the step object
    try:
        while step < total:
            epoch = step // steps_per_epoch
            first_micro = (step % steps_per_epoch) * accum
            sampler.set_epoch(epoch, first_micro, steps_per_epoch * accum)
            for micro, batch in enumerate(loader, start=first_micro):
                if micro % accum == 0:
                    lr = lr_of(step)
                    stepper.set_lr(lr)
                last_micro = (micro + 1) % accum == 0
                stepper.micro(batch, sync=last_micro)
                if not last_micro:
                    continue

                step += 1
                tracker.add(stepper.apply(), step)
                if check_every_step:
                    tracker.fetch()
                logger.step_done()
                logged = step % log_every == 0 or step == total
                if logged:
                    logger.log(step, tracker.take_window(), lr, log_fields())
                if evaluate is not None and runs.epoch_end_due(step, total, steps_per_epoch, eval_every_epochs):
                    tracker.fetch()  # a non-finite loss stops the run before an evaluation of it
                    logger.log_eval(step, evaluate)
                save_now = runs.save_due(step, total, steps_per_epoch, save_every, save_epochs)
                stopping = step < total and (agree_every_step or logged or save_now) and \
                    any_rank(stop.requested is not None)
                if stopping and not logged:  # log.jsonl then covers every step the checkpoint holds
                    logger.log(step, tracker.take_window(), lr, log_fields())
                if save_now or stopping:
                    last_ckpt = save(step, final=stopping or step >= total) or last_ckpt
                    saved_at = step
                    logger.restart_clock_if_empty()  # keep checkpoint writing out of images_per_s
                if stopping:
                    raise runs.Preempted(stop.requested or "a stop signal on another rank", step, total, last_ckpt)
                if figure is not None and runs.figure_due(step, total, steps_per_epoch, figure_every):
                    logger.figure(step, figure)
                if step >= total:
                    break
        if saved_at != step:
            last_ckpt = save(step, final=True) or last_ckpt
        tracker.fetch()
    finally:
        stop.restore()
        logger.close()
    return {"step": step, "loss": tracker.last_loss, "checkpoint": last_ckpt, "output_dir": out}
