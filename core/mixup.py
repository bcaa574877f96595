"""Mixup / CutMix of a fine-tuning batch with label smoothing folded into the soft targets (numpy
only; docs/method.md#fine-tuning).

The reference uses timm's `Mixup` in "batch" mode: one draw per batch decides whether the batch is
mixed (prob), whether by CutMix or Mixup (switch prob), and lambda ~ Beta(alpha, alpha); every image
is mixed with the batch in reverse order, CutMix pastes one box (its area corrects lambda), and
the targets are lambda * smooth(y) + (1 - lambda) * smooth(y reversed). This module does the same
on the host, before the batch reaches a framework, with the draws taken from a Generator seeded
per (seed, epoch, step): both backends then see identical images and targets, and a resumed run
the same batches as an uninterrupted one (timm draws from numpy's global state). The draws are
taken in timm's order, so with the same random stream the results equal timm's
(tests/torch/test_finetune.py checks it).

Shapes: images (B, C, H, W) float32, labels (B,) int64, targets (B, classes) float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = ["MixupConfig", "MixParams", "draw_mix_params", "smooth_one_hot", "mix_targets", "mix_images",
           "mix_batch", "mix_rng"]


@dataclass(frozen=True)
class MixupConfig:
    """timm's Mixup arguments of the "batch" mode (the reference's: 0.8, 1.0, 1.0, 0.5, 0.1)."""
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.prob > 0.0 and (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0)


@dataclass(frozen=True)
class MixParams:
    """One batch's draw: lam (after the CutMix area correction), and the CutMix box (rows yl:yh,
    columns xl:xh) or None for Mixup / no mixing (lam 1)."""
    lam: float
    box: Optional[Tuple[int, int, int, int]] = None


def mix_rng(seed: int, epoch: int, step: int, rank: int = 0) -> np.random.Generator:
    """The Generator of one batch's mixing draws (docs/method.md#seeding: keyed, not sequential)."""
    return np.random.default_rng([int(seed), 7, int(epoch), int(step), int(rank)])


def _cutmix_box(rng, height: int, width: int, lam: float) -> Tuple[Tuple[int, int, int, int], float]:
    """timm's rand_bbox + correct_lam: a box of side sqrt(1 - lam) times the image's, centred at a
    uniform pixel and clipped to the image; lam becomes 1 - box area / image area."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    yl, yh = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + (cut_h + 1) // 2, 0, height))
    xl, xh = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + (cut_w + 1) // 2, 0, width))
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(height * width)


def draw_mix_params(rng, cfg: MixupConfig, height: int, width: int) -> MixParams:
    """One batch's draw, in timm's order: rand < prob; rand < switch_prob (when both alphas are on);
    lam ~ Beta; for CutMix the box centre (row, then column). `rng` needs random(), beta(a, b),
    integers(lo, hi) (a numpy Generator)."""
    if not cfg.enabled or rng.random() >= cfg.prob:
        return MixParams(1.0)
    if cfg.mixup_alpha > 0.0 and cfg.cutmix_alpha > 0.0:
        use_cutmix = bool(rng.random() < cfg.switch_prob)
    else:
        use_cutmix = cfg.cutmix_alpha > 0.0
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if lam == 1.0:
        return MixParams(1.0)
    if not use_cutmix:
        return MixParams(lam)
    box, lam = _cutmix_box(rng, height, width, lam)
    return MixParams(lam, box)


def smooth_one_hot(labels: np.ndarray, classes: int, smoothing: float = 0.0) -> np.ndarray:
    """(B,) int -> (B, classes) float32: smoothing / classes everywhere, 1 - smoothing + that at the label."""
    off = smoothing / classes
    out = np.full((len(labels), classes), off, dtype=np.float32)
    out[np.arange(len(labels)), np.asarray(labels, np.int64)] = 1.0 - smoothing + off
    return out


def mix_targets(labels: np.ndarray, classes: int, lam: float, smoothing: float) -> np.ndarray:
    """(B, classes) float32: lam * smooth(y) + (1 - lam) * smooth(y reversed), computed as timm
    does (float32 products and sum)."""
    y = smooth_one_hot(labels, classes, smoothing)
    return (y * np.float32(lam) + y[::-1] * np.float32(1.0 - lam)).astype(np.float32)


def mix_images(images: np.ndarray, params: MixParams) -> np.ndarray:
    """A mixed copy of (B, C, H, W) images: the box pasted from the reversed batch (CutMix), or
    lam * x + (1 - lam) * x reversed (Mixup), or the images unchanged (lam 1)."""
    if params.lam == 1.0 and params.box is None:
        return images
    out = np.array(images, dtype=np.float32, copy=True)
    if params.box is not None:
        yl, yh, xl, xh = params.box
        out[:, :, yl:yh, xl:xh] = images[::-1, :, yl:yh, xl:xh]
        return out
    return (out * np.float32(params.lam) + images[::-1] * np.float32(1.0 - params.lam)).astype(np.float32)


def mix_batch(images: np.ndarray, labels: np.ndarray, classes: int, cfg: MixupConfig,
              rng) -> Tuple[np.ndarray, np.ndarray]:
    """(mixed images (B, C, H, W), soft targets (B, classes)) of one batch; without mixing, the
    smoothed one-hot targets (label-smoothing cross-entropy as a soft-target one). B must be even
    when mixing is enabled (timm's rule: every image has a distinct partner)."""
    if cfg.enabled and len(labels) % 2:
        raise ValueError(f"mixup / cutmix need an even batch size, got {len(labels)}")
    params = draw_mix_params(rng, cfg, images.shape[-2], images.shape[-1])
    return mix_images(images, params), mix_targets(labels, classes, params.lam, cfg.smoothing)
