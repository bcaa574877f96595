"""Linear probing of a frozen LocalMIM encoder (PyTorch; twin of backends/mindspore/linprobe.py).

MAE's protocol (docs/method.md#linear-probe-protocol): the encoder is frozen and runs unmasked
(backends/torch/features.py `Encoder.encode`); a head of BatchNorm without affine (eps 1e-6) and a
Linear layer (weight trunc_normal std 0.01, bias 0) is trained with LARS (momentum 0.9, trust
coefficient 0.001, no weight decay and no trust scaling on 1-D parameters) and cross-entropy, on
RandomResizedCrop + flip crops, lr = blr x effective batch / 256 with warmup and cosine decay. The
loop is the shared one (backends/loop.py) driving `ProbeStep`; its checkpoints hold the head only
(the encoder is the --checkpoint file, named in the run's config).

One process (the head is tiny; the encoder forward is the cost): the paper's batch of 16384 is
reached with data.batch_size x optim.accum_iter.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localmim.backends import labelled, loop, runs
from localmim.backends.images import ShardedBatchSampler
from localmim.backends.torch import checkpoint as ckpt
from localmim.backends.torch.distributed import select_device
from localmim.backends.torch.features import Encoder, load_encoder, random_encoder
from localmim.core import knn
from localmim.core.features import embedding_dim

__all__ = ["LARS", "LinearProbe", "ProbeStep", "build_probe", "evaluate_probe", "run_linprobe"]

PROBE_BN_EPS = 1e-6
HEAD_INIT_STD = 0.01


class LARS(torch.optim.Optimizer):
    """LARS as MAE's linear probe uses it. For each parameter p with gradient g:

        if p.ndim > 1:  d = g + weight_decay * p;  d = d * q,  q = trust * ||p|| / ||d||
                        (q = 1 when ||p|| or ||d|| is 0)
        else:           d = g                      (biases, norms: no decay, no scaling)
        mu = momentum * mu + d;   p = p - lr * mu   (mu starts at 0)

    Written here because timm.optim.Lars applies the trust ratio only when weight decay is non-zero
    (the probe uses none) and then to 1-D parameters too, which is not this rule.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(d)
                    q = torch.where((p_norm > 0) & (d_norm > 0), group["trust_coefficient"] * p_norm / d_norm,
                                    torch.ones_like(p_norm))
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])


class LinearProbe(nn.Module):
    """The probe head: `head.0` BatchNorm1d(dim, affine=False, eps 1e-6), `head.1` Linear(dim, classes).
    (B, dim) features -> (B, classes) logits."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=PROBE_BN_EPS), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head[1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def export_state(self) -> Dict[str, np.ndarray]:
        """{name: float32 numpy copy} without torch's num_batches_tracked counter (the canonical state)."""
        return {k: v.detach().cpu().float().numpy().copy() for k, v in self.state_dict().items()
                if not k.endswith("num_batches_tracked")}


def build_probe(dim: int, num_classes: int, seed: int = 0) -> LinearProbe:
    """A LinearProbe whose head weights come from torch's generator seeded with `seed`."""
    torch.manual_seed(int(seed))
    return LinearProbe(dim, num_classes)


def _logits(encoder: Encoder, probe: LinearProbe, images) -> torch.Tensor:
    imgs = torch.as_tensor(np.asarray(images, np.float32), device=encoder.device)
    return probe(encoder.encode(imgs))


class ProbeStep:
    """The loop's step object (backends/loop.py) for linear probing: batches {"images", "labels"}.

    micro: frozen features (no gradient), head forward, cross-entropy / accum backward into the
    head; apply: LARS step -> the loss row [loss]. The encoder never changes (its parameters have no
    gradient and are not in the optimizer).
    """

    def __init__(self, encoder: Encoder, probe: LinearProbe, optimizer: LARS, accum: int = 1):
        self.encoder, self.probe, self.optimizer = encoder, probe, optimizer
        self.accum = int(accum)
        for p in encoder.model.parameters():
            p.requires_grad_(False)
        self._row: Optional[torch.Tensor] = None
        probe.train()
        optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def micro(self, batch: Dict, sync: bool = True) -> None:
        labels = torch.as_tensor(batch["labels"], dtype=torch.int64, device=self.encoder.device)
        loss = F.cross_entropy(_logits(self.encoder, self.probe, batch["images"]), labels)
        (loss / self.accum).backward()
        row = loss.detach().float().reshape(1) / self.accum
        self._row = row if self._row is None else self._row + row

    def apply(self) -> torch.Tensor:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        row, self._row = self._row, None
        return row

    @staticmethod
    def gather(rows: List[torch.Tensor]) -> np.ndarray:
        return torch.stack(rows).double().cpu().numpy()

    def states(self) -> Tuple[Dict, Dict, None]:
        return self.probe.state_dict(), self.optimizer.state_dict(), None

    def load_states(self, payload: Dict, path: str) -> None:
        self.probe.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])

    def model_shapes(self) -> Dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.probe.state_dict().items()}


@torch.no_grad()
def evaluate_probe(encoder: Encoder, probe: LinearProbe, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Dict:
    """{"val_acc1", "val_acc5" (percent), "val_loss"} of the probe (eval mode: running BatchNorm statistics)."""
    was_training = probe.training
    probe.eval()
    logits, labels = [], []
    try:
        for images, y in batches:
            logits.append(_logits(encoder, probe, images).double().cpu().numpy())
            labels.append(np.asarray(y, np.int64))
    finally:
        probe.train(was_training)
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    return knn.classification_metrics(logits, labels)


def run_linprobe(cfg) -> Dict:
    """Train (or resume) the probe as the LinprobeConfig `cfg` says; evaluate on val/.

    Returns {"step", "loss", "checkpoint", "output_dir", "val_acc1", "val_acc5", "val_loss", "classes"}.
    """
    device = select_device(cfg.train.device)
    out = os.path.abspath(cfg.train.output_dir)
    os.makedirs(out, exist_ok=True)
    train_split, val_split = labelled.train_val_splits(cfg.data.path)
    arch = {"img_size": cfg.model.img_size} if cfg.model.img_size else {}
    encoder = load_encoder(cfg.model.checkpoint, cfg.model.layout, cfg.model.pool, **arch)
    if cfg.model.random_init:
        encoder = random_encoder(encoder.spec, cfg.model.pool, cfg.train.seed)
    encoder.model.to(device)
    img_size = encoder.spec.img_size
    loop.seed_host(cfg.train.seed)
    probe = build_probe(embedding_dim(encoder.spec), len(train_split.classes), cfg.train.seed).to(device)
    optimizer = LARS(probe.parameters(), weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                     trust_coefficient=cfg.optim.trust_coefficient)
    stepper = ProbeStep(encoder, probe, optimizer, accum=runs.accum_steps(cfg))
    transform = labelled.TrainTransform(img_size, cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.hflip)
    dataset = labelled.LabelledTrainDataset(train_split, transform, seed=cfg.train.seed)
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, seed=cfg.train.seed)
    loader = labelled.LabelledLoader(dataset, sampler, workers=cfg.data.num_workers)
    eval_transform = labelled.EvalTransform(img_size)
    done: Dict[int, Dict[str, float]] = {}  # step -> metrics, so the end is not evaluated twice

    def evaluate(step: int) -> Dict[str, float]:
        if step not in done:
            done[step] = evaluate_probe(encoder, probe, labelled.eval_batches(
                val_split, eval_transform, cfg.data.batch_size, cfg.data.num_workers))
        return done[step]

    try:
        result = loop.train(cfg, stepper, loader, sampler, ckpt, on_cpu=device.type == "cpu",
                            evaluate=evaluate,
                            # 0: once, after the last step (an interval no run reaches)
                            eval_every_epochs=cfg.eval.every_epochs or cfg.optim.epochs + 1)
    finally:
        loader.close()
    result.update(evaluate(result["step"]), classes=train_split.classes)
    return result
