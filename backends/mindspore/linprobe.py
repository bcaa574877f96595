"""Linear probing of a frozen LocalMIM encoder (MindSpore; twin of backends/torch/linprobe.py).

MAE's protocol (docs/method.md#linear-probe-protocol): the encoder is frozen and runs unmasked
(backends/mindspore/features.py `Encoder.encode`); a head of BatchNorm without affine (eps 1e-6)
and a Linear layer (weight trunc_normal std 0.01, bias 0) is trained with LARS (momentum 0.9, trust
coefficient 0.001, no weight decay and no trust scaling on 1-D parameters) and cross-entropy, on
RandomResizedCrop + flip crops, lr = blr x effective batch / 256 with warmup and cosine decay. The
loop is the shared one (backends/loop.py) driving `ProbeStep` (PyNative: the head is tiny); its
checkpoints hold the head only (the encoder is the --checkpoint file, named in the run's config).

One process: the paper's batch of 16384 is reached with data.batch_size x optim.accum_iter.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import TruncatedNormal, initializer

from localmim.backends import labelled, loop, runs
from localmim.backends.images import ShardedBatchSampler
from localmim.backends.mindspore import checkpoint as ckpt
from localmim.backends.mindspore.distributed import select_device
from localmim.backends.mindspore.features import BatchNorm, Encoder, load_encoder, random_encoder
from localmim.backends.mindspore.layers import Linear
from localmim.core import knn
from localmim.core.features import embedding_dim

__all__ = ["LARS", "LinearProbe", "ProbeStep", "build_probe", "evaluate_probe", "run_linprobe"]

PROBE_BN_EPS = 1e-6
HEAD_INIT_STD = 0.01


class LARS:
    """LARS as MAE's linear probe uses it. For each parameter p with gradient g:

        if p.ndim > 1:  d = g + weight_decay * p;  d = d * q,  q = trust * ||p|| / ||d||
                        (q = 1 when ||p|| or ||d|| is 0)
        else:           d = g                      (biases, norms: no decay, no scaling)
        mu = momentum * mu + d;   p = p - lr * mu   (mu starts at 0)

    Written here, as in the torch twin, because no library optimizer follows this rule
    (mindspore.nn.LARS adds the weight-decay norm and an epsilon to the denominator).
    `parameters`: the trained Parameters; `mu`: one momentum Parameter per parameter, named
    "mu.<parameter name>".
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        self.parameters = list(params)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.momentum, self.trust_coefficient = float(momentum), float(trust_coefficient)
        self.mu = [Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"mu.{p.name}", requires_grad=False)
                   for p in self.parameters]

    def __call__(self, grads) -> None:
        for p, g, mu in zip(self.parameters, grads, self.mu):
            d = g
            if p.ndim > 1:
                d = d + self.weight_decay * p
                p_norm, d_norm = ops.sqrt((p * p).sum()), ops.sqrt((d * d).sum())
                use = ops.logical_and(p_norm > 0, d_norm > 0)
                q = ops.where(use, self.trust_coefficient * p_norm / ops.where(use, d_norm, ops.ones_like(d_norm)),
                              ops.ones_like(p_norm))
                d = d * q
            ops.assign(mu, self.momentum * mu + d)
            ops.assign(p, p - self.lr * mu)

    def state(self, names: List[str]) -> Dict[str, np.ndarray]:
        """{"mu.<name>": momentum} for the parameters' canonical names."""
        return {f"mu.{n}": m.asnumpy().copy() for n, m in zip(names, self.mu)}

    def load_state(self, names: List[str], state: Dict[str, np.ndarray], path: str) -> None:
        missing = [f"mu.{n}" for n in names if f"mu.{n}" not in state]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {path} optimizer state lacks {', '.join(missing[:4])}")
        for n, m in zip(names, self.mu):
            ops.assign(m, Tensor(np.asarray(state[f"mu.{n}"], np.float32)))


class LinearProbe(nn.Cell):
    """The probe head: `head.0` BatchNorm(dim, affine=False, eps 1e-6), `head.1` Linear(dim, classes).
    (B, dim) features -> (B, classes) logits. Names and numbers as the torch twin's."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.SequentialCell([BatchNorm(dim, eps=PROBE_BN_EPS, affine=False), Linear(dim, num_classes)])
        w = self.head[1].weight
        w.set_data(initializer(TruncatedNormal(HEAD_INIT_STD), w.shape, ms.float32))

    def construct(self, features):
        return self.head(features)

    def named_state(self) -> List[Tuple[str, Parameter]]:
        """(canonical name, Parameter) of every parameter and statistic, e.g. ("head.1.weight", ...)."""
        return list(self.parameters_and_names())

    def export_state(self) -> Dict[str, np.ndarray]:
        return {n: p.asnumpy().astype(np.float32).copy() for n, p in self.named_state()}

    def import_state(self, state: Dict[str, np.ndarray], path: str = "state") -> None:
        own = dict(self.named_state())
        missing = sorted(set(own) - set(state))
        bad = sorted(n for n in own if n in state and tuple(np.shape(state[n])) != tuple(own[n].shape))
        if missing or bad:
            raise ckpt.CheckpointError(f"{path}: the probe state does not fit: missing {missing[:4]}, "
                                       f"mis-shaped {bad[:4]}")
        for n, p in own.items():
            ops.assign(p, Tensor(np.asarray(state[n], np.float32)))


def build_probe(dim: int, num_classes: int, seed: int = 0) -> LinearProbe:
    """A LinearProbe whose head weights come from MindSpore's generator seeded with `seed`."""
    ms.set_seed(int(seed))
    return LinearProbe(dim, num_classes)


def _features(encoder: Encoder, images) -> Tensor:
    return ops.stop_gradient(encoder.encode(Tensor(np.asarray(images, np.float32))))


class ProbeStep:
    """The loop's step object (backends/loop.py) for linear probing: batches {"images", "labels"}.

    micro: frozen features (no gradient), `value_and_grad` of cross-entropy / accum over the head's
    trainable parameters, summed over micro-batches; apply: LARS -> the loss row [loss]. The encoder
    never changes (its parameters get no gradient and are not in the optimizer).
    """

    def __init__(self, encoder: Encoder, probe: LinearProbe, optimizer: LARS, accum: int = 1):
        self.encoder, self.probe, self.optimizer = encoder, probe, optimizer
        self.inv_accum = 1.0 / float(accum)
        self.names = [n for n, p in probe.named_state() if p.requires_grad]
        self.grad_fn = ms.value_and_grad(self._loss, None, optimizer.parameters)
        self._grads, self._row = None, None
        probe.set_train(True)

    def _loss(self, features, labels):
        return ops.cross_entropy(self.probe(features), labels) * self.inv_accum

    def set_lr(self, lr: float) -> None:
        self.optimizer.lr = float(lr)

    def micro(self, batch: Dict, sync: bool = True) -> None:
        labels = Tensor(np.asarray(batch["labels"], np.int32))
        loss, grads = self.grad_fn(_features(self.encoder, batch["images"]), labels)
        row = loss.reshape(1)
        if self._grads is None:
            self._grads, self._row = list(grads), row
        else:
            self._grads = [a + b for a, b in zip(self._grads, grads)]
            self._row = self._row + row

    def apply(self) -> Tensor:
        self.optimizer(self._grads)
        row, self._grads, self._row = self._row, None, None
        return row

    @staticmethod
    def gather(rows: List) -> np.ndarray:
        return np.stack([np.asarray(r.asnumpy(), np.float64) for r in rows])

    def states(self) -> Tuple[Dict, Dict, None]:
        return self.probe.export_state(), self.optimizer.state(self.names), None

    def load_states(self, payload: Dict, path: str) -> None:
        self.probe.import_state(payload["model"], path)
        self.optimizer.load_state(self.names, payload["optimizer"], path)

    def model_shapes(self) -> Dict[str, tuple]:
        return {n: tuple(p.shape) for n, p in self.probe.named_state()}


def evaluate_probe(encoder: Encoder, probe: LinearProbe, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Dict:
    """{"val_acc1", "val_acc5" (percent), "val_loss"} of the probe (eval mode: running BatchNorm statistics)."""
    was_training = probe.training
    probe.set_train(False)
    logits, labels = [], []
    try:
        for images, y in batches:
            logits.append(probe(_features(encoder, images)).asnumpy().astype(np.float64))
            labels.append(np.asarray(y, np.int64))
    finally:
        probe.set_train(was_training)
    return knn.classification_metrics(np.concatenate(logits), np.concatenate(labels))


def run_linprobe(cfg) -> Dict:
    """Train (or resume) the probe as the LinprobeConfig `cfg` says; evaluate on val/.

    Returns {"step", "loss", "checkpoint", "output_dir", "val_acc1", "val_acc5", "val_loss", "classes"}.
    """
    target = select_device(cfg.train.device)
    out = os.path.abspath(cfg.train.output_dir)
    os.makedirs(out, exist_ok=True)
    train_split, val_split = labelled.train_val_splits(cfg.data.path)
    arch = {"img_size": cfg.model.img_size} if cfg.model.img_size else {}
    encoder = load_encoder(cfg.model.checkpoint, cfg.model.layout, cfg.model.pool, **arch)
    if cfg.model.random_init:
        encoder = random_encoder(encoder.spec, cfg.model.pool, cfg.train.seed)
    img_size = encoder.spec.img_size
    loop.seed_host(cfg.train.seed)
    probe = build_probe(embedding_dim(encoder.spec), len(train_split.classes), cfg.train.seed)
    optimizer = LARS([p for _, p in probe.named_state() if p.requires_grad], weight_decay=cfg.optim.weight_decay,
                     momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.trust_coefficient)
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
        result = loop.train(cfg, stepper, loader, sampler, ckpt, on_cpu=target == "CPU",
                            evaluate=evaluate,
                            # 0: once, after the last step (an interval no run reaches)
                            eval_every_epochs=cfg.eval.every_epochs or cfg.optim.epochs + 1)
    finally:
        loader.close()
    result.update(evaluate(result["step"]), classes=train_split.classes)
    return result
