"""LocalMIM pretraining for MindSpore: one process, or msrun + data parallel.

run_pretrain(cfg) trains the model of `cfg.build_spec()` on `cfg.data.path` and writes into
`cfg.train.output_dir` exactly what the torch engine writes (config.yaml, log.jsonl, here
checkpoint-<step>.ckpt). The loop itself is framework-free and shared with torch
(backends/loop.py, files and counting in backends/runs.py); this module builds what it drives:
the model, the AdamW groups, the loader and `TrainStep`. The lr of each step is written into the
optimizer's per-group lr Parameters (lr x the group's lr_scale) before the step.

The step: `mindspore.value_and_grad` of loss / accum_iter over the trainable parameters (summed
over the micro-batches of a step), `nn.DistributedGradReducer` (mean) once per step under msrun,
optional loss scaling (`train.loss_scale`, MindSpore's Static- / DynamicLossScaler; a step whose
gradients overflow is skipped inside the graph and counted, as GradScaler does), optional
global-norm clipping, then AdamW (`LocalAdamW`: torch's AdamW as one fused AdamWeightDecay kernel
per parameter, holding mindspore.experimental.optim.AdamW's state). Mixed precision
(`train.precision`, `train.amp_level`) is MindSpore's amp on the encoder and decoders, the targets
and the loss in float32 (amp.py). Unless `train.compile` is false, the gradient and update
functions are compiled with `mindspore.jit` (graph mode, `train.jit_level`) in any precision;
`train.compile=false` runs them in PyNative mode, for debugging.

Swin models (spec.family "swin") train the same way on batches whose masks are a grouping plan
(see data.py) instead of ViT masks. In PyNative mode the plans keep their natural shapes;
with `train.compile` the loader pads every plan to the fixed shapes of
`data.static_plan_bounds(spec, mask.ratio)`, so one compiled graph serves every batch.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, amp, nn, ops
from mindspore.experimental.optim import AdamW

from localmim.backends import loop, runs
from localmim.backends.runs import NonFiniteLossError
from localmim.backends.mindspore import build_model
from localmim.backends.mindspore import checkpoint as ckpt
from localmim.backends.mindspore.amp import (
    apply_mixed_precision, load_scaler_state, make_loss_scaler, resolve_amp_level, resolve_precision, scaler_state,
)
from localmim.backends.mindspore import data as data_mod
from localmim.backends.mindspore import distributed as dist_utils
from localmim.core import param_groups

__all__ = [
    "NonFiniteLossError", "LocalAdamW", "resolve_precision", "resolve_amp_level", "apply_mixed_precision",
    "make_loss_scaler", "build_optimizer", "set_lr", "optimizer_state", "load_optimizer_state", "scaler_state",
    "load_scaler_state", "batch_inputs", "TrainStep", "run_pretrain",
]


# ---------------------------------------------------------------------------------------- setup
def batch_inputs(batch: Dict) -> Tuple[Tensor, Dict[str, Tensor]]:
    """A loader batch as the model's arguments (images, masks) as Tensors; integer mask arrays
    become int64, the others keep their dtype (float32 / bool)."""
    imgs = ms.Tensor(batch["images"], ms.float32)
    masks = {}
    for key, value in batch["masks"].items():
        arr = np.asarray(value)
        masks[key] = ms.Tensor(arr.astype(np.int64) if arr.dtype.kind in "iu" else arr)
    return imgs, masks


_fused_adamw = ops.MultitypeFuncGraph("fused_adamw")


@_fused_adamw.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor")
def _apply_fused_adamw(kernel, lr, beta1, beta2, eps, decay, param, exp_avg, exp_avg_sq, grad):
    """One parameter's AdamW step in place (param, exp_avg, exp_avg_sq), one kernel."""
    kernel(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, decay, grad)
    return True


def fused_adamw_scalars(lr, weight_decay, beta1, beta2, eps, step):
    """torch's AdamW step as the scalars of MindSpore's fused AdamWeightDecay kernel.

    torch: p -= lr*wd*p; p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), bc_i = 1 - beta_i**step.
    The kernel: p -= lr' * (m / (sqrt(v) + eps') + wd' * p), the same step for
    lr' = lr * sqrt(bc2) / bc1, eps' = eps * sqrt(bc2), wd' = wd * bc1 / sqrt(bc2) (equal up to
    float32 rounding). Scalars or float32 scalar Tensors in, (lr', eps', wd') out.
    """
    bc1 = 1.0 - ops.pow(beta1, step)
    bc2_sqrt = ops.sqrt(1.0 - ops.pow(beta2, step))
    return lr * bc2_sqrt / bc1, eps * bc2_sqrt, weight_decay * bc1 / bc2_sqrt


class LocalAdamW(AdamW):
    """torch.optim.AdamW (no amsgrad / maximize) as one fused kernel per parameter.

    Holds what mindspore.experimental.optim.AdamW holds (param_groups, per-group lr Parameters
    `lrs`, moments `exp_avg` / `exp_avg_sq`, `state_step`), so checkpoints and set_lr are
    unchanged, but each step runs `ops.AdamWeightDecay` (moments and parameter updated in place)
    with the bias correction folded into its lr, eps and decay (fused_adamw_scalars). The parent's
    update runs ~15 small kernels per parameter; on vit_mini (167 parameters, 2.3 M values, CPU,
    1 thread) the fused update takes ~17 ms instead of ~70 ms (tools/bench_backends.py --parts).
    Parameters agree with torch.optim.AdamW within a few float32 ulps (tests/mindspore/test_engine.py).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        if amsgrad or maximize:
            raise ValueError("LocalAdamW: amsgrad and maximize are not supported")
        if not eps > 0.0:
            raise ValueError(f"LocalAdamW: eps must be > 0 (the fused kernel's epsilon), got {eps}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.fused_kernel = ops.AdamWeightDecay()

    def construct(self, gradients):
        self.assignadd(self.state_step, self.increase_tensor)
        step = self.op_cast(self.state_step, ms.float32)
        for group_id, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            start_id = self.group_start_id[group_id]
            end_id = self.group_start_id[group_id + 1]
            lr, eps, decay = fused_adamw_scalars(self.lrs[group_id], float(group.get("weight_decay")),
                                                 float(beta1), float(beta2), float(group.get("eps")), step)
            self.hyper_map(ops.partial(_fused_adamw, self.fused_kernel, lr, Tensor(beta1, ms.float32),
                                       Tensor(beta2, ms.float32), eps, decay),
                           self.parameters[start_id:end_id], self.exp_avg[start_id:end_id],
                           self.exp_avg_sq[start_id:end_id], gradients[start_id:end_id])
        return True


def build_optimizer(model: nn.Cell, cfg, groups: Optional[List[Dict]] = None) -> AdamW:
    """AdamW over core param groups: `groups` (names, weight_decay, lr_scale; fine-tuning passes
    core.param_groups.finetune_param_groups) or by default core.param_groups.pretrain_param_groups
    (frozen = parameters without grad).

    Each MindSpore group keeps the core group's "name" and "lr_scale"; `set_lr` applies them.
    """
    named = {p.name: p for p in model.get_parameters()}
    if groups is None:
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


# ---------------------------------------------------------------------------------------- step
_hyper_map = ops.HyperMap()


class TrainStep:
    """One optimizer step of pretraining, micro-batch by micro-batch (the step object of
    backends/loop.py).

    Each micro-batch: `value_and_grad` of loss * loss_scale / accum w.r.t. optimizer.parameters,
    the gradients and the loss row [loss, loss_b0, ...] / accum summed on the device. apply(), one
    graph: mean over ranks (`reducer`, msrun), unscale and `mindspore.amp.all_finite` (`scaler`, a
    Static- or DynamicLossScaler: a step whose gradients overflow is skipped inside the graph, the
    dynamic scale adjusted and `skipped_steps` counted, as GradScaler does), global-norm clipping,
    AdamW. With use_jit the gradient, accumulation and update functions are compiled (ms.jit at
    `jit_level`, None: MindSpore's default). In graph mode nothing waits for the device; in
    PyNative mode the overflow check reads one boolean per step.
    """

    def __init__(self, model: nn.Cell, optimizer: AdamW, *, accum: int, scaler=None, reducer=None,
                 clip_grad: Optional[float] = None, use_jit: bool = False, jit_level: Optional[str] = None):
        self.model, self.optimizer, self.scaler, self.reducer = model, optimizer, scaler, reducer
        self.inv_accum = 1.0 / float(accum)
        self.clip = float(clip_grad) if clip_grad else None
        # steps skipped for overflow, counted on the device (checkpointed with the scaler state)
        self.skipped = ms.Parameter(ms.Tensor(0, ms.int32), name="skipped_steps", requires_grad=False)
        self.grad_fn = ms.value_and_grad(self._forward, None, optimizer.parameters, has_aux=True)
        if use_jit:
            options = {"jit_level": jit_level} if jit_level else {}
            wrap = lambda f: ms.jit(f, **options)  # noqa: E731
        else:
            wrap = lambda f: f  # noqa: E731
        self._micro = wrap(self._micro_grads)
        self._accumulate = wrap(self._add)
        self._finish = wrap(self._finish_grads)
        self._update = wrap(self._update_params)
        self._grads, self._row = None, None
        model.set_train(True)

    # compiled pieces
    def losses(self, imgs, masks):
        """(loss, the rest of the loss row) of one micro-batch, inside the graph: pretraining's
        total and branch losses."""
        return self.model(imgs, masks)

    @staticmethod
    def inputs(batch: Dict):
        """A loader batch as the two arguments of `losses` (Tensors)."""
        return batch_inputs(batch)

    def _forward(self, imgs, masks):
        loss, branch_losses = self.losses(imgs, masks)
        scaled = loss * self.inv_accum
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        return scaled, loss, branch_losses

    def _micro_grads(self, imgs, masks):
        (_, loss, branch_losses), grads = self.grad_fn(imgs, masks)
        row = ops.concat((loss.reshape(1), branch_losses.reshape(-1))) * self.inv_accum
        return grads, row

    @staticmethod
    def _add(acc, new):
        return _hyper_map(ops.add, acc, new)

    def _finish_grads(self, grads):
        """Reduce over ranks, unscale, check finiteness, clip -> (grads, finite)."""
        if self.reducer is not None:
            grads = self.reducer(grads)
        finite = ops.ones((), ms.bool_)
        if self.scaler is not None:
            grads = self.scaler.unscale(grads)
            finite = amp.all_finite(grads)
        if self.clip is not None:
            grads = ops.clip_by_global_norm(grads, self.clip)
        return grads, finite

    def _update_params(self, grads):
        """_finish_grads, then AdamW unless the gradients overflowed: the whole step is skipped (no
        moment decay, no weight decay, state_step unchanged), the dynamic scale lowered and the
        skip counted. The branch is graph control flow: no host sync."""
        grads, finite = self._finish_grads(grads)
        if self.scaler is None:
            self.optimizer(grads)
            return finite
        self.scaler.adjust(finite)
        if finite:
            self.optimizer(grads)
        ops.assign_add(self.skipped, ops.logical_not(finite).astype(ms.int32))
        return finite

    # the step object
    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def micro(self, batch: Dict, sync: bool = True) -> None:
        """Gradient and loss row of one micro-batch, added to the step's sums (sync: unused, the
        reducer runs once per step in apply)."""
        imgs, masks = self.inputs(batch)
        # mutable: a dict / tuple of Tensors passed to a jit function is otherwise taken as
        # constants, dumped in warnings and recompiled on every new value (MindSpore 2.10; a Swin
        # plan took ~13 s a step instead of 0.25 s); in PyNative it changes nothing.
        grads, row = self._micro(imgs, ms.mutable(masks))
        if self._grads is None:
            self._grads, self._row = grads, row
        else:
            self._grads, self._row = self._accumulate(ms.mutable((tuple(self._grads), self._row)),
                                                      ms.mutable((tuple(grads), row)))

    def apply(self) -> Tensor:
        """The AdamW update from the summed gradients -> the step's loss row (a Tensor)."""
        self._update(ms.mutable(tuple(self._grads)))
        row, self._grads, self._row = self._row, None, None
        return row

    def skipped_steps(self) -> int:
        """Steps skipped so far because their gradients overflowed (one host read)."""
        return int(self.skipped.asnumpy())

    def log_fields(self) -> Dict[str, int]:
        """Extra log.jsonl fields at a log line: {"skipped_steps": n} when the loss is scaled."""
        return {"skipped_steps": self.skipped_steps()} if self.scaler is not None else {}

    @staticmethod
    def gather(rows: List) -> np.ndarray:
        """Loss rows (Tensors or arrays) -> their mean over ranks as float32 numpy (one sync)."""
        rows = np.stack([np.asarray(r.asnumpy() if hasattr(r, "asnumpy") else r, np.float32) for r in rows])
        return dist_utils.all_reduce_mean(rows)

    def states(self) -> Tuple[Dict, Dict, Optional[Dict]]:
        scaler = scaler_state(self.scaler, self.skipped_steps()) if self.scaler is not None else None
        return self.model.export_state(), optimizer_state(self.optimizer), scaler

    def load_states(self, payload: Dict, path: str) -> None:
        """Model, optimizer and scaler state of a checkpoint payload (`path` names it in errors)."""
        self.model.import_state(payload["model"])
        load_optimizer_state(self.optimizer, payload["optimizer"], path)
        skipped = load_scaler_state(self.scaler, payload.get("scaler"), path)
        ops.assign(self.skipped, ms.Tensor(skipped, ms.int32))

    def model_shapes(self) -> Dict[str, tuple]:
        return self.model.state_shapes()


# ---------------------------------------------------------------------------------------- run
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
    os.makedirs(os.path.abspath(cfg.train.output_dir), exist_ok=True)
    use_jit = cfg.train.compile is not False  # None (the default) means graph mode, MindSpore's fast path
    precision = resolve_precision(cfg.train.precision, target)
    amp_level = resolve_amp_level(cfg.train.amp_level, precision)

    # Same seed on every rank: identical initial weights without a broadcast.
    ms.set_seed(int(cfg.train.seed))
    loop.seed_host(cfg.train.seed)
    model = build_model(spec)
    apply_mixed_precision(model, precision, amp_level)
    optimizer = build_optimizer(model, cfg)
    reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=world) if world > 1 else None
    stepper = TrainStep(model, optimizer, accum=runs.accum_steps(cfg),
                        scaler=make_loss_scaler(cfg.train.loss_scale, precision), reducer=reducer,
                        clip_grad=cfg.optim.clip_grad, use_jit=use_jit, jit_level=cfg.train.jit_level)
    loader, sampler = data_mod.build_pretrain_loader(cfg, spec, rank=rank, world=world, static_plans=use_jit)
    figure = None  # rank 0's TensorBoard reconstruction figure (tools/visualize.py rendering)
    if rank == 0 and cfg.train.tensorboard and cfg.train.tensorboard_images_every_epochs:
        from localmim.tools.visualize import training_figure
        figure = training_figure("mindspore", model, cfg)
    evaluate = None  # periodic k-NN on eval.knn_data, logged beside the loss (tools/evaluate.py)
    if cfg.eval.knn_data:
        from localmim.tools.evaluate import knn_hook
        evaluate = knn_hook("mindspore", model, cfg)
    try:
        return loop.train(cfg, stepper, loader, sampler, ckpt, rank=rank, world=world, on_cpu=target == "CPU",
                          barrier=dist_utils.barrier, any_rank=dist_utils.any_rank, figure=figure,
                          evaluate=evaluate, eval_every_epochs=cfg.eval.every_epochs)
    finally:
        loader.close()
