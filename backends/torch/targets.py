"""Reconstruction targets, per-scale masks and the LocalMIM loss in PyTorch (mirrors core.targets).

All functions take ImageNet-normalised float NCHW images and return float32 tensors; token
sequences are (B, L, C) in raster order of their grid. Targets are meant to run under
`torch.no_grad()` with autocast disabled (`LocalMIMViT.forward_targets` does both).

HOG (docs/method.md#hog-targets): one reflect-padded Sobel pass for all scales; each colour
channel is a separate 1-channel image; orientation bin = floor(atan2(g0, g1) / pi * nbins) mod
nbins; histogram = one_hot(bin) * magnitude; average pool per cell; L2 normalisation over the bins (eps 1e-12);
features ordered [R bins | G bins | B bins]. Gradients and bins repeat core.targets operation for
operation in float32 (docs/method.md#zero-and-bin-edge-gradients): the Sobel sums are
differences of equal-weight pixel pairs added in a fixed order (no framework convolution, whose
summation order, TF32 mode and rounding vary by device and library), and the bin is counted
with comparisons against `core.targets.bin_edge_cotangents` (no atan2), so every device gives
the same bins as the numpy reference.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from localmim.core.targets import bin_edge_cotangents, scale_factor

_FLOAT32_TINY = 2.0 ** -126   # smallest normal float32; smaller gradient components count as 0

__all__ = [
    "scale_masks", "patchify", "unpatchify", "normalize_pixels", "pixel_targets", "sobel_kernel",
    "image_gradients", "orientation_bins", "hog_histogram", "hog_targets", "masked_mse", "localmim_loss",
    "HOGLayer",
]


def scale_masks(mask: torch.Tensor, grid: int, scales: Sequence[float]) -> List[torch.Tensor]:
    """Per-branch masks from the patch mask (docs/method.md#scale-masks).

    mask: (B, grid*grid) float, 1 = masked, raster order. For scale s >= 1 each entry becomes an
    s x s block (nearest upsampling) -> (B, (s*grid)^2) binary; for s < 1 the mask is averaged
    over (1/s) x (1/s) blocks -> (B, (s*grid)^2) fractional. Returns one float32 tensor per scale.
    """
    if mask.ndim != 2 or mask.shape[1] != grid * grid:
        raise ValueError(f"scale_masks: mask must be (B, {grid * grid}) for grid {grid}, got {tuple(mask.shape)}")
    m = mask.float().reshape(mask.shape[0], grid, grid)
    out = []
    for s in scales:
        how, k = scale_factor(s)
        if how == "up":
            out.append(m.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2).flatten(1))
        else:
            if grid % k:
                raise ValueError(f"scale_masks: scale {s} needs a grid divisible by {k}, got grid {grid}")
            out.append(F.avg_pool2d(m[:, None], k, k).flatten(1))
    return out


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, (H/p)*(W/p), p*p*3); each token is ordered (row, col, channel) as MAE."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"patchify: image {h}x{w} is not divisible into {p}-px cells")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for square images: (B, g*g, p*p*C) -> (B, C, g*p, g*p)."""
    b, n, _ = x.shape
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"unpatchify: {n} tokens do not form a square grid")
    x = x.reshape(b, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, g * p, g * p)


def normalize_pixels(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token (t - mean) / sqrt(var + eps) over the last axis, unbiased variance (MAE norm_pix)."""
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True, unbiased=True)
    return (t - mean) / (var + eps).sqrt()


def pixel_targets(imgs: torch.Tensor, cells: Sequence[int], norm_pix: bool = True) -> List[torch.Tensor]:
    """One (B, (H/c)^2, 3*c*c) float32 pixel target per cell size c."""
    imgs = imgs.float()
    out = []
    for c in cells:
        t = patchify(imgs, int(c))
        out.append(normalize_pixels(t) if norm_pix else t)
    return out


def sobel_kernel(dtype=torch.float32, device=None) -> torch.Tensor:
    """The reference HOG gradient kernels (2, 1, 3, 3) (cross-correlation, docs/method.md#hog-targets).

    Channel 0: left column minus right column; channel 1: its transpose, top row minus bottom row.
    """
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=dtype, device=device)
    return torch.stack([k, k.t().contiguous()])[:, None]


def _sobel_sum(diff: torch.Tensor, dim: int) -> torch.Tensor:
    """(first + last) + 2 * middle of three neighbouring differences along `dim` (core order).

    The doubling is exact, so the result is the same bits with or without fused multiply-add.
    """
    n = diff.shape[dim] - 2
    first, middle, last = (diff.narrow(dim, i, n) for i in range(3))
    return (first + last) + 2.0 * middle


def image_gradients(imgs: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reflect-padded Sobel gradients of each colour channel: (B, 3, H, W) -> (B, 3, 2, H, W) float32.

    g0 = (d_top + d_bottom) + 2 d_middle with d = left pixel - right pixel of each row, g1 the
    same with columns (top minus bottom), exactly as core.targets.image_gradients; bias: optional
    (2,) added to (g0, g1).
    """
    x = F.pad(imgs.float(), (1, 1, 1, 1), mode="reflect")            # (B, 3, H + 2, W + 2)
    g0 = _sobel_sum(x[..., :, :-2] - x[..., :, 2:], dim=-2)
    g1 = _sobel_sum(x[..., :-2, :] - x[..., 2:, :], dim=-1)
    g = torch.stack([g0, g1], dim=2)
    if bias is not None:
        g = g + bias.to(g.dtype).view(1, 1, 2, 1, 1)
    return g


@torch.compiler.assume_constant_result
def _edge_cotangents(nbins: int) -> tuple:
    """core.targets.bin_edge_cotangents as Python floats (float32 values: a float32 tensor times a
    Python scalar multiplies in float32). Not a tensor, so no host-to-device copy, which waits for
    the device, on every step; a constant of the compiled graph under torch.compile."""
    return tuple(bin_edge_cotangents(nbins).tolist())


def orientation_bins(g0: torch.Tensor, g1: torch.Tensor, nbins: int) -> torch.Tensor:
    """Orientation bin (int64, same shape, 0..nbins-1) of each gradient, as core.targets.orientation_bins.

    Subnormal components count as 0; g0 == 0 is bin 0; otherwise count the edges k with
    sign(g0) g1 <= |g0| cot(k pi / nbins) (one float32 product per edge, in a loop so that no
    (..., nbins - 1) float tensor is stored).
    """
    g0 = g0.masked_fill(g0.abs() < _FLOAT32_TINY, 0.0)
    g1 = g1.masked_fill(g1.abs() < _FLOAT32_TINY, 0.0)
    y = g0.abs()
    x = torch.where(g0 < 0, -g1, g1)
    bins = torch.zeros(g0.shape, dtype=torch.int64, device=g0.device)
    for cot in _edge_cotangents(nbins):
        bins += x <= y * cot
    return bins.masked_fill_(g0 == 0, 0)


def hog_histogram(grad: torch.Tensor, nbins: int) -> torch.Tensor:
    """Hard-binned orientation histogram per pixel: (B, 3, 2, H, W) -> (B, 3, nbins, H, W).

    Value = gradient magnitude at the pixel's `orientation_bins` bin, 0 elsewhere. Unsigned
    orientation over [0, pi).
    """
    g0, g1 = grad[:, :, 0], grad[:, :, 1]
    mag = torch.sqrt(g0 * g0 + g1 * g1)
    bins = orientation_bins(g0, g1, nbins)
    b, c, h, w = mag.shape
    hist = torch.zeros(b, c, nbins, h, w, dtype=mag.dtype, device=mag.device)
    return hist.scatter_(2, bins.unsqueeze(2), mag.unsqueeze(2))


def _pool_cells(hist: torch.Tensor, cells: Sequence[int]) -> List[torch.Tensor]:
    """Average-pool (B, 3, nbins, H, W) per cell size; nested cells reuse the finest pooling."""
    b, c, n, h, w = hist.shape
    flat = hist.reshape(b, c * n, h, w)
    finest = min(cells)
    base = F.avg_pool2d(flat, finest, finest)
    out = []
    for cell in cells:
        if cell == finest:
            pooled = base
        elif cell % finest == 0 and h % cell == 0 and w % cell == 0:
            pooled = F.avg_pool2d(base, cell // finest, cell // finest)
        else:
            pooled = F.avg_pool2d(flat, cell, cell)
        out.append(pooled.reshape(b, c, n, pooled.shape[-2], pooled.shape[-1]))
    return out


def _hog_tokens(pooled: torch.Tensor) -> torch.Tensor:
    """(B, 3, nbins, h, w) -> L2 over bins per channel -> (B, h*w, 3*nbins) tokens."""
    b, c, n, h, w = pooled.shape
    v = F.normalize(pooled, p=2.0, dim=2, eps=1e-12)
    return v.reshape(b, c * n, h * w).transpose(1, 2)


def hog_targets(imgs: torch.Tensor, cells: Sequence[int], nbins: int,
                biases: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """HOG targets for every cell size from one gradient pass (docs/method.md#hog-targets).

    imgs: (B, 3, H, W) ImageNet-normalised; cells: cell size per branch (px); biases: optional
    (S, 2), scale k adds biases[k] to the gradient before binning. The filter is always the Sobel
    kernel (checkpoints are checked to hold it, core.state.check_hog_kernels). Returns a list of
    float32 (B, (H/c)*(W/c), 3*nbins).
    """
    imgs = imgs.float()
    grad = image_gradients(imgs)
    if biases is None:
        return [_hog_tokens(p) for p in _pool_cells(hog_histogram(grad, nbins), cells)]
    if biases.shape[0] != len(cells):
        raise ValueError(f"hog_targets: {biases.shape[0]} biases for {len(cells)} cell sizes")
    out = []
    for k, cell in enumerate(cells):
        shifted = grad + biases[k].to(grad.dtype).view(1, 1, 2, 1, 1)
        out.append(_hog_tokens(_pool_cells(hog_histogram(shifted, nbins), [cell])[0]))
    return out


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i mask_i * mean_c (pred - target)^2 / sum_i mask_i, in float32 (docs/method.md#loss).

    pred, target: (B, L, C); mask: (B, L) weights (1 = masked). Returns a float32 scalar.
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.float()
    return (err * mask).sum() / mask.sum()


def localmim_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor]):
    """(total, per_branch): per_branch (S,) float32 masked MSEs; total = their sum (weights 1)."""
    with torch.autocast(device_type=preds[0].device.type, enabled=False):
        per_branch = torch.stack([masked_mse(p, t, m) for p, t, m in zip(preds, targets, masks)])
        return per_branch.sum(), per_branch


class HOGLayer(nn.Module):
    """Frozen gradient filter of one HOG scale: `conv` holds weight (2,1,3,3) = Sobel, optional bias (2).

    The bias, when present, is drawn like PyTorch's default conv bias, U(-1/3, 1/3) (fan_in 9).
    `conv` is kept for the checkpoint names `hog_enc.{k}.conv.weight` / `.bias`; its weight is
    never convolved (`image_gradients` computes the Sobel filter in exact order).
    `LocalMIMModel.forward_targets` computes all scales at once.
    """

    def __init__(self, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, stride=1, padding=1, padding_mode="reflect", bias=bias)
        with torch.no_grad():
            self.conv.weight.copy_(sobel_kernel())
        for p in self.conv.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, H, W) -> (N, 2, H, W) gradients (reflect padding) plus the bias."""
        return image_gradients(x, self.conv.bias)[:, 0]
