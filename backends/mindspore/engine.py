"""LocalMIM pretraining loop for MindSpore: one process, or msrun + data parallel.

run_pretrain(cfg) trains the model of `cfg.build_spec()` on `cfg.data.path` and writes into
`cfg.train.output_dir` exactly what the torch engine writes:
- config.yaml   the resolved config;
- log.jsonl     one object per logged step: step, epoch, loss, loss_b0..loss_b3, lr, images_per_s,
                step_time_s (losses: mean over the optimizer steps since the previous line, each
                step's loss being the mean of its micro-batches and of all ranks);
- checkpoint-<step>.ckpt (see checkpoint.py), the newest `keep_checkpoints` kept.

Counting: `step` is the number of optimizer steps done; steps_per_epoch = micro-batches per epoch
// accum_iter (left-over micro-batches of an epoch are skipped, as in the reference); the lr of
optimizer step s is core.schedule.lr_for_step(s, steps_per_epoch, ...), written into the
optimizer's per-group lr Parameters (lr x the group's lr_scale) before the step. A run stops after
`train.max_steps` steps in total when set, else after `optim.epochs` epochs. Rerunning with the
same output folder resumes from its newest checkpoint and reproduces the uninterrupted run.

The step: `mindspore.value_and_grad` of loss / accum_iter over the trainable parameters (summed
over the micro-batches of a step), `nn.DistributedGradReducer` (mean) once per step under msrun,
optional loss scaling (fp16, `mindspore.amp.DynamicLossScaler`, steps with non-finite gradients
are skipped as GradScaler does), optional global-norm clipping, then
`mindspore.experimental.optim.AdamW`. Unless `train.compile` is false, the gradient and update
functions are compiled with `mindspore.jit` (graph mode); `train.compile=false` runs them in
PyNative mode, for debugging.

Swin models (spec.family "swin") train the same way on batches that carry a grouping plan
("plan", see data.py) instead of ViT masks. In PyNative mode the plans keep their natural shapes;
with `train.compile` the loader pads every plan to the fixed shapes of
`data.static_plan_bounds(spec, mask.ratio)`, so one compiled graph serves every batch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

import mindspore as ms
from mindspore import amp, nn, ops
from mindspore.experimental.optim import AdamW

from localmim.backends.mindspore import checkpoint as ckpt
from localmim.backends.mindspore import data as data_mod
from localmim.backends.mindspore import distributed as dist_utils
from localmim.backends.mindspore.swin import build_swin, plan_tensors
from localmim.backends.mindspore.vit import build_model
from localmim.core import param_groups, schedule

__all__ = [
    "NonFiniteLossError", "LOG_KEYS", "LocalAdamW", "resolve_precision", "apply_mixed_precision", "make_loss_scaler",
    "build_optimizer", "set_lr", "optimizer_state", "load_optimizer_state", "scaler_state", "load_scaler_state",
    "TrainStep", "build_pretrain_model", "batch_inputs", "config_to_dict", "write_config", "run_pretrain",
]

LOG_KEYS = ("step", "epoch", "loss", "loss_b0", "loss_b1", "loss_b2", "loss_b3", "lr", "images_per_s",
            "step_time_s")
_LOSS_SCALE_INIT = 2.0 ** 16  # torch GradScaler's default, so both backends start alike


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


# ---------------------------------------------------------------------------------------- setup
def build_pretrain_model(spec) -> nn.Cell:
    """LocalMIMViT for a ViTSpec, LocalMIMSwin for a SwinSpec."""
    if getattr(spec, "family", "vit") == "swin":
        return build_swin(spec)
    return build_model(spec)


def resolve_precision(precision: str, device_target: str, use_jit: bool = False) -> str:
    """auto -> bf16 on Ascend in PyNative mode, else fp32; fp32 | bf16 | fp16 pass through where
    supported (see apply_mixed_precision for why low precision is PyNative only).

    bf16 on CPU is an error: MindSpore's CPU MatMul has no bf16 kernel.
    """
    precision = (precision or "auto").lower()
    if precision == "auto":
        return "bf16" if device_target == "Ascend" and not use_jit else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision {precision!r} must be one of auto, fp32, bf16, fp16")
    if precision == "bf16" and device_target == "CPU":
        raise ValueError("train.precision 'bf16' is not supported by MindSpore on CPU (no bf16 MatMul kernel); "
                         "use fp32 (or fp16) on CPU, bf16 on Ascend")
    return precision


def apply_mixed_precision(model: nn.Cell, precision: str, use_jit: bool = False) -> None:
    """Run the encoder and decoders in bf16 / fp16 (`Cell.to_float` on patch_embed, blocks, the
    branch norms and the decoders); the HOG / pixel targets and the loss stay float32 (reference
    A1/A2). No-op for fp32.

    Not `amp.auto_mixed_precision(..., "O1")`: in MindSpore 2.10 it rewrites the network's source
    into ./rewritten_network and the rewritten CellList fails (NameError '_valid_index').
    `to_float` runs in PyNative only: under ms.jit the fp16-input / fp32-weight MatMul is refused
    ("input type must be same"), so low precision with train.compile is a clear error.
    """
    if precision == "fp32":
        return
    if use_jit:
        raise ValueError(f"train.precision {precision!r} in graph mode (train.compile not false) is not supported "
                         f"by the MindSpore backend (ms.jit refuses the mixed-dtype MatMul of Cell.to_float); set "
                         f"train.compile=false or train.precision=fp32")
    dtype = ms.bfloat16 if precision == "bf16" else ms.float16
    # Swin: `encoder` holds patch_embed, stages and branch norms; targets live outside it
    names = ("encoder", "decoder") if getattr(model.spec, "family", "vit") == "swin" else \
        ("patch_embed", "blocks", "norm", "decoder")
    for name in names:
        getattr(model, name).to_float(dtype)


def make_loss_scaler(precision: str):
    """A DynamicLossScaler (init 2**16, factor 2, window 2000, as torch's GradScaler) for fp16."""
    if precision != "fp16":
        return None
    return amp.DynamicLossScaler(scale_value=_LOSS_SCALE_INIT, scale_factor=2, scale_window=2000)


class LocalAdamW(AdamW):
    """mindspore.experimental.optim.AdamW (torch semantics) whose per-group gradient slices are
    passed to its compiled update as `mutable` tuples.

    The parent passes plain tuples, which MindSpore 2.10 takes as constants: it prints every
    gradient tensor in a "Constant value tensor are detected" warning and may recompile. Same
    numbers otherwise (no maximize / amsgrad, which pretraining never uses).
    """

    def construct(self, gradients):
        self.assignadd(self.state_step, self.increase_tensor)
        for group_id, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            start_id = self.group_start_id[group_id]
            end_id = self.group_start_id[group_id + 1]
            grads = ms.mutable(tuple(gradients[start_id:end_id]))
            self.implementation(self.lrs[group_id], group.get("weight_decay"), beta1, beta2, group.get("amsgrad"),
                                group.get("eps"), grads, start_id, end_id)
        return True


def build_optimizer(model: nn.Cell, cfg) -> AdamW:
    """AdamW over core.param_groups.pretrain_param_groups (frozen = parameters without grad).

    Each MindSpore group keeps the core group's "name" and "lr_scale"; `set_lr` applies them.
    """
    named = {p.name: p for p in model.get_parameters()}
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    frozen = [n for n, p in named.items() if not p.requires_grad]
    groups = param_groups.pretrain_param_groups(shapes, float(cfg.optim.weight_decay),
                                                getattr(model.spec, "family", "vit"), frozen=frozen)
    betas = tuple(float(b) for b in cfg.optim.betas)
    if len(betas) != 2:
        raise ValueError(f"optim.betas must hold two numbers, got {cfg.optim.betas}")
    ms_groups = [{"params": [named[n] for n in g["params"]], "weight_decay": float(g["weight_decay"]),
                  "lr": 0.0, "lr_scale": float(g.get("lr_scale", 1.0)), "name": g["name"]} for g in groups]
    return LocalAdamW(ms_groups, lr=0.0, betas=betas, eps=float(cfg.optim.eps))


def set_lr(optimizer: AdamW, lr: float) -> None:
    """Set every group's lr Parameter to lr * its lr_scale.

    ops.assign, not Parameter.set_data: AdamW's compiled update keeps reading the old buffer after
    set_data (measured on MindSpore 2.10: the lr stays at its value of the first step).
    """
    for group, lr_param in zip(optimizer.param_groups, optimizer.lrs):
        ops.assign(lr_param, ms.Tensor(lr * group.get("lr_scale", 1.0), ms.float32))


def optimizer_state(optimizer: AdamW) -> Dict[str, np.ndarray]:
    """{"exp_avg.<param>", "exp_avg_sq.<param>", "state_step"} as numpy arrays (canonical names)."""
    state = {p.name: p.asnumpy().copy() for p in optimizer.exp_avg}
    state.update({p.name: p.asnumpy().copy() for p in optimizer.exp_avg_sq})
    state["state_step"] = np.asarray(optimizer.state_step.asnumpy()).reshape(()).copy()
    return state


def load_optimizer_state(optimizer: AdamW, state: Dict[str, np.ndarray], path: str = "checkpoint") -> None:
    """Inverse of optimizer_state; raises CheckpointError naming missing or mis-shaped keys."""
    moments = list(optimizer.exp_avg) + list(optimizer.exp_avg_sq)
    expected = {p.name: tuple(p.shape) for p in moments}
    missing = sorted(k for k in list(expected) + ["state_step"] if k not in state)
    bad = sorted(f"{k}: {tuple(np.shape(state[k]))} vs {expected[k]}" for k in expected
                 if k in state and tuple(np.shape(state[k])) != expected[k])
    if missing or bad:
        raise ckpt.CheckpointError(f"checkpoint {path} optimizer state does not fit this model: "
                                   f"missing keys {missing[:8]}; mis-shaped keys {bad[:8]}")
    for p in moments:  # ops.assign: see set_lr
        ops.assign(p, ms.Tensor(np.asarray(state[p.name], dtype=np.float32).copy()))
    step = np.asarray(state["state_step"]).reshape(())
    ops.assign(optimizer.state_step, ms.Tensor(step.astype(np.int32)))


def scaler_state(scaler) -> Optional[Dict[str, np.ndarray]]:
    if scaler is None:
        return None
    return {"scale_value": scaler.scale_value.asnumpy().reshape(()).copy(),
            "counter": scaler.counter.asnumpy().reshape(()).copy(),
            "scale_factor": np.array(scaler.scale_factor, np.int64),
            "scale_window": np.array(scaler.scale_window, np.int64)}


def load_scaler_state(scaler, state: Optional[Dict[str, np.ndarray]]) -> None:
    if scaler is None or not state:
        return
    ops.assign(scaler.scale_value, ms.Tensor(np.asarray(state["scale_value"], np.float32).reshape(())))
    ops.assign(scaler.counter, ms.Tensor(np.asarray(state["counter"], np.int32).reshape(())))


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


def _show_progress(setting: Optional[bool]) -> bool:
    if setting is not None:
        return bool(setting)
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


# ---------------------------------------------------------------------------------------- step
_hyper_map = ops.HyperMap()


class TrainStep:
    """Gradient of one micro-batch, accumulation, and the optimizer update.

    micro(*batch_inputs(batch)) -> (loss, branch_losses, grads): ViT
    micro(imgs, ids_keep, ids_restore, mask), Swin micro(imgs, plan) with plan a dict of Tensors;
    grads are of loss * loss_scale / accum_iter w.r.t. optimizer.parameters, in that order.
    accumulate(acc, grads) -> elementwise sum. update(grads) -> True when the step was applied
    (False: fp16 gradients overflowed and the step was skipped, the scale lowered).
    """

    def __init__(self, model: nn.Cell, optimizer: AdamW, accum: int, scaler=None, reducer=None,
                 clip_grad: Optional[float] = None, use_jit: bool = False):
        self.model, self.optimizer, self.scaler, self.reducer = model, optimizer, scaler, reducer
        self.inv_accum = 1.0 / float(accum)
        self.clip = float(clip_grad) if clip_grad else None
        swin = getattr(model.spec, "family", "vit") == "swin"
        forward = self._forward_plan if swin else self._forward
        self.grad_fn = ms.value_and_grad(forward, None, optimizer.parameters, has_aux=True)
        wrap = ms.jit if use_jit else (lambda f: f)
        if swin:
            self._micro_plan_fn = wrap(self._micro_plan)
            self.micro = self._call_plan
        else:
            self.micro = wrap(self._micro)
        self.accumulate = wrap(self._accumulate)
        self._finish = wrap(self._finish_grads)
        self._apply = wrap(self._apply_grads)

    def _forward(self, imgs, ids_keep, ids_restore, mask):
        loss, branch_losses = self.model(imgs, ids_keep, ids_restore, mask)
        scaled = loss * self.inv_accum
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        return scaled, loss, branch_losses

    def _micro(self, imgs, ids_keep, ids_restore, mask):
        (_, loss, branch_losses), grads = self.grad_fn(imgs, ids_keep, ids_restore, mask)
        return loss, branch_losses, grads

    def _forward_plan(self, imgs, plan):
        loss, branch_losses = self.model(imgs, plan)
        scaled = loss * self.inv_accum
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        return scaled, loss, branch_losses

    def _call_plan(self, imgs, plan):
        # mutable: a dict of Tensors passed to a jit function is otherwise taken as constants and
        # recompiled on every new plan (measured on MindSpore 2.10: ~13 s a step instead of 0.25 s
        # for swin_tiny_test on CPU); in PyNative it changes nothing.
        return self._micro_plan_fn(imgs, ms.mutable(dict(plan)))

    def _micro_plan(self, imgs, plan):
        (_, loss, branch_losses), grads = self.grad_fn(imgs, plan)
        return loss, branch_losses, grads

    @staticmethod
    def _accumulate(acc, grads):
        return _hyper_map(ops.add, acc, grads)

    def _finish_grads(self, grads):
        if self.reducer is not None:
            grads = self.reducer(grads)
        finite = ops.ones((), ms.bool_)
        if self.scaler is not None:
            grads = self.scaler.unscale(grads)
            finite = amp.all_finite(grads)
            self.scaler.adjust(finite)
        if self.clip is not None:
            grads = ops.clip_by_global_norm(grads, self.clip)
        return grads, finite

    def _apply_grads(self, grads):
        self.optimizer(grads)
        return True

    def add(self, acc, grads):
        """acc + grads (acc None: grads)."""
        if acc is None:
            return grads
        return self.accumulate(ms.mutable(tuple(acc)), ms.mutable(tuple(grads)))

    def update(self, grads) -> bool:
        # mutable: a tuple of Tensors passed to a jit function (ours, or AdamW's own @jit
        # implementation) is otherwise taken as constants and recompiled on every call.
        grads, finite = self._finish(ms.mutable(tuple(grads)))
        if self.scaler is not None and not bool(finite.asnumpy()):
            return False
        self._apply(ms.mutable(tuple(grads)))
        return True


# ---------------------------------------------------------------------------------------- loop
class _LossTracker:
    """Per-step [loss, loss_b0..] rows; fetched (averaged over ranks) when asked.

    fetch() raises NonFiniteLossError naming the first bad step, on every rank alike.
    """

    def __init__(self, output_dir: str, steps_per_epoch: int):
        self.pending: List[np.ndarray] = []
        self.pending_steps: List[int] = []
        self.window: List[np.ndarray] = []
        self.output_dir = output_dir
        self.steps_per_epoch = steps_per_epoch
        self.last_row: Optional[np.ndarray] = None

    def add(self, row, step: int) -> None:
        self.pending.append(row)
        self.pending_steps.append(step)

    def fetch(self) -> None:
        if not self.pending:
            return
        rows = np.stack([np.asarray(r.asnumpy() if hasattr(r, "asnumpy") else r, np.float32) for r in self.pending])
        rows = dist_utils.all_reduce_mean(rows)
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


def batch_inputs(batch) -> tuple:
    """A loader batch as the model's Tensor inputs: ViT (imgs, ids_keep, ids_restore, mask),
    Swin (imgs, plan) with the plan's arrays as Tensors (int64 indices)."""
    imgs = ms.Tensor(batch["images"], ms.float32)
    if "plan" in batch:
        return imgs, plan_tensors(batch["plan"])
    return (imgs, ms.Tensor(batch["ids_keep"], ms.int64), ms.Tensor(batch["ids_restore"], ms.int64),
            ms.Tensor(batch["mask"], ms.float32))


_to_tensors = batch_inputs  # the earlier private name, still used by tests


def run_pretrain(cfg) -> Dict:
    """Pretrain (or resume) as `cfg` says. Returns {"step", "loss", "checkpoint", "output_dir"}.

    Raises NonFiniteLossError (after leaving every earlier file intact) when the loss stops being
    finite. Under msrun every worker calls this; rank 0 writes the files.
    """
    spec = cfg.build_spec()
    rank, world, target = dist_utils.init_distributed(cfg.train.device)
    # MindSpore cannot re-initialise communication in the same process, so the group is kept
    # for the life of the worker (cleanup() is left to the caller).
    return _run(cfg, spec, rank, world, target)


def _run(cfg, spec, rank: int, world: int, target: str) -> Dict:
    out = os.path.abspath(cfg.train.output_dir)
    main = rank == 0
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "log.jsonl")
    accum = int(cfg.optim.accum_iter)
    if accum < 1:
        raise ValueError(f"optim.accum_iter must be >= 1, got {accum}")
    use_jit = cfg.train.compile is not False  # None (the default) means graph mode, MindSpore's fast path
    precision = resolve_precision(cfg.train.precision, target, use_jit=use_jit)

    # Same seed on every rank: identical initial weights without a broadcast.
    ms.set_seed(int(cfg.train.seed))
    np.random.seed(int(cfg.train.seed))
    model = build_pretrain_model(spec)
    optimizer = build_optimizer(model, cfg)
    scaler = make_loss_scaler(precision)

    loader, sampler = data_mod.build_pretrain_loader(cfg, spec, rank=rank, world=world,
                                                     static_plans=use_jit)
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
        ckpt.check_model_state(last_ckpt, payload["model"], model.state_shapes())
        model.import_state(payload["model"])
        load_optimizer_state(optimizer, payload["optimizer"], last_ckpt)
        load_scaler_state(scaler, payload.get("scaler"))
        step = int(payload["step"])
        del payload
    if main:
        write_config(cfg, os.path.join(out, "config.yaml"))
        _trim_log(log_path, step)
    dist_utils.barrier()

    if step >= total:
        loader.close()
        return {"step": step, "loss": _last_logged_loss(log_path), "checkpoint": last_ckpt, "output_dir": out}

    apply_mixed_precision(model, precision, use_jit=use_jit)
    model.set_train(True)
    reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=world) if world > 1 else None
    stepper = TrainStep(model, optimizer, accum, scaler=scaler, reducer=reducer, clip_grad=cfg.optim.clip_grad,
                        use_jit=use_jit)

    tracker = _LossTracker(out, steps_per_epoch)
    sync_every_step = target == "CPU"  # the check costs no device sync there
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
                "model": model.export_state(), "optimizer": optimizer_state(optimizer),
                "scaler": scaler_state(scaler), "step": at_step, "epoch": at_step // steps_per_epoch,
                "config": config_to_dict(cfg)})
            ckpt.prune_checkpoints(out, int(cfg.train.keep_checkpoints))
        dist_utils.barrier()
        return path

    t_window, steps_in_window = time.perf_counter(), 0
    saved_at = None
    try:
        while step < total:
            epoch = step // steps_per_epoch
            first_micro = (step % steps_per_epoch) * accum
            sampler.set_epoch(epoch, first_micro, steps_per_epoch * accum)
            acc, step_row = None, None
            for micro, batch in enumerate(loader, start=first_micro):
                if micro % accum == 0:
                    set_lr(optimizer, schedule.lr_for_step(step, steps_per_epoch, base_lr, cfg.optim.min_lr,
                                                           cfg.optim.warmup_epochs, cfg.optim.epochs))
                    acc, step_row = None, None
                loss, branch_losses, grads = stepper.micro(*batch_inputs(batch))
                acc = stepper.add(acc, grads)
                row = np.concatenate([loss.asnumpy().reshape(1), branch_losses.asnumpy().reshape(-1)]) / accum
                step_row = row if step_row is None else step_row + row
                if (micro + 1) % accum != 0:
                    continue

                stepper.update(acc)
                acc = None
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
                    record["lr"] = float(schedule.lr_for_step(step - 1, steps_per_epoch, base_lr, cfg.optim.min_lr,
                                                              cfg.optim.warmup_epochs, cfg.optim.epochs))
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
                if step >= total:
                    break
        if saved_at != step:
            last_ckpt = save(step)
        tracker.fetch()
    finally:
        loader.close()
        if bar is not None:
            bar.close()
    loss = float(tracker.last_row[0]) if tracker.last_row is not None else None
    return {"step": step, "loss": loss, "checkpoint": last_ckpt, "output_dir": out}
