"""Fine-tuning for image classification with MindSpore (twin of backends/torch/finetune.py;
docs/method.md#fine-tuning).

run_finetune(cfg) fine-tunes the classifier of `cfg.model` on the labelled folders of `cfg.data`
with the shared loop: AdamW with layer-wise lr decay, soft-target cross-entropy on batches mixed on
the host (core/mixup.py, the same batches as the torch backend's for the same images), an
evaluation on val/ every `train.eval_every_epochs` epochs that keeps `checkpoint-best.ckpt`.

The training transform is MindSpore's own: the shared seeded RandomResizedCrop and flip
(backends/images.py), then `mindspore.dataset.vision.RandAugment` and `RandomErasing`, called
eagerly per sample with the dataset seed set from (seed, epoch, index). MindSpore's RandAugment is
torchvision's (two ops at a fixed magnitude on 31 bins): timm's `rand-mM` maps to magnitude
round(M / 10 * 30); timm's magnitude noise (mstd) and increasing-severity ops (inc1) have no
counterpart there, so the augmentation is the recipe's in kind, not draw for draw.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from PIL import Image

from localmim.backends import finetune as shared
from localmim.backends import labelled, loop, runs
from localmim.backends.images import random_resized_crop_params
from localmim.backends.mindspore import checkpoint as ckpt
from localmim.backends.mindspore import distributed as dist_utils
from localmim.backends.mindspore.data import PretrainLoader, ShardedBatchSampler
from localmim.backends.mindspore.engine import TrainStep, build_optimizer
from localmim.backends.mindspore.swin_classifier import SwinClassifier, load_swin_classifier
from localmim.backends.mindspore.vit_classifier import ViTClassifier, load_vit_classifier

__all__ = ["soft_target_cross_entropy", "finetune_groups", "CLASSIFIERS", "build_classifier", "FinetuneStep",
           "TrainingTransform", "FinetuneDataset", "build_finetune_loader", "predict_logits", "run_finetune",
           "evaluate_checkpoint"]

_RANDAUG_BINS = 31


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """mean over the batch of -sum_c targets * log_softmax(logits), in float32. (B, C) each."""
    return ops.sum(-targets * ops.log_softmax(logits.astype(ms.float32), axis=-1), dim=-1).mean()


def finetune_groups(model, cfg) -> List[Dict]:
    """The layer-wise lr decay groups of a classifier (backends.finetune.layer_decay_groups)."""
    shapes = {p.name: tuple(p.shape) for p in model.get_parameters()}
    frozen = [p.name for p in model.get_parameters() if not p.requires_grad]
    return shared.layer_decay_groups(shapes, frozen, model.spec, cfg)


# family -> (classifier, loader of a pretrained file)
CLASSIFIERS = {"vit": (ViTClassifier, load_vit_classifier), "swin": (SwinClassifier, load_swin_classifier)}


def build_classifier(cfg, num_classes: int):
    """The ViTClassifier / SwinClassifier of cfg.model (backends.finetune.build_classifier with
    this backend's models)."""
    return shared.build_classifier(cfg, num_classes, CLASSIFIERS)


class FinetuneStep(TrainStep):
    """The pretraining step object (engine.TrainStep: accumulation, loss scaling, msrun reduction,
    clipping, graph mode) with the classification loss: batches {"images", "targets" (soft),
    "key" (epoch, batch index)}; the loss row is [loss]. The drop-path draws of each micro-batch,
    (blocks, 2, B) uniforms, come from a numpy generator keyed by (seed, epoch, batch index) and
    enter the graph as an input, so a resumed run repeats the uninterrupted one."""

    def __init__(self, model, optimizer, *, seed: int = 0, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        self.seed = int(seed)
        spec = model.spec
        self.num_blocks = spec.depth if spec.family == "vit" else sum(spec.depths)

    def losses(self, imgs, extra):
        targets, drop_draws = extra
        loss = soft_target_cross_entropy(self.model(imgs, drop_draws), targets)
        return loss, loss.reshape(1)[:0]

    def drop_draws(self, batch: Dict) -> np.ndarray:
        """(blocks, 2, B) float32 uniforms in [0, 1) for the micro-batch `batch`."""
        epoch, index = (int(v) for v in np.asarray(batch["key"]).reshape(-1)[:2])
        rng = np.random.default_rng([self.seed, 13, epoch, index])
        return rng.random((self.num_blocks, 2, len(batch["images"])), dtype=np.float32)

    def inputs(self, batch: Dict):
        targets = Tensor(np.asarray(batch["targets"], np.float32))
        return Tensor(np.asarray(batch["images"], np.float32)), (targets, Tensor(self.drop_draws(batch)))


# ---------------------------------------------------------------------------------------- data
def randaugment_magnitude(auto_augment: str) -> Tuple[int, int]:
    """(num_ops, magnitude on 31 bins) of a timm RandAugment string "rand-m9-mstd0.5-inc1"
    (n defaults to 2, as timm's)."""
    parts = auto_augment.split("-")
    if parts[0] != "rand":
        raise ValueError(f"data.auto_augment {auto_augment!r}: the MindSpore backend supports RandAugment "
                         f"strings 'rand-m<M>[-n<N>]...' only")
    magnitude, num_ops = None, 2
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([\d.]+)", part)
        if m and m.group(1) == "m":
            magnitude = float(m.group(2))
        elif m and m.group(1) == "n":
            num_ops = int(m.group(2))
    if magnitude is None:
        raise ValueError(f"data.auto_augment {auto_augment!r} has no magnitude (m<M>)")
    return num_ops, int(round(min(magnitude, 10.0) / 10.0 * (_RANDAUG_BINS - 1)))


class TrainingTransform:
    """RandomResizedCrop (bicubic) + flip from the shared numpy draws, RandAugment, normalise,
    random erasing: PIL RGB image + Generator -> (3, S, S) float32."""

    def __init__(self, cfg, img_size: int):
        import mindspore.dataset.vision as vision
        d = cfg.data
        self.img_size, self.scale, self.ratio, self.hflip = int(img_size), tuple(d.crop_scale), tuple(d.crop_ratio), \
            float(d.hflip)
        self.randaugment = None
        if d.auto_augment:
            num_ops, magnitude = randaugment_magnitude(d.auto_augment)
            self.randaugment = vision.RandAugment(num_ops=num_ops, magnitude=magnitude,
                                                  num_magnitude_bins=_RANDAUG_BINS, interpolation=vision.Inter.BICUBIC,
                                                  fill_value=tuple(int(round(255 * m)) for m in labelled.IMAGENET_MEAN))
        self.erasing = vision.RandomErasing(prob=float(d.re_prob), value="random") if d.re_prob > 0 else None

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        import mindspore.dataset as ds
        top, left, h, w = random_resized_crop_params(rng, img.width, img.height, self.scale, self.ratio)
        img = img.crop((left, top, left + w, top + h)).resize((self.img_size, self.img_size), Image.BICUBIC)
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        ds.config.set_seed(int(rng.integers(0, 2 ** 31 - 1)))  # MindSpore's draws for this sample
        arr = np.asarray(img, np.uint8)
        if self.randaugment is not None:
            arr = self.randaugment(arr)
        x = ((arr.astype(np.float32) / np.float32(255.0) - labelled.IMAGENET_MEAN) / labelled.IMAGENET_STD)
        x = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
        if self.erasing is not None:
            x = np.asarray(self.erasing(x), np.float32)
        return x


class FinetuneDataset:
    """A training split with TrainingTransform; sample i of epoch e draws from
    default_rng([seed, 17, e, i]). Keys (epoch, batch index, i) -> (image, label, epoch, batch index)."""

    def __init__(self, split: labelled.LabelledSplit, transform: TrainingTransform, seed: int = 0):
        self.split, self.transform, self.seed = split, transform, int(seed)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        epoch, batch_index, index = key
        img = labelled.read_image(self.split.paths[index])
        image = self.transform(img, np.random.default_rng([self.seed, 17, int(epoch), int(index)]))
        return image, int(self.split.labels[index]), int(epoch), int(batch_index)


def build_finetune_loader(cfg, split, classes: int, img_size: int, rank: int = 0, world: int = 1):
    """(loader of mixed numpy batches for one rank, its ShardedBatchSampler)."""
    dataset = FinetuneDataset(split, TrainingTransform(cfg, img_size), cfg.train.seed)
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, seed=cfg.train.seed, rank=rank, world=world)
    collate = shared.FinetuneCollate(cfg.train.seed, rank, classes, shared.mixup_config(cfg))
    # threads: MindSpore's eager vision ops share the process-wide dataset seed, so decode serially
    return PretrainLoader(dataset, sampler, collate, num_workers=0), sampler


# ---------------------------------------------------------------------------------------- evaluation
def predict_logits(model):
    """images (b,3,S,S) numpy -> float32 logits (b,C) numpy of `model` (set to eval mode by the caller)."""
    def predict(images: np.ndarray) -> np.ndarray:
        return model(Tensor(np.ascontiguousarray(images, np.float32))).asnumpy().astype(np.float32)
    return predict


def _sum_over_ranks(array: np.ndarray) -> np.ndarray:
    if not dist_utils.is_distributed():
        return array
    return dist_utils.all_reduce_mean(array) * dist_utils.get_world_size()


# ---------------------------------------------------------------------------------------- run
def run_finetune(cfg) -> Dict:
    """Fine-tune (or resume) as `cfg` (a core.config.FinetuneConfig) says. Returns the loop's
    result plus "eval" (the last evaluation's metrics with "best_acc1")."""
    rank, world, _ = dist_utils.init_distributed(cfg.train.device)
    train_split, val_split, classes = shared.training_splits(cfg)
    out = os.path.abspath(cfg.train.output_dir)
    os.makedirs(out, exist_ok=True)
    use_jit = cfg.train.compile is not False
    ms.set_seed(int(cfg.train.seed))
    loop.seed_host(cfg.train.seed)
    model = build_classifier(cfg, classes)
    optimizer = build_optimizer(model, cfg, groups=finetune_groups(model, cfg))
    reducer = ms.nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=world) if world > 1 else None
    stepper = FinetuneStep(model, optimizer, seed=cfg.train.seed, accum=runs.accum_steps(cfg), reducer=reducer,
                           clip_grad=cfg.optim.clip_grad, use_jit=use_jit)
    img_size = model.spec.img_size
    loader, sampler = build_finetune_loader(cfg, train_split, classes, img_size, rank, world)
    best = shared.BestCheckpoint(ckpt, out, ckpt.EXT, rank == 0)
    last: Dict[str, float] = {}
    steps_per_epoch = runs.plan_steps(cfg, sampler.batches_per_epoch, runs.accum_steps(cfg))[0]

    def evaluate(step: int) -> Dict[str, float]:
        model.set_train(False)
        try:
            metrics = shared.evaluate_split(predict_logits(model), val_split, img_size,
                                            cfg.data.eval_batch_size or cfg.data.batch_size,
                                            cfg.data.eval_crop_fraction, _sum_over_ranks, rank, world)
        finally:
            model.set_train(True)
        last.clear()
        last.update(best.update(step, step // steps_per_epoch, metrics, model.export_state, cfg))
        return last

    result = loop.train(cfg, stepper, loader, sampler, ckpt, rank=rank, world=world,
                        on_cpu=ms.get_context("device_target") == "CPU", barrier=dist_utils.barrier,
                        any_rank=dist_utils.any_rank, evaluate=evaluate, eval_every_epochs=cfg.train.eval_every_epochs)
    result["eval"] = dict(last)
    result["best_checkpoint"] = best.path if best.best is not None else None
    return result


def evaluate_checkpoint(path: str, data: str, batch_size: int = 64, device: str = "auto") -> Dict[str, float]:
    """{"val_acc1", "val_acc5", "val_loss"} of a fine-tuned checkpoint on `data` (a folder with
    val/, or a folder of class folders), at the checkpoint's image size and evaluation crop."""
    dist_utils.init_distributed(device)
    payload = ckpt.load_checkpoint(path, require=("model", "config"))
    state = payload["model"]
    classes = int(np.asarray(state["head.weight"]).shape[0]) if "head.weight" in state else None
    cfg, split = shared.checkpoint_eval_split(path, data, payload["config"], classes)
    classes = classes if classes is not None else len(split.classes)
    spec = cfg.build_spec()
    model = CLASSIFIERS[spec.family][0](spec, classes, cfg.model.global_pool)
    ckpt.check_model_state(path, state, model.state_shapes())
    model.import_state(state)
    model.set_train(False)
    return shared.evaluate_split(predict_logits(model), split, spec.img_size, batch_size, cfg.data.eval_crop_fraction)
