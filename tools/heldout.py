"""Held-out evaluation of a pretrained model: its masked-region loss against predicting the mean.

The demo trains on the bundled sample photographs (tools.sample_images) less a few whole
photographs and all their tiles (`HELD_OUT_PHOTOS`), and measures on those:

- the model's loss: per branch, the masked MSE (core.targets.masked_mse) of its predictions,
  pooled over all held-out images (every masked cell of every image counts once, fractional mask
  weights at coarse ViT scales as in training);
- the baseline: per image and branch, predict that image's mean target vector (the mean over all
  of the image's cells at that branch) in every masked cell; the same pooled masked MSE.

Both are summed over branches as the training loss is (log.jsonl's `loss`). A ratio well under 1
means the model uses what it sees to predict what it does not; for normalised pixels the baseline
is close to 1 per branch, since each target cell has zero mean and unit variance.

The arithmetic (`masked_losses`, `mean_target_predictions`) is numpy only; `evaluate_images` runs a
backend through its inference module (`reconstruct(model, images, mask)`) on batches of images
masked as training masks them (`batch_mask`: mask_rng(seed, 0, b, 0) for batch b).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from localmim.core import masking
from localmim.core.targets import masked_mse

__all__ = [
    "HELD_OUT_PHOTOS", "HeldOutLoss", "is_held_out", "split_sample_images", "mean_target_predictions",
    "masked_losses", "batch_mask", "evaluate_images",
]

# Whole photographs (with all their 2x2 and 3x3 tiles) that the demo never trains on.
HELD_OUT_PHOTOS: Tuple[str, ...] = ("chelsea", "coffee")


@dataclass(frozen=True)
class HeldOutLoss:
    """Pooled masked losses over a set of images, per branch (finest scale first) and summed."""
    model: Tuple[float, ...]
    mean: Tuple[float, ...]
    images: int

    @property
    def model_total(self) -> float:
        return float(sum(self.model))

    @property
    def mean_total(self) -> float:
        return float(sum(self.mean))

    @property
    def ratio(self) -> float:
        """model_total / mean_total: under 1 when the model beats predicting the mean."""
        return self.model_total / self.mean_total

    def line(self) -> str:
        """The demo's summary line."""
        return f"held-out masked loss: {self.model_total:.4f} (predicting the mean: {self.mean_total:.4f})"

    def branch_line(self) -> str:
        parts = [f"b{k} {m:.3f}/{b:.3f}" for k, (m, b) in enumerate(zip(self.model, self.mean))]
        return (f"per branch, model/mean: {', '.join(parts)}; ratio {self.ratio:.2f} "
                f"on {self.images} held-out images")


# ----------------------------------------------------------------------------------------------
# The split of the sample photographs

def is_held_out(filename: str, photos: Sequence[str] = HELD_OUT_PHOTOS) -> bool:
    """Whether a sample-image file ('chelsea.png', 'chelsea_q2.png', 'chelsea_t8.png') comes from
    one of `photos`."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    return any(stem == p or (stem.startswith(p + "_") and stem[len(p) + 1:][:1] in ("q", "t")
                             and stem[len(p) + 2:].isdigit()) for p in photos)


def split_sample_images(folder: str, photos: Sequence[str] = HELD_OUT_PHOTOS) -> Tuple[str, List[str]]:
    """(training folder, held-out image paths) of the sample photographs in `folder`.

    The training folder, `<folder>_train` beside it, holds every image of `folder` that is not from
    `photos` (hard links, or copies where links fail); it is rebuilt in a temporary folder and
    renamed into place when its file list differs, so concurrent callers never see half of it.
    The held-out paths point into `folder`, sorted by name.
    """
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".png") and not n.startswith("."))
    held = [os.path.join(folder, n) for n in names if is_held_out(n, photos)]
    train_names = [n for n in names if not is_held_out(n, photos)]
    train = Path(str(folder).rstrip(os.sep) + "_train")
    if train.is_dir() and sorted(os.listdir(train)) == train_names:
        return str(train), held
    tmp = Path(tempfile.mkdtemp(prefix=".train.", dir=train.parent))
    try:
        for n in train_names:
            try:
                os.link(os.path.join(folder, n), tmp / n)
            except OSError:
                shutil.copyfile(os.path.join(folder, n), tmp / n)
        if train.exists():
            shutil.rmtree(train)
        os.replace(tmp, train)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(train), held


# ----------------------------------------------------------------------------------------------
# The arithmetic

def mean_target_predictions(target: np.ndarray) -> np.ndarray:
    """(B, L, C) targets -> (B, L, C): each image's mean target vector (over its L cells) in every cell."""
    t = np.asarray(target, dtype=np.float64)
    if t.ndim != 3:
        raise ValueError(f"targets must be (B, L, C), got {t.shape}")
    return np.broadcast_to(t.mean(axis=1, keepdims=True), t.shape)


def masked_losses(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                  masks: Sequence[np.ndarray]) -> Tuple[List[float], List[float]]:
    """(model, mean-baseline) masked MSEs per branch over a batch of images.

    preds, targets: per branch (B, L_k, C_k); masks: per branch (B, L_k) loss weights (1 = masked).
    Each is core.targets.masked_mse pooled over the batch: sum of mask x per-cell MSE over the sum
    of the mask.
    """
    if not (len(preds) == len(targets) == len(masks)):
        raise ValueError(f"got {len(preds)} predictions, {len(targets)} targets and {len(masks)} masks")
    model = [masked_mse(p, t, m) for p, t, m in zip(preds, targets, masks)]
    mean = [masked_mse(mean_target_predictions(t), t, m) for t, m in zip(targets, masks)]
    return model, mean


def batch_mask(spec, seed: int, index: int, batch: int, ratio: float):
    """The mask of held-out batch `index` for the backend's reconstruct, drawn as training draws
    them from core.masking.mask_rng(seed, 0, index, 0): ViT one VitMask of `batch` images (each its
    own mask), Swin one (L,) bool cell mask shared by the batch (a Swin plan is per batch)."""
    rng = masking.mask_rng(seed, 0, index, 0)
    if getattr(spec, "family", "vit") == "swin":
        return masking.swin_cell_mask(rng, spec.mask_grid, ratio)
    return masking.vit_mask(rng, batch, spec.num_patches, ratio)


def evaluate_images(inference, model, spec, paths: Sequence[str], seed: int = 0, ratio: float = 0.75,
                    batch_size: int = 8) -> HeldOutLoss:
    """Pooled held-out losses of `model` on the images at `paths`.

    inference: a backend's inference module (reconstruct); model, spec: from its load_model. Each
    image is resized (shorter side) and centre-cropped to spec.img_size as `localmim visualize`
    does; images go through in batches of `batch_size` in the order given, batch b masked with
    batch_mask(spec, seed, b, len(batch), ratio).
    """
    from localmim.tools.visualize import load_image, normalize_image

    if not paths:
        raise ValueError("no held-out images to evaluate")
    preds, targets, masks = [], [], []
    for b, start in enumerate(range(0, len(paths), batch_size)):
        chunk = paths[start:start + batch_size]
        images = np.concatenate([normalize_image(load_image(p, spec.img_size)) for p in chunk])
        out = inference.reconstruct(model, images, batch_mask(spec, seed, b, len(chunk), ratio))
        preds.append(out["preds"])
        targets.append(out["targets"])
        masks.append(out["masks"])

    def stacked(per_batch):
        return [np.concatenate([branches[k] for branches in per_batch]) for k in range(len(per_batch[0]))]

    model_l, mean_l = masked_losses(stacked(preds), stacked(targets), stacked(masks))
    return HeldOutLoss(tuple(model_l), tuple(mean_l), len(paths))
