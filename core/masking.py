"""Random masks, sampled in numpy so that both backends see exactly the same ones.

A mask is drawn from a generator seeded by (seed, epoch, step, rank): a resumed run reproduces
the uninterrupted one, and every rank draws its own masks.

ViT (docs/method.md#vit-masking, MAE): per-sample argsort of uniform noise; the `K = floor(N (1 - r))`
tokens with the smallest noise are kept, in shuffled order.
Swin (docs/method.md#swin-masking): one cell mask per batch and rank, `floor(r L) + 1` of the L cells masked.

Convention everywhere: 1 / True = masked (removed), 0 / False = visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import numpy as np

__all__ = ["mask_rng", "num_keep", "num_masked_cells", "VitMask", "vit_mask", "swin_cell_mask"]

_FLOAT_SLACK = 1e-9


def _check_index(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"mask seed component {name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_ratio(ratio) -> float:
    if isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"mask ratio must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


def _floor(x: float) -> int:
    """floor(x), except that a value within 1e-9 of an integer counts as that integer.

    Guards products such as 100 * (1 - 0.9) = 9.999999999999998, which Python's int()
    (as used by the reference) would truncate to 9.
    """
    nearest = round(x)
    return int(nearest) if abs(x - nearest) < _FLOAT_SLACK else int(math.floor(x))


def mask_rng(seed: int, epoch: int, step: int, rank: int) -> np.random.Generator:
    """The generator for one batch's masks: `np.random.default_rng([seed, epoch, step, rank])`.

    All four arguments must be non-negative integers; `step` is the data iteration (micro-batch)
    index within the epoch.
    """
    key = [_check_index(n, v) for n, v in (("seed", seed), ("epoch", epoch), ("step", step), ("rank", rank))]
    return np.random.default_rng(key)


def num_keep(num_patches: int, ratio: float) -> int:
    """Visible tokens per sample for a ViT mask: floor(N * (1 - ratio)), e.g. 49 for 196 at 0.75."""
    ratio = _check_ratio(ratio)
    if not isinstance(num_patches, (int, np.integer)) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive integer, got {num_patches!r}")
    return _floor(num_patches * (1.0 - ratio))


def num_masked_cells(num_cells: int, ratio: float) -> int:
    """Masked cells of a Swin mask: floor(ratio * L) + 1 (reference quirk, 37 of 49 at 0.75)."""
    ratio = _check_ratio(ratio)
    return _floor(ratio * num_cells) + 1


@dataclass
class VitMask:
    """One batch's ViT masks.

    ids_keep: (B, K) int64, indices of the visible patches in shuffled order (MAE gather order).
    ids_restore: (B, N) int64, the inverse permutation of the shuffle; un-shuffles a sequence of
        [K visible, N - K mask tokens] back to raster order.
    mask: (B, N) float32, 1 = masked, 0 = visible, raster order.
    """
    ids_keep: np.ndarray
    ids_restore: np.ndarray
    mask: np.ndarray

    def as_dict(self) -> Dict[str, np.ndarray]:
        """{"ids_keep", "ids_restore", "mask"}: the `masks` argument of the ViT models."""
        return {"ids_keep": self.ids_keep, "ids_restore": self.ids_restore, "mask": self.mask}


def vit_mask(rng: np.random.Generator, batch: int, num_patches: int, ratio: float) -> VitMask:
    """Per-sample random masks, MAE style (docs/method.md#vit-masking).

    noise = rng.random((B, N)); ids_shuffle = argsort(noise) (stable, smallest noise kept);
    ids_restore = argsort(ids_shuffle); ids_keep = ids_shuffle[:, :K]; the mask is [0]*K + [1]*(N-K)
    in shuffled order, un-shuffled with ids_restore.

    Args:
        rng: generator, normally from `mask_rng`.
        batch: B >= 1.
        num_patches: N >= 1.
        ratio: fraction to mask, in [0, 1); must leave at least one visible token.
    Returns:
        VitMask with ids_keep (B, K) int64, ids_restore (B, N) int64, mask (B, N) float32.
    """
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"mask batch size must be a positive integer, got {batch!r}")
    keep = num_keep(num_patches, ratio)
    if keep < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible token out of {num_patches}")
    noise = rng.random((batch, num_patches))
    ids_shuffle = np.argsort(noise, axis=1, kind="stable").astype(np.int64)
    ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable").astype(np.int64)
    shuffled = np.ones((batch, num_patches), dtype=np.float32)
    shuffled[:, :keep] = 0.0
    mask = np.take_along_axis(shuffled, ids_restore, axis=1)
    return VitMask(ids_keep=np.ascontiguousarray(ids_shuffle[:, :keep]), ids_restore=ids_restore, mask=mask)


def swin_cell_mask(rng: np.random.Generator, mask_grid: int, ratio: float) -> np.ndarray:
    """One cell mask for a whole per-rank Swin batch (docs/method.md#swin-masking).

    The reference masks `randperm(L) <= floor(ratio * L)`, i.e. floor(ratio * L) + 1 cells
    (37 of 49 at 0.75); this reproduces that count with `rng.permutation(L)`.

    Args:
        rng: generator, normally from `mask_rng`.
        mask_grid: cells per side (7 for Swin at 224 px); L = mask_grid ** 2.
        ratio: in [0, 1).
    Returns:
        (L,) bool, True = masked, raster order of the cell grid.
    """
    if not isinstance(mask_grid, (int, np.integer)) or mask_grid < 1:
        raise ValueError(f"Swin mask_grid must be a positive integer, got {mask_grid!r}")
    cells = int(mask_grid) ** 2
    masked = num_masked_cells(cells, ratio)
    if masked >= cells:
        raise ValueError(
            f"Swin mask ratio {ratio} masks floor({ratio}*{cells})+1 = {masked} of {cells} cells, "
            f"leaving no visible cell; use a smaller ratio or a larger mask grid")
    return rng.permutation(cells) < masked
