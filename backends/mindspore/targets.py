"""Reconstruction targets, per-scale masks and the LocalMIM loss in MindSpore (mirrors core.targets).

Twin of backends/torch/targets.py with the same function names and argument order. Functions
take ImageNet-normalised float NCHW images (mindspore Tensors) and return float32 Tensors; token
sequences are (B, L, C) in raster order of their grid. Everything uses static shapes and runs in
PyNative and under `ms.jit`.

HOG (docs/method.md#hog-targets): one reflect-padded Sobel pass for all scales (explicit
`ops.pad(..., 'reflect')`, since MindSpore convs have no reflect mode); each colour channel is a
separate 1-channel image; bin = floor(atan2(g0, g1) / pi * nbins) floor-mod nbins; histogram =
one_hot(bin) * magnitude; average pool per cell; L2 over the bins as v / max(||v||, 1e-12) (not
ops.L2Normalize, whose epsilon clamps the squared norm); features [R bins | G bins | B bins].
Gradients and bins repeat core.targets operation for operation in float32
(docs/method.md#zero-and-bin-edge-gradients): the Sobel sums are differences of equal-weight pixel
pairs added in a fixed order (no conv, whose summation order differs from PyTorch's and leaves +-1
ulp where the exact gradient is 0), and the bin is counted with comparisons against
`core.targets.bin_edge_cotangents` (no atan2). Internally the histogram is kept channels-last (B,
3, H, W, nbins) so that pooling and the token layout are plain reshapes.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from localmim.core.targets import bin_edge_cotangents

__all__ = [
    "scale_masks", "patchify", "unpatchify", "normalize_pixels", "pixel_targets", "sobel_kernel",
    "image_gradients", "orientation_bins", "hog_histogram", "hog_targets", "masked_mse", "localmim_loss",
    "HOGLayer",
]

_L2_EPS = 1e-12
_FLOAT32_TINY = 2.0 ** -126   # smallest normal float32; smaller gradient components count as 0


def _scale_factor(s):
    """('up', k) for an integer s >= 1, ('down', k) for s == 1/k; anything else is an error.

    core.targets.scale_factor states the same rule, but this runs inside ms.jit-compiled
    construct code, whose parser turns core's `round()` into a float shape; keep this form.
    """
    s = float(s)
    if s >= 1.0:
        if s != int(s):
            raise ValueError(f"scale_masks: scale {s} >= 1 must be an integer")
        return "up", int(s)
    k = int(round(1.0 / s)) if s > 0 else 0
    if k < 2 or abs(1.0 / k - s) > 1e-12:
        raise ValueError(f"scale_masks: scale {s} < 1 must be 1/k for an integer k")
    return "down", k


def scale_masks(mask, grid: int, scales: Sequence[float]) -> List[Tensor]:
    """Per-branch masks from the patch mask (docs/method.md#scale-masks).

    mask: (B, grid*grid) float or bool, 1 = masked, raster order. For an integer scale s >= 1
    each entry becomes an s x s block (nearest upsampling) -> (B, (s*grid)^2) binary; for s = 1/k
    the mask is averaged over k x k blocks -> (B, (grid/k)^2) fractional. Returns float32 Tensors.
    """
    if mask.ndim != 2 or mask.shape[1] != grid * grid:
        raise ValueError(f"scale_masks: mask must be (B, {grid * grid}) for grid {grid}, got {mask.shape}")
    b = mask.shape[0]
    m = mask.astype(ms.float32).reshape(b, grid, grid)
    out = []
    for s in scales:
        how, k = _scale_factor(s)
        if how == "up":
            fine = ops.broadcast_to(m.reshape(b, grid, 1, grid, 1), (b, grid, k, grid, k))
            out.append(fine.reshape(b, grid * k * grid * k))
        else:
            if grid % k:
                raise ValueError(f"scale_masks: scale {s} needs a grid divisible by {k}, got grid {grid}")
            g = grid // k
            out.append(m.reshape(b, g, k, g, k).mean(axis=(2, 4)).reshape(b, g * g))
    return out


def patchify(imgs, p: int):
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C); each token ordered (row, col, channel) as MAE."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"patchify: image {h}x{w} is not divisible into {p}-px cells")
    x = imgs.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p: int, channels: int = 3):
    """Inverse of `patchify` for square images: (B, g*g, p*p*C) -> (B, C, g*p, g*p)."""
    b, n, _ = x.shape
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"unpatchify: {n} tokens do not form a square grid")
    x = x.reshape(b, g, g, p, p, channels).transpose(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


def normalize_pixels(t, eps: float = 1e-6):
    """Per-token (t - mean) / sqrt(var + eps) over the last axis, unbiased variance (MAE norm_pix)."""
    n = t.shape[-1]
    mean = t.mean(axis=-1, keep_dims=True)
    centred = t - mean
    var = (centred * centred).sum(axis=-1, keepdims=True) / (n - 1)
    return centred / ops.sqrt(var + eps)


def pixel_targets(imgs, cells: Sequence[int], norm_pix: bool = True) -> List[Tensor]:
    """One (B, (H/c)^2, 3*c*c) float32 pixel target per cell size c."""
    imgs = imgs.astype(ms.float32)
    out = []
    for c in cells:
        t = patchify(imgs, int(c))
        out.append(normalize_pixels(t) if norm_pix else t)
    return out


def sobel_kernel() -> np.ndarray:
    """The reference HOG gradient kernels, (2, 1, 3, 3) float32 numpy (cross-correlation, docs/method.md#hog-targets).

    Channel 0: left column minus right column; channel 1: its transpose, top row minus bottom row.
    """
    k = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=np.float32)
    return np.stack([k, k.T])[:, None].copy()


def _sobel_sum(diff, axis: int):
    """(first + last) + 2 * middle of three neighbouring differences along `axis` (core order).

    axis is 2 (rows) or 3 (columns) of a 4-D tensor. The doubling is exact, so the result is the
    same bits with or without fused multiply-add.
    """
    n = diff.shape[axis] - 2
    if axis == 2:
        first, middle, last = diff[:, :, 0:n, :], diff[:, :, 1:n + 1, :], diff[:, :, 2:n + 2, :]
    else:
        first, middle, last = diff[:, :, :, 0:n], diff[:, :, :, 1:n + 1], diff[:, :, :, 2:n + 2]
    return (first + last) + 2.0 * middle


def image_gradients(imgs, bias=None):
    """Reflect-padded Sobel gradients of each colour channel: (B, C, H, W) -> (B, C, 2, H, W) float32.

    g0 = (d_top + d_bottom) + 2 d_middle with d = left pixel - right pixel of each row, g1 the
    same with columns (top minus bottom), exactly as core.targets.image_gradients; bias: optional
    (2,) added to (g0, g1).
    """
    b, c, h, w = imgs.shape
    x = ops.pad(imgs.astype(ms.float32).reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
    g0 = _sobel_sum(x[:, :, :, 0:w] - x[:, :, :, 2:w + 2], axis=2)
    g1 = _sobel_sum(x[:, :, 0:h, :] - x[:, :, 2:h + 2, :], axis=3)
    g = ops.stack([g0.reshape(b, c, h, w), g1.reshape(b, c, h, w)], axis=2)
    if bias is not None:
        g = g + bias.astype(ms.float32).reshape(1, 1, 2, 1, 1)
    return g


def orientation_bins(g0, g1, nbins: int):
    """Orientation bin (float32 integers 0..nbins-1, same shape) of each gradient, as
    core.targets.orientation_bins: subnormal components count as 0 (MindSpore's CPU kernels
    flush them anyway); g0 == 0 is bin 0; otherwise count the edges k with
    sign(g0) g1 <= |g0| cot(k pi / nbins) (one float32 product per edge)."""
    g0 = ops.select(ops.abs(g0) < _FLOAT32_TINY, ops.zeros_like(g0), g0)
    g1 = ops.select(ops.abs(g1) < _FLOAT32_TINY, ops.zeros_like(g1), g1)
    y = ops.abs(g0)
    x = ops.select(g0 < 0, -g1, g1)
    bins = ops.zeros_like(g0)
    for cot in bin_edge_cotangents(nbins).tolist():
        bins = bins + (x <= y * Tensor(cot, ms.float32)).astype(ms.float32)
    return ops.select(g0 == 0, ops.zeros_like(bins), bins)


def _histogram_last(grad, nbins: int):
    """(B, 3, 2, H, W) gradients -> (B, 3, H, W, nbins) one_hot(bin) * magnitude (channels-last)."""
    g0, g1 = grad[:, :, 0], grad[:, :, 1]
    mag = ops.sqrt(g0 * g0 + g1 * g1)
    bins = orientation_bins(g0, g1, nbins)
    ids = Tensor(np.arange(nbins, dtype=np.float32))
    onehot = (bins.expand_dims(-1) == ids).astype(ms.float32)
    return onehot * mag.expand_dims(-1)


def hog_histogram(grad, nbins: int):
    """Hard-binned orientation histogram per pixel: (B, 3, 2, H, W) -> (B, 3, nbins, H, W).

    Value = gradient magnitude at the pixel's bin, 0 elsewhere. Unsigned orientation over [0, pi).
    """
    return _histogram_last(grad, nbins).transpose(0, 1, 4, 2, 3)


def _pool_last(hist, cell: int):
    """Average pooling (kernel = stride = cell) of (B, 3, H, W, n) -> (B, 3, H/cell, W/cell, n)."""
    b, c, h, w, n = hist.shape
    if h % cell or w % cell:
        raise ValueError(f"hog_targets: image size {h}x{w} is not divisible by the HOG cell size {cell}")
    return hist.reshape(b, c, h // cell, cell, w // cell, cell, n).mean(axis=(3, 5))


def _pool_cells(hist, cells: Sequence[int]) -> list:
    """Pool (B, 3, H, W, n) per cell size; cells that are multiples of the finest reuse its pooling."""
    finest = min(cells)
    base = _pool_last(hist, finest)
    h, w = hist.shape[2], hist.shape[3]
    out = []
    for cell in cells:
        if cell == finest:
            out.append(base)
        elif cell % finest == 0 and h % cell == 0 and w % cell == 0:
            out.append(_pool_last(base, cell // finest))
        else:
            out.append(_pool_last(hist, cell))
    return out


def _hog_tokens(pooled):
    """(B, 3, h, w, nbins) -> L2 over bins per channel -> (B, h*w, 3*nbins) tokens."""
    b, c, h, w, n = pooled.shape
    norm = ops.sqrt((pooled * pooled).sum(axis=-1, keepdims=True))
    v = pooled / ops.maximum(norm, _L2_EPS)
    return v.transpose(0, 2, 3, 1, 4).reshape(b, h * w, c * n)


def hog_targets(imgs, cells: Sequence[int], nbins: int, biases=None) -> List[Tensor]:
    """HOG targets for every cell size from one gradient pass (docs/method.md#hog-targets).

    imgs: (B, 3, H, W) ImageNet-normalised; cells: cell size per branch (px); biases: optional
    (S, 2) Tensor or a sequence of S (2,) Tensors: scale k adds biases[k] to the shared unbiased
    gradient before binning. The filter is always the Sobel kernel (checkpoints are checked to
    hold it, core.state.check_hog_kernels). Returns a list of float32 (B, (H/c)*(W/c), 3*nbins).
    """
    cells = [int(c) for c in cells]
    grad = image_gradients(imgs)
    if biases is None:
        return [_hog_tokens(p) for p in _pool_cells(_histogram_last(grad, nbins), cells)]
    if len(biases) != len(cells):
        raise ValueError(f"hog_targets: {len(biases)} biases for {len(cells)} cell sizes")
    out = []
    for k, cell in enumerate(cells):
        shifted = grad + biases[k].astype(ms.float32).reshape(1, 1, 2, 1, 1)
        out.append(_hog_tokens(_pool_last(_histogram_last(shifted, nbins), cell)))
    return out


def masked_mse(pred, target, mask):
    """sum_i mask_i * mean_c (pred - target)^2 / sum_i mask_i, in float32 (docs/method.md#loss).

    pred, target: (B, L, C); mask: (B, L) weights (1 = masked). Returns a float32 scalar.
    """
    diff = pred.astype(ms.float32) - target.astype(ms.float32)
    err = (diff * diff).mean(axis=-1)
    mask = mask.astype(ms.float32)
    return (err * mask).sum() / mask.sum()


def localmim_loss(preds: Sequence, targets: Sequence, masks: Sequence):
    """(total, per_branch): per_branch (S,) float32 masked MSEs; total = their sum (weights 1)."""
    per_branch = ops.stack([masked_mse(p, t, m) for p, t, m in zip(preds, targets, masks)])
    return per_branch.sum(), per_branch


class _FrozenConv(nn.Cell):
    """Holds the HOG filter's `weight` (2, 1, 3, 3) and optional `bias` (2,), both frozen."""

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray]):
        super().__init__()
        self.weight = Parameter(Tensor(weight.astype(np.float32)), name="weight", requires_grad=False)
        self.has_bias = bias is not None
        if self.has_bias:
            self.bias = Parameter(Tensor(bias.astype(np.float32)), name="bias", requires_grad=False)
        else:
            self.bias = None

    def construct(self, x):
        """x: (N, 1, H, W) -> (N, 2, H, W) gradients with reflect padding 1, plus the bias.

        `weight` is kept for the checkpoint names and never convolved: `image_gradients` computes
        the Sobel filter in exact order."""
        if self.has_bias:
            return image_gradients(x, self.bias)[:, 0]
        return image_gradients(x)[:, 0]


class HOGLayer(nn.Cell):
    """Frozen gradient filter of one HOG scale: `conv` holds weight (2,1,3,3) = Sobel, optional bias (2).

    With bias=True the bias is drawn like PyTorch's default conv bias, U(-1/3, 1/3) (fan_in 9),
    from MindSpore's global seed. The layer only stores parameters (canonical names
    `hog_enc.{k}.conv.weight` / `.bias`): `LocalMIMViT.forward_targets` computes all scales at once.
    """

    def __init__(self, bias: bool = False):
        super().__init__()
        b = None
        if bias:
            b = ops.uniform((2,), Tensor(-1.0 / 3.0, ms.float32), Tensor(1.0 / 3.0, ms.float32)).asnumpy()
        self.conv = _FrozenConv(sobel_kernel(), b)

    def construct(self, x):
        return self.conv(x)
