"""Geometry of the frozen-encoder features both backends extract (docs/method.md#feature-maps).

An encoder used for features sees the whole image: a ViT keeps every patch (ids_keep = 0..N-1),
a Swin runs on the plan of an all-visible cell mask, which is the plain shifted-window Swin
forward. This module says what comes out, in numpy only, so the backends and the tests agree:

- ViT `feature_maps`: the patch tokens (cls dropped, no norm) after each tapped block as
  (B, D, g, g) maps, g = img_size / patch (stride p);
- ViT `pyramid`: those four maps rescaled by 4, 2, 1 and 0.5 (strides p/4, p/2, p, 2p; 4/8/16/32 for
  p = 16) by the simple feature pyramid, each (B, D, s g, s g);
- Swin `feature_maps`: each stage's output before its patch merging, (B, C 2^i, r_i, r_i) with
  r_i = img_size / (patch 2^i) (strides 4/8/16/32 for patch 4);
- `encode`: (B, D) for ViT (D = embed_dim), (B, C 2^(stages-1)) for Swin.

Shapes are (batch, channels, height, width); strides in pixels.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from localmim.core.swin_plan import SwinPlan, build_swin_plan

__all__ = ["POOLS", "PYRAMID_SCALES", "embedding_dim", "feature_map_shapes", "pyramid_shapes", "feature_strides",
           "full_vit_ids", "unmasked_swin_plan", "swin_raster_orders"]

POOLS = ("avg", "cls")            # ViT pooling of `encode`; Swin always averages
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


def embedding_dim(spec) -> int:
    """Width of `encode`'s output for a ViTSpec / SwinSpec."""
    return spec.embed_dim if spec.family == "vit" else spec.stage_dim(spec.num_stages - 1)


def feature_map_shapes(spec, batch: int = 1) -> List[Tuple[int, int, int, int]]:
    """(B, C, H, W) of each of the four maps `feature_maps` returns for a spec at its img_size."""
    if spec.family == "vit":
        return [(batch, spec.embed_dim, spec.grid, spec.grid) for _ in spec.taps]
    return [(batch, spec.stage_dim(i), spec.stage_resolution(i), spec.stage_resolution(i))
            for i in range(spec.num_stages)]


def pyramid_shapes(spec, batch: int = 1) -> List[Tuple[int, int, int, int]]:
    """(B, D, s g, s g) for s in PYRAMID_SCALES: the ViT simple feature pyramid's outputs."""
    if spec.family != "vit":
        raise ValueError(f"the simple feature pyramid is for ViT; {spec.name} is a Swin (its stages are the pyramid)")
    return [(batch, spec.embed_dim, int(spec.grid * s), int(spec.grid * s)) for s in PYRAMID_SCALES]


def feature_strides(spec) -> List[int]:
    """Pixels per map cell of the maps a detector gets: the ViT pyramid's or the Swin stages'."""
    if spec.family == "vit":
        return [int(spec.patch_size / s) for s in PYRAMID_SCALES]
    return [spec.patch_size * 2 ** i for i in range(spec.num_stages)]


def full_vit_ids(batch: int, num_patches: int) -> np.ndarray:
    """ids_keep (B, N) int64 = 0..N-1 on every row: a ViT encoder that keeps every patch in raster order."""
    return np.broadcast_to(np.arange(num_patches, dtype=np.int64), (batch, num_patches)).copy()


def unmasked_swin_plan(spec) -> SwinPlan:
    """The plan of a cell mask with nothing hidden: every token visible, one window per group."""
    return build_swin_plan(spec, np.zeros(spec.mask_grid ** 2, dtype=bool))


def swin_raster_orders(plan: SwinPlan) -> List[np.ndarray]:
    """Per stage (N_i,) int64: position in the stage's cell-major sequence of each raster cell, so
    `tokens[:, order]` lists a full stage's tokens in raster order (row * r + col)."""
    orders = []
    for stage in plan.stages:
        r = stage.resolution
        raster = stage.coords[:, 0] * r + stage.coords[:, 1]
        if raster.size != r * r or np.unique(raster).size != r * r:
            raise ValueError(f"stage {stage.index} of the plan is not fully visible ({raster.size} of {r * r} tokens)")
        orders.append(np.argsort(raster, kind="stable").astype(np.int64))
    return orders
