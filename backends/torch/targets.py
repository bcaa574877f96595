"""Reconstruction targets, per-scale masks and the LocalMIM loss in PyTorch (mirrors core.targets).

All functions take ImageNet-normalised float NCHW images and return float32 tensors; token
sequences are (B, L, C) in raster order of their grid. Targets are meant to run under
`torch.no_grad()` with autocast disabled (`LocalMIMViT.forward_targets` does both).

HOG (spec §1.5): one reflect-padded Sobel pass for all scales; each colour channel is a separate
1-channel image; orientation bin = floor(atan2(g0, g1) / pi * nbins) mod nbins; histogram =
one_hot(bin) * magnitude; average pool per cell; L2 normalisation over the bins (eps 1e-12);
features ordered [R bins | G bins | B bins].
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from localmim.core.targets import scale_factor

__all__ = [
    "scale_masks", "patchify", "unpatchify", "normalize_pixels", "pixel_targets", "sobel_kernel",
    "image_gradients", "hog_histogram", "hog_targets", "masked_mse", "localmim_loss", "HOGLayer",
]


def scale_masks(mask: torch.Tensor, grid: int, scales: Sequence[float]) -> List[torch.Tensor]:
    """Per-branch masks from the patch mask (spec §1.6).

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
    """The reference HOG gradient kernels (2, 1, 3, 3) (cross-correlation, spec §1.5).

    Channel 0: left column minus right column; channel 1: its transpose, top row minus bottom row.
    """
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=dtype, device=device)
    return torch.stack([k, k.t().contiguous()])[:, None]


def image_gradients(imgs: torch.Tensor, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reflect-padded 3x3 gradients of each colour channel: (B, 3, H, W) -> (B, 3, 2, H, W).

    weight: (2, 1, 3, 3) (default the Sobel kernel); bias: optional (2,) added to both outputs.
    """
    b, c, h, w = imgs.shape
    if weight is None:
        weight = sobel_kernel(imgs.dtype, imgs.device)
    x = F.pad(imgs.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
    g = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return g.reshape(b, c, 2, h, w)


def hog_histogram(grad: torch.Tensor, nbins: int) -> torch.Tensor:
    """Hard-binned orientation histogram per pixel: (B, 3, 2, H, W) -> (B, 3, nbins, H, W).

    Value = gradient magnitude at the pixel's bin, 0 elsewhere. Unsigned orientation over [0, pi).
    """
    g0, g1 = grad[:, :, 0], grad[:, :, 1]
    mag = torch.sqrt(g0 * g0 + g1 * g1)
    theta = torch.atan2(g0, g1)
    bins = torch.remainder(torch.floor(theta / math.pi * nbins), nbins).long()
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
                weight: Optional[torch.Tensor] = None,
                biases: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """HOG targets for every cell size from one gradient pass (spec §1.5).

    imgs: (B, 3, H, W) ImageNet-normalised; cells: cell size per branch (px); weight: (2,1,3,3)
    gradient kernel (default Sobel); biases: optional (S, 2), scale k adds biases[k] to the
    gradient before binning. Returns a list of float32 (B, (H/c)*(W/c), 3*nbins).
    """
    imgs = imgs.float()
    grad = image_gradients(imgs, weight)
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
    """sum_i mask_i * mean_c (pred - target)^2 / sum_i mask_i, in float32 (spec §1.7).

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
    The layer only stores parameters: `LocalMIMViT.forward_targets` computes all scales at once.
    """

    def __init__(self, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, stride=1, padding=1, padding_mode="reflect", bias=bias)
        with torch.no_grad():
            self.conv.weight.copy_(sobel_kernel())
        for p in self.conv.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, H, W) -> (N, 2, H, W) gradients (reflect padding)."""
        return self.conv(x)
