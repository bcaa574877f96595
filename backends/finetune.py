"""Fine-tuning pieces both backends share (numpy + PIL only; docs/method.md#fine-tuning).

- `training_splits(cfg)`: the labelled train / val splits of a run (backends/labelled.py) and its
  number of classes;
- `FinetuneCollate`: a training batch mixed on the host (core/mixup.py), so both backends see the
  same images and soft targets and a resumed run the same batches: {"images" (B,3,S,S) float32,
  "targets" (B,C) float32, "labels" (B,) int64, "key" (2,) int64 (epoch, batch index)};
- `evaluate_split`: top-1 / top-5 / loss of a model over a split, each rank on its own shard,
  the sums reduced over ranks, so distributed evaluation gives one process's numbers;
- `BestCheckpoint`: `checkpoint-best<ext>`, the model of the best val_acc1 so far.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from localmim.backends import labelled
from localmim.backends.runs import config_to_dict
from localmim.core import mixup as core_mixup
from localmim.core import param_groups
from localmim.core.metrics import EvalSums

__all__ = ["build_classifier", "read_encoder", "layer_decay_groups", "training_splits", "checkpoint_eval_split", "mixup_config",
           "FinetuneCollate", "shard_split", "evaluate_split", "BestCheckpoint", "BEST_NAME"]

BEST_NAME = "checkpoint-best"


def build_classifier(cfg, num_classes: int, classifiers: Mapping[str, Tuple[type, Callable]]):
    """The classifier of cfg.model: classifiers maps a family ("vit", "swin") to a backend's
    (classifier class, loader). Its encoder comes from model.pretrained (at the config's size) or,
    without one, is freshly initialised from the spec."""
    m = cfg.model
    spec = cfg.build_spec()
    classifier, load_classifier = classifiers[spec.family]
    if m.pretrained:
        return load_classifier(os.path.expanduser(m.pretrained), num_classes, m.global_pool, m.drop_path,
                               img_size=spec.img_size)
    return classifier(spec, num_classes, m.global_pool, m.drop_path)


def read_encoder(path: str, family: str, img_size: Optional[int] = None, layout: Optional[str] = None, **arch):
    """(spec, canonical state) of a pretrained file of any layout (backends/weights.py), its
    position tables resampled to img_size when given; a file of another family than `family`
    ("vit" or "swin") raises a ValueError naming it."""
    from localmim.backends.weights import read_pretrained
    if img_size is not None:
        arch["img_size"] = int(img_size)
    spec, canonical, _ = read_pretrained(path, layout, **arch)
    if spec.family != family:
        raise ValueError(f"{path} holds a {spec.family} encoder ({spec.name}); a {family} classifier needs a "
                         f"{family} one")
    return spec, canonical


def layer_decay_groups(shapes: Dict[str, tuple], frozen: Sequence[str], spec, cfg):
    """core.param_groups.finetune_param_groups of a classifier's {name: shape} (parameter
    order): layer-wise lr decay cfg.optim.layer_decay, the fine-tuning weight-decay exclusions."""
    depth = spec.depth if spec.family == "vit" else tuple(spec.depths)
    return param_groups.finetune_param_groups(shapes, cfg.optim.weight_decay, cfg.optim.layer_decay, spec.family,
                                              depth, frozen=frozen)


def training_splits(cfg) -> Tuple[labelled.LabelledSplit, labelled.LabelledSplit, int]:
    """(train, val, num_classes) of a fine-tuning config: data.path/{train,val} or data.train and
    data.val. Raises LabelledDataError (one sentence naming the folder) for a missing split, a
    class missing from val/, or model.num_classes that disagrees with the class folders."""
    d = cfg.data
    if d.train or d.val:
        if not (d.train and d.val):
            raise labelled.LabelledDataError("data.train and data.val go together (--train DIR --val DIR); "
                                             f"got train={d.train!r} val={d.val!r}")
        train = labelled.list_class_folder(os.path.expanduser(d.train))
        val = labelled.list_class_folder(os.path.expanduser(d.val), train.classes)
    elif d.path:
        train, val = labelled.train_val_splits(os.path.expanduser(d.path))
    else:
        raise labelled.LabelledDataError("no labelled data: pass --data DIR (with train/ and val/ class folders) "
                                         "or --train DIR --val DIR")
    classes = len(train.classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != classes:
        raise labelled.LabelledDataError(f"model.num_classes = {cfg.model.num_classes} but {train.root} holds "
                                         f"{classes} class folders")
    return train, val, classes


def checkpoint_eval_split(path: str, data: str, config: Dict, classes: Optional[int]):
    """(FinetuneConfig, split) for scoring a fine-tuned checkpoint: its saved config and the
    class folders of data/val (or of `data` itself); `classes` (the head's rows) must match them."""
    from localmim.core.config import config_from_dict
    cfg = config_from_dict(config, where=f"checkpoint {path} config", kind="finetune")
    folder = os.path.join(data, "val") if os.path.isdir(os.path.join(data, "val")) else data
    split = labelled.list_class_folder(folder)
    if classes is not None and len(split.classes) != classes:
        raise labelled.LabelledDataError(f"{folder} holds {len(split.classes)} class folders but checkpoint {path} "
                                         f"classifies {classes} classes")
    return cfg, split


def mixup_config(cfg) -> core_mixup.MixupConfig:
    x = cfg.mixup
    return core_mixup.MixupConfig(mixup_alpha=x.mixup, cutmix_alpha=x.cutmix, prob=x.prob,
                                  switch_prob=x.switch_prob, smoothing=x.smoothing)


class FinetuneCollate:
    """Items (image (3,S,S), label, epoch, batch index) -> the fine-tuning batch (module docstring).

    The mixing draw of a batch comes from core.mixup.mix_rng(seed, epoch, batch index, rank). A
    backend overrides `stack` (its per-sample images -> a numpy batch) and `wrap` (numpy -> its
    tensors).
    """

    def __init__(self, seed: int, rank: int, classes: int, mix: core_mixup.MixupConfig):
        self.seed, self.rank, self.classes, self.mix = int(seed), int(rank), int(classes), mix

    def stack(self, images) -> np.ndarray:
        return np.stack(images).astype(np.float32, copy=False)

    def wrap(self, array: np.ndarray):
        return array

    def __call__(self, items) -> Dict:
        images = self.stack([it[0] for it in items])
        labels = np.asarray([it[1] for it in items], np.int64)
        epoch, batch_index = int(items[0][2]), int(items[0][3])
        rng = core_mixup.mix_rng(self.seed, epoch, batch_index, self.rank)
        images, targets = core_mixup.mix_batch(images, labels, self.classes, self.mix, rng)
        return {"images": self.wrap(np.ascontiguousarray(images)), "targets": self.wrap(targets),
                "labels": self.wrap(labels), "key": self.wrap(np.asarray([epoch, batch_index], np.int64))}


def shard_split(split: labelled.LabelledSplit, rank: int, world: int) -> labelled.LabelledSplit:
    """Samples rank, rank + world, ... of a split: disjoint shards that together hold it once."""
    if world == 1:
        return split
    return labelled.LabelledSplit(split.root, split.paths[rank::world], split.labels[rank::world], split.classes)


def evaluate_split(predict: Callable[[np.ndarray], np.ndarray], split: labelled.LabelledSplit, img_size: int,
                   batch_size: int, crop_fraction: float = labelled.EVAL_CROP_FRACTION,
                   sum_over_ranks: Callable[[np.ndarray], np.ndarray] = lambda x: x, rank: int = 0,
                   world: int = 1, workers: int = 0) -> Dict[str, float]:
    """{"val_acc1", "val_acc5" (percent), "val_loss"} of predict(images (b,3,S,S)) -> logits (b,C)
    over `split` with the evaluation transform (resize S / crop_fraction, bicubic, centre crop S).
    Each rank scores its shard; sum_over_ranks (the backend's all-reduce sum) combines them."""
    sums = EvalSums()
    transform = labelled.EvalTransform(img_size, crop_fraction)
    for images, labels in labelled.eval_batches(shard_split(split, rank, world), transform, batch_size, workers):
        sums.add(predict(images), labels)
    return sums.load_array(sum_over_ranks(sums.as_array())).metrics()


class BestCheckpoint:
    """`checkpoint-best<ext>` of a run: after each evaluation, when val_acc1 beats every earlier
    one (resumed runs read the earlier ones from log.jsonl), rank 0 writes {"model", "step",
    "epoch", "config"} with the backend's atomic save (no optimizer state: it is for
    evaluation and export; resuming uses the step checkpoints)."""

    def __init__(self, ckpt, out: str, ext: str, main: bool):
        self.ckpt, self.path, self.main = ckpt, os.path.join(out, BEST_NAME + ext), main
        self.best = self._best_logged(os.path.join(out, "log.jsonl"))

    @staticmethod
    def _best_logged(log_path: str) -> Optional[float]:
        best = None
        if os.path.exists(log_path):
            with open(log_path) as f:
                for line in f:
                    try:
                        acc = float(json.loads(line)["val_acc1"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    best = acc if best is None else max(best, acc)
        return best

    def update(self, step: int, epoch: int, metrics: Dict[str, float], model_state: Callable[[], Dict],
               cfg) -> Dict[str, float]:
        """metrics plus "best_acc1"; writes the checkpoint when val_acc1 is a new best."""
        acc = float(metrics["val_acc1"])
        if self.best is None or acc > self.best:
            self.best = acc
            if self.main:
                self.ckpt.save_checkpoint(self.path, {
                    "model": model_state(), "optimizer": {}, "scaler": None, "step": int(step), "epoch": int(epoch),
                    "config": config_to_dict(cfg)})
        return dict(metrics, best_acc1=self.best)
