"""Fine-tuning for image classification with PyTorch (docs/method.md#fine-tuning).

run_finetune(cfg) fine-tunes the classifier of `cfg.model` (its encoder from
`cfg.model.pretrained`, any layout `localmim convert` reads) on the labelled folders of `cfg.data`
with the shared loop (backends/loop.py): AdamW with layer-wise lr decay (core.param_groups),
timm's training transform (RandomResizedCrop, flip, RandAugment, random erasing) seeded per
sample, Mixup / CutMix with label smoothing mixed on the host (core/mixup.py), soft-target
cross-entropy, and an evaluation on val/ every `train.eval_every_epochs` epochs that keeps
`checkpoint-best.pth`. evaluate_checkpoint(path, ...) scores a fine-tuned checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from localmim.backends import finetune as shared
from localmim.backends import labelled, loop, runs
from localmim.backends.loop import ignore_stop_signals
from localmim.backends.torch import checkpoint as ckpt
from localmim.backends.torch import distributed as dist_utils
from localmim.backends.torch.data import ShardedBatchSampler
from localmim.backends.torch.engine import TrainStep, build_optimizer, resolve_precision
from localmim.backends.torch.swin_classifier import SwinClassifier, load_swin_classifier
from localmim.backends.torch.vit_classifier import ViTClassifier, load_vit_classifier

__all__ = ["soft_target_cross_entropy", "finetune_groups", "CLASSIFIERS", "build_classifier", "FinetuneStep",
           "FinetuneDataset", "build_finetune_loader", "predict_logits", "run_finetune", "evaluate_checkpoint"]


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -sum_c targets * log_softmax(logits), in float32 (timm's
    SoftTargetCrossEntropy). logits, targets: (B, C)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def finetune_groups(model: torch.nn.Module, cfg) -> List[Dict]:
    """The layer-wise lr decay groups of a classifier (backends.finetune.layer_decay_groups)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return shared.layer_decay_groups(shapes, frozen, model.spec, cfg)


# family -> (classifier, loader of a pretrained file)
CLASSIFIERS = {"vit": (ViTClassifier, load_vit_classifier), "swin": (SwinClassifier, load_swin_classifier)}


def build_classifier(cfg, num_classes: int):
    """The ViTClassifier / SwinClassifier of cfg.model (backends.finetune.build_classifier with
    this backend's models)."""
    return shared.build_classifier(cfg, num_classes, CLASSIFIERS)


class FinetuneStep(TrainStep):
    """The pretraining step object (engine.TrainStep: accumulation, autocast, GradScaler, DDP,
    clipping, no host sync) with the classification loss: batches {"images", "targets" (soft),
    "key"}; the loss row is [loss]. Drop path draws from torch's generator reseeded per
    micro-batch from (seed, epoch, batch index), so a resumed run repeats the uninterrupted one."""

    def __init__(self, model, optimizer, *, seed: int = 0, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        self.seed = int(seed)

    @staticmethod
    def has_unused_parameters(model) -> bool:
        return False

    def losses(self, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        epoch, index = (int(v) for v in batch["key"])
        torch.manual_seed(int(np.random.SeedSequence([self.seed, 13, epoch, index]).generate_state(1)[0]))
        images = batch["images"].to(self.device, non_blocking=True)
        targets = batch["targets"].to(self.device, non_blocking=True)
        loss = soft_target_cross_entropy(self.forward(images), targets)
        return loss, loss.new_zeros(0)


# ---------------------------------------------------------------------------------------- data
@contextlib.contextmanager
def _seeded(seed: int):
    """Python's, numpy's and torch's CPU generators seeded for one sample, then restored (timm's
    transforms draw from the global ones)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# Posterize at RandAugment's top level keeps 0 bits, which Pillow >= 13 refuses (timm 1.0.31 still
# asks for it when the magnitude noise reaches 10): the cap just below 10 keeps 1 bit there instead.
_POSTERIZE_MAX_LEVEL = 10.0 - 1e-6


def training_transform(cfg, img_size: int):
    """timm's training transform of the recipe: RandomResizedCrop (bicubic), flip, RandAugment,
    ToTensor, normalise, random erasing (mode pixel, one box)."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    d = cfg.data
    transform = create_transform(input_size=img_size, is_training=True, scale=tuple(d.crop_scale),
                                 ratio=tuple(d.crop_ratio), hflip=d.hflip, vflip=0.0, color_jitter=None,
                                 auto_augment=d.auto_augment or None, interpolation="bicubic",
                                 mean=labelled.IMAGENET_MEAN.tolist(), std=labelled.IMAGENET_STD.tolist(),
                                 re_prob=d.re_prob, re_mode="pixel", re_count=1)
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize") and not op.magnitude_max:
                    op.magnitude_max = _POSTERIZE_MAX_LEVEL
    return transform


class FinetuneDataset(torch.utils.data.Dataset):
    """A training split with the timm transform; sample i of epoch e draws from generators seeded
    by (seed, epoch, i), so any worker count and a resumed run give the same images. Keys are the
    sampler's (epoch, batch index, i); items (image (3,S,S), label, epoch, batch index)."""

    def __init__(self, split: labelled.LabelledSplit, transform, seed: int = 0):
        self.split, self.transform, self.seed = split, transform, int(seed)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        epoch, batch_index, index = key
        img = labelled.read_image(self.split.paths[index])
        sample_seed = int(np.random.SeedSequence([self.seed, 17, int(epoch), int(index)]).generate_state(1)[0])
        with _seeded(sample_seed):
            image = self.transform(img)
        return image, int(self.split.labels[index]), int(epoch), int(batch_index)


class FinetuneCollate(shared.FinetuneCollate):
    """backends.finetune.FinetuneCollate with torch tensors in and out."""

    def stack(self, images) -> np.ndarray:
        return torch.stack(images).numpy()

    def wrap(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array))


def build_finetune_loader(cfg, split, classes: int, img_size: int, rank: int = 0, world: int = 1,
                          pin_memory: bool = False):
    """(DataLoader of mixed batches for one rank, its ShardedBatchSampler)."""
    dataset = FinetuneDataset(split, training_transform(cfg, img_size), cfg.train.seed)
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, seed=cfg.train.seed, rank=rank, world=world)
    collate = FinetuneCollate(cfg.train.seed, rank, classes, shared.mixup_config(cfg))
    workers = int(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals)
    return loader, sampler


# ---------------------------------------------------------------------------------------- evaluation
def predict_logits(model: torch.nn.Module, device: torch.device, precision: str = "fp32"):
    """images (b,3,S,S) numpy -> float32 logits (b,C) numpy of `model` in eval mode (autocast
    for bf16 / fp16); the model's training mode is restored by the caller."""
    from localmim.backends.torch.engine import autocast_context

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        with autocast_context(precision, device):
            logits = model(torch.from_numpy(images).to(device))
        return logits.float().cpu().numpy()
    return predict


def _sum_over_ranks(array: np.ndarray) -> np.ndarray:
    if not dist_utils.is_distributed():
        return array
    t = torch.from_numpy(np.asarray(array, np.float64))
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.cpu().numpy()


# ---------------------------------------------------------------------------------------- run
def run_finetune(cfg) -> Dict:
    """Fine-tune (or resume) as `cfg` (a core.config.FinetuneConfig) says. Returns the loop's
    result plus "eval" (the last evaluation's metrics with "best_acc1")."""
    was_initialized = dist_utils.is_distributed()
    rank, world, _, device = dist_utils.init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    try:
        return _run(cfg, rank, world, device)
    finally:
        if not was_initialized:
            dist_utils.cleanup()


def _run(cfg, rank: int, world: int, device: torch.device) -> Dict:
    train_split, val_split, classes = shared.training_splits(cfg)
    out = os.path.abspath(cfg.train.output_dir)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    dist_utils.barrier()
    torch.manual_seed(int(cfg.train.seed))
    loop.seed_host(cfg.train.seed)
    model = build_classifier(cfg, classes).to(device)
    precision = resolve_precision(cfg.train.precision, device)
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda", groups=finetune_groups(model, cfg))
    stepper = FinetuneStep(model, optimizer, seed=cfg.train.seed, accum=runs.accum_steps(cfg), precision=precision,
                           device=device, world=world, clip_grad=cfg.optim.clip_grad, compile=bool(cfg.train.compile))
    img_size = model.spec.img_size
    loader, sampler = build_finetune_loader(cfg, train_split, classes, img_size, rank, world,
                                            pin_memory=device.type == "cuda")
    best = shared.BestCheckpoint(ckpt, out, ckpt.EXT, rank == 0)
    last: Dict[str, float] = {}
    steps_per_epoch = runs.plan_steps(cfg, sampler.batches_per_epoch, runs.accum_steps(cfg))[0]

    def evaluate(step: int) -> Dict[str, float]:
        model.eval()
        try:
            metrics = shared.evaluate_split(predict_logits(model, device, precision), val_split, img_size,
                                            cfg.data.eval_batch_size or cfg.data.batch_size,
                                            cfg.data.eval_crop_fraction, _sum_over_ranks, rank, world)
        finally:
            model.train()
        last.clear()
        last.update(best.update(step, step // steps_per_epoch, metrics, model.state_dict, cfg))
        return last

    result = loop.train(cfg, stepper, loader, sampler, ckpt, rank=rank, world=world, on_cpu=device.type == "cpu",
                        barrier=dist_utils.barrier, any_rank=dist_utils.any_rank, evaluate=evaluate,
                        eval_every_epochs=cfg.train.eval_every_epochs)
    result["eval"] = dict(last)
    result["best_checkpoint"] = best.path if best.best is not None else None
    return result


def evaluate_checkpoint(path: str, data: str, batch_size: int = 64, device: str = "auto") -> Dict[str, float]:
    """{"val_acc1", "val_acc5", "val_loss"} of a fine-tuned checkpoint (checkpoint-<step>.pth or
    checkpoint-best.pth of `localmim finetune`) on `data` (a folder with val/, or a folder of
    class folders), at the checkpoint's image size and evaluation crop."""
    payload = ckpt.load_checkpoint(path, require=("model", "config"))
    state = payload["model"]
    classes = int(state["head.weight"].shape[0]) if "head.weight" in state else None
    cfg, split = shared.checkpoint_eval_split(path, data, payload["config"], classes)
    classes = classes if classes is not None else len(split.classes)
    spec = cfg.build_spec()
    model = CLASSIFIERS[spec.family][0](spec, classes, cfg.model.global_pool)
    ckpt.check_model_state(path, state, model.state_shapes())
    model.load_state_dict(state)
    dev = dist_utils.select_device(device)
    model.to(dev).eval()
    return shared.evaluate_split(predict_logits(model, dev), split, spec.img_size, batch_size,
                                 cfg.data.eval_crop_fraction)
