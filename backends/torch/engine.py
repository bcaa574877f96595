"""LocalMIM pretraining for PyTorch: one process or torchrun + DistributedDataParallel.

run_pretrain(cfg) trains the model of `cfg.build_spec()` on `cfg.data.path` and writes
config.yaml, log.jsonl and checkpoint-<step>.pth into `cfg.train.output_dir`. The loop itself is
framework-free and shared with MindSpore (backends/loop.py, files and counting in
backends/runs.py); this module builds what it drives: the model, the AdamW groups, the loader and
`TrainStep`, which runs one micro-batch (autocast, DDP no_sync, GradScaler) and applies the update
without waiting for the device.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from localmim.backends import loop, runs
from localmim.backends.runs import NonFiniteLossError
from localmim.backends.torch import build_model
from localmim.backends.torch import checkpoint as ckpt
from localmim.backends.torch import data as data_mod
from localmim.backends.torch import distributed as dist_utils
from localmim.core import param_groups

__all__ = [
    "NonFiniteLossError", "resolve_precision", "autocast_context", "make_grad_scaler", "build_optimizer",
    "set_lr", "batch_inputs", "compile_forward", "build_train_step", "build_loader", "TrainStep", "run_pretrain",
]


# ---------------------------------------------------------------------------------------- setup
def batch_inputs(batch: Dict, device: torch.device) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """A loader batch as the model's arguments (images, masks), moved to `device`."""
    imgs = batch["images"].to(device, non_blocking=True)
    return imgs, {k: v.to(device, non_blocking=True) for k, v in batch["masks"].items()}


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


def build_optimizer(model: torch.nn.Module, cfg, fused: bool = False,
                    groups: Optional[List[Dict]] = None) -> torch.optim.AdamW:
    """AdamW over core param groups: `groups` (names, weight_decay, lr_scale; fine-tuning passes
    core.param_groups.finetune_param_groups) or by default core.param_groups.pretrain_param_groups
    (frozen = parameters without grad).

    Each torch param group keeps the core group's "name" and "lr_scale"; `set_lr` applies them.
    """
    named = dict(model.named_parameters())
    if groups is None:
        shapes = {n: tuple(p.shape) for n, p in named.items()}
        frozen = [n for n, p in named.items() if not p.requires_grad]
        groups = param_groups.pretrain_param_groups(shapes, cfg.optim.weight_decay,
                                                    getattr(model.spec, "family", "vit"), frozen=frozen)
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


def compile_forward(net: torch.nn.Module, mode: Optional[str] = None, fullgraph: bool = True):
    """torch.compile of the model's forward + loss (the backward follows through AOTAutograd).

    fullgraph: one graph, an error on any graph break (DDP splits the graph at its gradient
    buckets, so a wrapped model compiles with fullgraph=False). The graph is static
    (dynamic=False), which CUDA graphs ("reduce-overhead") can capture: ViT batches always have the
    same shapes, and a compiled Swin step is fed plans padded to core.swin_plan.static_plan_bounds
    (`build_loader` with train.compile). mode: None or "default", "reduce-overhead",
    "max-autotune", "max-autotune-no-cudagraphs" (train.compile_mode).
    """
    mode = None if mode in (None, "default") else mode
    return torch.compile(net, fullgraph=fullgraph, mode=mode, dynamic=False)


def build_train_step(cfg, model: torch.nn.Module, device: torch.device, world: int = 1) -> "TrainStep":
    """The TrainStep `cfg` asks for on `model` (already on `device`): AdamW over the core groups
    (fused on CUDA), accumulation, precision, clipping, compile and compile mode. run_pretrain and
    `localmim bench` both build their step here."""
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    return TrainStep(model, optimizer, accum=runs.accum_steps(cfg),
                     precision=resolve_precision(cfg.train.precision, device), device=device, world=world,
                     clip_grad=cfg.optim.clip_grad, compile=bool(cfg.train.compile),
                     compile_mode=getattr(cfg.train, "compile_mode", None))


def build_loader(cfg, spec, device: torch.device, rank: int = 0, world: int = 1):
    """(loader, batch_sampler) of `data.decode`: cpu decodes and crops in the loader workers (PIL,
    data.py); gpu decodes the JPEGs on `device` with nvJPEG and crops there (gpu_data.py). With
    train.compile, Swin plans are padded to static shapes (one graph for every mask)."""
    static = bool(cfg.train.compile)
    if getattr(cfg.data, "decode", "cpu") == "gpu":
        from localmim.backends.torch import gpu_data
        return gpu_data.build_gpu_decode_loader(cfg, spec, device, rank=rank, world=world, static_plans=static)
    return data_mod.build_pretrain_loader(cfg, spec, rank=rank, world=world, pin_memory=device.type == "cuda",
                                          static_plans=static)


# ---------------------------------------------------------------------------------------- step
class TrainStep:
    """One optimizer step of pretraining, micro-batch by micro-batch (the step object of
    backends/loop.py).

    model: the LocalMIM model on its device; optimizer: `build_optimizer(model, cfg)`. world > 1
    wraps the model in DistributedDataParallel (gradients reduced on the last micro-batch of a
    step); compile runs the forward + loss through `compile_forward` (torch.compile, mode
    `compile_mode`). precision "fp16" scales the loss with a GradScaler (steps whose gradients
    overflow are skipped), "bf16" / "fp16" run the forward under autocast; targets and the loss stay
    fp32 (the model). Loss rows stay on the device until `gather`: no host sync in the step.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, accum: int, precision: str,
                 device: torch.device, world: int = 1, clip_grad: Optional[float] = None, compile: bool = False,
                 compile_mode: Optional[str] = None):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.accum, self.precision, self.world = int(accum), precision, int(world)
        self.clip = float(clip_grad) if clip_grad else None
        self.scaler = make_grad_scaler(precision, device)
        self.net = model
        if world > 1:
            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=self.has_unused_parameters(model))
        self.forward = compile_forward(self.net, compile_mode, fullgraph=world == 1) if compile else self.net
        self._row: Optional[torch.Tensor] = None
        model.train()
        optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def has_unused_parameters(model: torch.nn.Module) -> bool:
        """Whether some parameters get no gradient (DDP must then not wait for them): the ViT
        blocks after the last tap, which pretraining never runs."""
        spec = model.spec
        return spec.family == "vit" and spec.taps[-1] < spec.depth - 1

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def losses(self, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, the rest of the loss row) of one micro-batch, under autocast: pretraining's total
        and branch losses."""
        return self.forward(*batch_inputs(batch, self.device))

    def micro(self, batch: Dict, sync: bool = True) -> None:
        """Forward and backward of one micro-batch; the gradient of loss / accum is added to .grad."""
        no_sync = self.world > 1 and not sync
        with self.net.no_sync() if no_sync else contextlib.nullcontext():
            with autocast_context(self.precision, self.device):
                loss, rest = self.losses(batch)
            scaled = loss / self.accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        row = torch.cat([loss.detach().float().reshape(1), rest.detach().float().reshape(-1)]) / self.accum
        self._row = row if self._row is None else self._row + row

    def apply(self) -> torch.Tensor:
        """Clip, step (through the GradScaler for fp16), zero the gradients -> the step's loss row."""
        if self.clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        row, self._row = self._row, None
        return row

    @staticmethod
    def gather(rows: List[torch.Tensor]) -> np.ndarray:
        """Loss rows kept on the device -> their mean over ranks as float64 numpy (one sync)."""
        return dist_utils.all_reduce_mean(torch.stack(rows)).double().cpu().numpy()

    def states(self) -> Tuple[Dict, Dict, Optional[Dict]]:
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        return self.model.state_dict(), self.optimizer.state_dict(), scaler

    def load_states(self, payload: Dict, path: str) -> None:
        """Model, optimizer and scaler state of a checkpoint payload (`path` names it in errors)."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])

    def model_shapes(self) -> Dict[str, tuple]:
        return self.model.state_shapes()


# ---------------------------------------------------------------------------------------- run
def run_pretrain(cfg) -> Dict:
    """Pretrain (or resume) as `cfg` says. Returns {"step", "loss", "checkpoint", "output_dir"}.

    Raises NonFiniteLossError (after leaving every earlier file intact) when the loss stops being
    finite.
    """
    spec = cfg.build_spec()
    was_initialized = dist_utils.is_distributed()
    rank, world, local_rank, device = dist_utils.init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    try:
        return _run(cfg, spec, rank, world, device)
    finally:
        if not was_initialized:
            dist_utils.cleanup()


def _run(cfg, spec, rank: int, world: int, device: torch.device) -> Dict:
    if rank == 0:
        os.makedirs(os.path.abspath(cfg.train.output_dir), exist_ok=True)
    dist_utils.barrier()
    torch.manual_seed(int(cfg.train.seed))
    loop.seed_host(cfg.train.seed)
    model = build_model(spec).to(device)
    stepper = build_train_step(cfg, model, device, world)
    loader, sampler = build_loader(cfg, spec, device, rank=rank, world=world)
    figure = None  # rank 0's TensorBoard reconstruction figure (tools/visualize.py rendering)
    if rank == 0 and cfg.train.tensorboard and cfg.train.tensorboard_images_every_epochs:
        from localmim.tools.visualize import training_figure
        figure = training_figure("torch", model, cfg)
    evaluate = None  # periodic k-NN on eval.knn_data, logged beside the loss (tools/evaluate.py)
    if cfg.eval.knn_data:
        from localmim.tools.evaluate import knn_hook
        evaluate = knn_hook("torch", model, cfg)
    return loop.train(cfg, stepper, loader, sampler, ckpt, rank=rank, world=world, on_cpu=device.type == "cpu",
                      barrier=dist_utils.barrier, any_rank=dist_utils.any_rank, figure=figure,
                      evaluate=evaluate, eval_every_epochs=cfg.eval.every_epochs)
