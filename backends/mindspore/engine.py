"""LocalMIM pretraining loop for MindSpore: one process, or msrun + data parallel.

run_pretrain(cfg) trains the model of `cfg.build_spec()` on `cfg.data.path` and writes into
`cfg.train.output_dir` exactly what the torch engine writes (config.yaml, log.jsonl, here
checkpoint-<step>.ckpt); backends/runs.py describes those files, the step counting and resumption.
The lr of each step is written into the optimizer's per-group lr Parameters (lr x the group's
lr_scale) before the step.

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

import os
from typing import Dict, Optional

import numpy as np

import mindspore as ms
from mindspore import amp, nn, ops
from mindspore.experimental.optim import AdamW

from localmim.backends import runs
from localmim.backends.runs import LOG_KEYS, NonFiniteLossError, config_to_dict, write_config
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

_LOSS_SCALE_INIT = 2.0 ** 16  # torch GradScaler's default, so both backends start alike


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
def _gather_losses(rows) -> np.ndarray:
    """Per-step loss rows (Tensors or arrays) -> their mean over ranks as float32 numpy."""
    rows = np.stack([np.asarray(r.asnumpy() if hasattr(r, "asnumpy") else r, np.float32) for r in rows])
    return dist_utils.all_reduce_mean(rows)


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
    accum = runs.accum_steps(cfg)
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
    steps_per_epoch, total = runs.plan_steps(cfg, sampler.batches_per_epoch, accum)
    base_lr = cfg.resolved_lr(world)

    step = 0
    last_ckpt, payload = runs.load_latest(ckpt, out, model.state_shapes)
    if payload is not None:
        model.import_state(payload["model"])
        load_optimizer_state(optimizer, payload["optimizer"], last_ckpt)
        load_scaler_state(scaler, payload.get("scaler"))
        step = int(payload["step"])
        runs.warn_config_change(last_ckpt, payload.get("config"), cfg, main)
        del payload
    log_path = runs.start_output(cfg, out, step, main)
    dist_utils.barrier()

    if step >= total:
        loader.close()
        return {"step": step, "loss": runs.last_logged_loss(log_path), "checkpoint": last_ckpt, "output_dir": out}

    apply_mixed_precision(model, precision, use_jit=use_jit)
    model.set_train(True)
    reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=world) if world > 1 else None
    stepper = TrainStep(model, optimizer, accum, scaler=scaler, reducer=reducer, clip_grad=cfg.optim.clip_grad,
                        use_jit=use_jit)

    tracker = runs.LossTracker(out, steps_per_epoch, _gather_losses, ckpt.latest_checkpoint)
    sync_every_step = target == "CPU"  # the check costs no device sync there
    log_every, save_every, save_epochs = runs.loop_intervals(cfg)

    def states():
        return model.export_state(), optimizer_state(optimizer), scaler_state(scaler)

    def save(at_step: int) -> str:
        tracker.fetch()  # raises before anything is written if a loss went non-finite
        path = runs.save_run_checkpoint(ckpt, out, at_step, steps_per_epoch, cfg, states, main)
        dist_utils.barrier()
        return path

    logger = runs.StepLogger(log_path, total, step, steps_per_epoch, cfg.data.batch_size * accum * world, main,
                             cfg.train.progress)
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
                tracker.add(step_row, step)
                if sync_every_step:
                    tracker.fetch()
                logger.step_done()

                if step % log_every == 0 or step == total:
                    logger.log(step, tracker.take_window(),
                               schedule.lr_for_step(step - 1, steps_per_epoch, base_lr, cfg.optim.min_lr,
                                                    cfg.optim.warmup_epochs, cfg.optim.epochs))

                if runs.save_due(step, total, steps_per_epoch, save_every, save_epochs):
                    last_ckpt = save(step)
                    saved_at = step
                if step >= total:
                    break
        if saved_at != step:
            last_ckpt = save(step)
        tracker.fetch()
    finally:
        loader.close()
        logger.close()
    return {"step": step, "loss": tracker.last_loss, "checkpoint": last_ckpt, "output_dir": out}
