"""Numpy reference implementations of the LocalMIM targets, per-scale masks and loss.

The backends' fast versions are tested against these. Conventions:

- images: float32 (B, 3, H, W), ImageNet-normalised (see IMAGENET_MEAN / IMAGENET_STD);
- token sequences: (B, L, C) in raster order of their grid;
- masks: 1 = masked (counted by the loss), 0 = visible.

HOG (docs/method.md#hog-targets): per colour channel, a 3x3 gradient filter with reflect padding 1
(cross-correlation: channel 0 = left minus right, channel 1 = top minus bottom), magnitude
m = sqrt(g0^2 + g1^2), orientation bin = floor(atan2(g0, g1) / pi * nbins) mod nbins (floor-mod,
so unsigned orientation over [0, pi)), histogram one_hot(bin) * m, average pooling over c x c
cells, L2 normalisation over the bins of each colour channel, then [R bins | G bins | B bins] per
cell.

The gradients and the bins are defined by exact float32 operations in a fixed order
(docs/method.md#zero-and-bin-edge-gradients), which the backends repeat operation for operation:
g0 = (d_top + d_bottom) + 2 d_middle with d = left pixel - right pixel of each of the three rows
(likewise g1 with columns), so a pixel whose left and right neighbours are equal gets g0 = +0
exactly and lands in bin 0; the bin is counted with comparisons against a float32 table of edge
cotangents instead of atan2 and floor, so an angle next to a bin edge lands on the same side in
every implementation.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD",
    "scale_masks", "patchify", "unpatchify", "normalize_pixels", "pixel_targets",
    "sobel_kernel", "sample_hog_bias", "image_gradients", "bin_edge_cotangents", "orientation_bins",
    "hog_histogram", "pool_cells",
    "l2_normalize_cells", "hog_targets", "masked_mse", "localmim_loss",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_L2_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# per-scale masks (docs/method.md#scale-masks, #swin-targets-and-loss)

def scale_factor(s) -> Tuple[str, int]:
    """('up', k) for an integer s >= 1, ('down', k) for s == 1/k with integer k >= 2."""
    s = float(s)
    if s >= 1.0 and s == int(s):
        return "up", int(s)
    if 0.0 < s < 1.0:
        k = round(1.0 / s)
        if abs(1.0 / k - s) < 1e-12:
            return "down", k
    raise ValueError(f"mask scale {s} unsupported: use an integer >= 1 or 1/k for an integer k")


def scale_masks(mask: np.ndarray, grid: int, scales: Sequence[float]) -> List[np.ndarray]:
    """Resample a patch-grid mask to each branch's output grid.

    Args:
        mask: (B, N) with N = grid * grid, raster order; float 0/1 or bool (True = masked).
        grid: patches per side.
        scales: per branch. An integer s >= 1 repeats each entry as an s x s block (nearest);
            s = 1/k averages k x k blocks, giving fractional values (0, .25, .5, .75, 1 for k = 2).
    Returns:
        list of float32 (B, (grid * s) ** 2) in raster order of the branch grid.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[1] != grid * grid:
        raise ValueError(f"mask must have shape (B, {grid * grid}) for grid {grid}, got {mask.shape}")
    b = mask.shape[0]
    square = mask.astype(np.float32).reshape(b, grid, grid)
    out = []
    for s in scales:
        how, k = scale_factor(s)
        if how == "up":
            fine = np.repeat(np.repeat(square, k, axis=1), k, axis=2)
        else:
            if grid % k:
                raise ValueError(f"mask scale {s} needs a grid divisible by {k}, got grid {grid}")
            g = grid // k
            fine = square.reshape(b, g, k, g, k).astype(np.float64).mean(axis=(2, 4)).astype(np.float32)
        out.append(np.ascontiguousarray(fine.reshape(b, -1)))
    return out


# --------------------------------------------------------------------------------------------
# pixel targets (docs/method.md#pixel-targets)

def patchify(imgs: np.ndarray, p: int) -> np.ndarray:
    """Cut images into p x p patches, MAE order.

    Args:
        imgs: (B, C, H, W) with H and W multiples of p.
        p: patch side in pixels.
    Returns:
        (B, (H/p) * (W/p), p * p * C); patches in raster order, features ordered
        (row-in-patch, col-in-patch, channel).
    """
    imgs = np.asarray(imgs)
    if imgs.ndim != 4:
        raise ValueError(f"patchify expects images of shape (B, C, H, W), got {imgs.shape}")
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the {p}-px patch/cell size")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 3, 5, 1)
    return np.ascontiguousarray(x.reshape(b, (h // p) * (w // p), p * p * c))


def unpatchify(tokens: np.ndarray, p: int, channels: int = 3, height: Optional[int] = None) -> np.ndarray:
    """Inverse of `patchify`.

    Args:
        tokens: (B, L, p * p * channels).
        p: patch side in pixels.
        channels: C.
        height: image height in pixels; None means a square image (L must be a square).
    Returns:
        (B, C, H, W).
    """
    tokens = np.asarray(tokens)
    b, n, f = tokens.shape
    if f != p * p * channels:
        raise ValueError(f"tokens have {f} features, expected p*p*C = {p * p * channels}")
    if height is None:
        gh = int(round(np.sqrt(n)))
        if gh * gh != n:
            raise ValueError(f"{n} tokens do not form a square grid; pass height")
    else:
        if height % p:
            raise ValueError(f"height {height} is not divisible by patch size {p}")
        gh = height // p
    if n % gh:
        raise ValueError(f"{n} tokens do not fill rows of {gh}")
    gw = n // gh
    x = tokens.reshape(b, gh, gw, p, p, channels).transpose(0, 5, 1, 3, 2, 4)
    return np.ascontiguousarray(x.reshape(b, channels, gh * p, gw * p))


def normalize_pixels(t: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-token normalisation (MAE norm_pix_loss): (t - mean) / sqrt(var + eps) over the last axis.

    var is the unbiased variance (divisor n - 1), as torch.var's default. Computed in float64,
    returned in t's dtype. Shape unchanged.
    """
    t = np.asarray(t)
    if t.shape[-1] < 2:
        raise ValueError(f"normalize_pixels needs at least 2 values per token, got {t.shape[-1]}")
    x = t.astype(np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, ddof=1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps)).astype(t.dtype)


def pixel_targets(imgs: np.ndarray, cells: Sequence[int], norm_pix: bool) -> List[np.ndarray]:
    """Pixel targets for each branch: patchify the normalised image with each cell size.

    Args:
        imgs: float32 (B, 3, H, W).
        cells: pixels per target token side, per branch (e.g. [8, 16, 32, 32] for Swin).
        norm_pix: normalise each token by its own mean and unbiased std.
    Returns:
        list of float32 (B, (H/c) * (W/c), 3 * c * c).
    """
    imgs = np.asarray(imgs, dtype=np.float32)
    out = []
    for c in cells:
        t = patchify(imgs, int(c))
        out.append(normalize_pixels(t) if norm_pix else t)
    return out


# --------------------------------------------------------------------------------------------
# HOG targets (docs/method.md#hog-targets)

def sobel_kernel() -> np.ndarray:
    """The HOG gradient filter, (2, 1, 3, 3) float32 (PyTorch Conv2d weight layout).

    Channel 0: [[1, 0, -1], [2, 0, -2], [1, 0, -1]] (left minus right);
    channel 1: its transpose (top minus bottom). Applied as cross-correlation.
    """
    k = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float32)
    return np.stack([k, k.T])[:, None, :, :].copy()


def sample_hog_bias(rng: np.random.Generator, num_scales: int) -> np.ndarray:
    """Frozen random gradient biases, one 2-vector per scale: (S, 2) float32 from U(-1/3, 1/3).

    This is PyTorch's default bias init for the 3x3 one-channel conv (fan_in 9), which the
    reference's `--hog_bias` draws once per run.
    """
    if not isinstance(num_scales, (int, np.integer)) or num_scales < 1:
        raise ValueError(f"num_scales must be a positive integer, got {num_scales!r}")
    return rng.uniform(-1.0 / 3.0, 1.0 / 3.0, size=(num_scales, 2)).astype(np.float32)


def _check_images(imgs: np.ndarray) -> np.ndarray:
    imgs = np.asarray(imgs)
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {imgs.shape}")
    if imgs.shape[2] < 2 or imgs.shape[3] < 2:
        raise ValueError(f"reflect padding needs images of at least 2x2 pixels, got {imgs.shape[2:]}")
    return imgs


def _sobel_sum(diff: np.ndarray, axis: int) -> np.ndarray:
    """(first + last) + 2 * middle of three neighbouring differences along `axis`, in float32.

    diff has 2 more entries along `axis` than the result. This order of operations is part of
    the definition: the doubling is exact, so each output is two correctly rounded additions of
    fixed operands and comes out bit for bit the same in every IEEE float32 implementation
    (fused multiply-add included).
    """
    n = diff.shape[axis] - 2
    first, middle, last = (np.take(diff, np.arange(i, i + n), axis=axis) for i in range(3))
    return (first + last) + np.float32(2.0) * middle


def image_gradients(imgs: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-channel gradients of the HOG filter (`sobel_kernel`), in exact-order float32.

    Args:
        imgs: (B, 3, H, W), cast to float32.
        bias: optional (2,) added to channels (g0, g1) (the reference's frozen conv bias).
    Returns:
        float32 (B, 3, 2, H, W) with reflect padding 1 (edge pixel not repeated):
        [:, :, 0] = left minus right: with d_r = x[r, j-1] - x[r, j+1] for r = i-1, i, i+1,
        g0 = (d_{i-1} + d_{i+1}) + 2 d_i; [:, :, 1] = top minus bottom, the same with rows and
        columns swapped; then + bias. Each step is one float32 operation in this order
        (docs/method.md#zero-and-bin-edge-gradients): equal neighbours give exactly +0.
    """
    imgs = _check_images(imgs).astype(np.float32)
    padded = np.pad(imgs, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    left_minus_right = padded[:, :, :, :-2] - padded[:, :, :, 2:]     # (B, 3, H + 2, W)
    top_minus_bottom = padded[:, :, :-2, :] - padded[:, :, 2:, :]     # (B, 3, H, W + 2)
    grad = np.stack([_sobel_sum(left_minus_right, axis=2), _sobel_sum(top_minus_bottom, axis=3)], axis=2)
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32)
        if bias.shape != (2,):
            raise ValueError(f"HOG gradient bias must have shape (2,), got {bias.shape}")
        grad = grad + bias.reshape(1, 1, 2, 1, 1)
    return grad


def bin_edge_cotangents(nbins: int) -> np.ndarray:
    """cot(k pi / nbins) for the inner bin edges k = 1 .. nbins - 1, float32 (nbins - 1,).

    Rounded once from float64; the table is exactly antisymmetric (entry nbins - k = -entry k),
    the edge at pi/2 (even nbins) is exactly 0 and the one at pi/4 exactly 1, so edges that
    integer gradients can hit are represented exactly.
    """
    if not isinstance(nbins, (int, np.integer)) or nbins < 1:
        raise ValueError(f"HOG nbins must be a positive integer, got {nbins!r}")
    out = np.zeros(nbins - 1, dtype=np.float32)
    for k in range(1, (nbins + 1) // 2):
        out[k - 1] = np.float32(1.0 / np.tan(k * np.pi / nbins))
        out[nbins - k - 1] = -out[k - 1]
    return out


def _flush_subnormal(g: np.ndarray) -> np.ndarray:
    """g with every |g| < 2^-126 (float32 subnormals) replaced by +0."""
    return np.where(np.abs(g) < np.finfo(np.float32).tiny, np.float32(0.0), g)


def orientation_bins(g0: np.ndarray, g1: np.ndarray, nbins: int) -> np.ndarray:
    """Unsigned orientation bin of each gradient (g0, g1): int64, same shape, values 0..nbins-1.

    The bin of floor(atan2(g0, g1) / pi * nbins) mod nbins, decided without atan2
    (docs/method.md#zero-and-bin-edge-gradients): subnormal components (|g| < 2^-126) count as 0,
    as hardware that flushes subnormals sees them; g0 == 0 (theta = 0 or +-pi, or a zero
    gradient) is bin 0; otherwise fold (g0, g1) into the upper half-plane, y = |g0| and
    x = sign(g0) * g1, and count the edges k = 1..nbins-1 with x <= y * cot(k pi / nbins), each
    product one float32 multiplication by the `bin_edge_cotangents` table. So an angle exactly on
    an edge belongs to the upper bin, and the result depends on no transcendental function.
    """
    g0 = _flush_subnormal(np.asarray(g0, dtype=np.float32))
    g1 = _flush_subnormal(np.asarray(g1, dtype=np.float32))
    y = np.abs(g0)
    x = np.where(g0 < 0, -g1, g1)
    bins = np.zeros(g0.shape, dtype=np.int64)
    for cot in bin_edge_cotangents(nbins):
        bins += x <= y * cot
    return np.where(g0 == 0, 0, bins)


def hog_histogram(grad: np.ndarray, nbins: int) -> np.ndarray:
    """Per-pixel orientation histogram one_hot(bin) * magnitude.

    Args:
        grad: (B, 3, 2, H, W) from `image_gradients` (cast to float32).
        nbins: orientation bins over [0, pi).
    Returns:
        float32 (B, 3, nbins, H, W), zero except the magnitude m = sqrt(g0^2 + g1^2) at each
        pixel's `orientation_bins` bin.
    """
    grad = np.asarray(grad, dtype=np.float32)
    if grad.ndim != 5 or grad.shape[2] != 2:
        raise ValueError(f"gradients must have shape (B, 3, 2, H, W), got {grad.shape}")
    if not isinstance(nbins, (int, np.integer)) or nbins < 1:
        raise ValueError(f"HOG nbins must be a positive integer, got {nbins!r}")
    g0, g1 = grad[:, :, 0], grad[:, :, 1]
    mag = np.sqrt(g0 * g0 + g1 * g1)
    bins = orientation_bins(g0, g1, nbins)
    onehot = bins[:, :, None, :, :] == np.arange(nbins).reshape(1, 1, nbins, 1, 1)
    return (onehot * mag[:, :, None, :, :]).astype(np.float32)


def pool_cells(x: np.ndarray, cell: int) -> np.ndarray:
    """Average pooling with kernel = stride = cell over the last two axes.

    Args:
        x: (..., H, W) with H and W multiples of cell.
    Returns:
        float32 (..., H/cell, W/cell), accumulated in float64.
    """
    h, w = x.shape[-2:]
    if h % cell or w % cell:
        raise ValueError(f"image size {h}x{w} is not divisible by the HOG cell size {cell}")
    lead = x.shape[:-2]
    v = x.astype(np.float64).reshape(*lead, h // cell, cell, w // cell, cell)
    return v.mean(axis=(-3, -1)).astype(np.float32)


def l2_normalize_cells(hist: np.ndarray, axis: int = 2) -> np.ndarray:
    """v / max(||v||_2, 1e-12) along `axis` (torch.nn.functional.normalize), float32."""
    v = hist.astype(np.float64)
    norm = np.sqrt((v * v).sum(axis=axis, keepdims=True))
    return (v / np.maximum(norm, _L2_EPS)).astype(np.float32)


def _hog_tokens(hist: np.ndarray, cell: int) -> np.ndarray:
    """(B, 3, nbins, H, W) histogram -> (B, (H/c) * (W/c), 3 * nbins) normalised cell tokens."""
    pooled = l2_normalize_cells(pool_cells(hist, cell), axis=2)
    b, c, nb, gh, gw = pooled.shape
    return np.ascontiguousarray(pooled.reshape(b, c * nb, gh * gw).transpose(0, 2, 1))


def hog_targets(imgs: np.ndarray, cells: Sequence[int], nbins: int,
                biases: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """HOG targets for each branch.

    The gradient pass runs once for all scales. Without biases the histogram is also computed
    once and pooled per cell size; with biases, scale k adds biases[k] to the shared unbiased
    gradient before binning.

    Args:
        imgs: (B, 3, H, W) ImageNet-normalised images.
        cells: cell side in pixels per branch (e.g. [4, 8, 16, 32]); H and W must divide by each.
        nbins: orientation bins.
        biases: optional (S, 2) per-scale gradient biases, S = len(cells).
    Returns:
        list of float32 (B, (H/c) * (W/c), 3 * nbins): per cell [R bins | G bins | B bins],
        each colour's bins L2-normalised, cells in raster order.
    """
    imgs = _check_images(imgs)
    h, w = imgs.shape[2:]
    for c in cells:
        if h % c or w % c:
            raise ValueError(f"image size {h}x{w} is not divisible by the HOG cell size {c}")
    grad = image_gradients(imgs)
    if biases is None:
        hist = hog_histogram(grad, nbins)
        return [_hog_tokens(hist, int(c)) for c in cells]
    biases = np.asarray(biases, dtype=np.float32)
    if biases.shape != (len(cells), 2):
        raise ValueError(f"HOG biases must have shape ({len(cells)}, 2), one per scale, got {biases.shape}")
    out = []
    for c, bias in zip(cells, biases):
        biased = grad + bias.reshape(1, 1, 2, 1, 1)
        out.append(_hog_tokens(hog_histogram(biased, nbins), int(c)))
    return out


# --------------------------------------------------------------------------------------------
# loss (docs/method.md#loss)

def masked_mse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """sum_{b,i} mask * mean_c (pred - target)^2 / sum_{b,i} mask, in float64.

    Args:
        pred, target: (B, L, C).
        mask: (B, L) weights (1 = masked; fractional at coarse scales).
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} must have the same (B, L, C) shape")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match predictions {pred.shape[:2]}")
    total = mask.sum()
    if total <= 0:
        raise ValueError("mask has no masked position: the masked MSE is undefined")
    per_token = ((pred - target) ** 2).mean(axis=-1)
    return float((per_token * mask).sum() / total)


def localmim_loss(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                  masks: Sequence[np.ndarray]) -> Tuple[float, np.ndarray]:
    """Sum of the per-branch masked MSEs, all with weight 1.

    Returns:
        (total, per_branch) with per_branch a float64 array of shape (num_branches,).
    """
    if not (len(preds) == len(targets) == len(masks)):
        raise ValueError(f"got {len(preds)} predictions, {len(targets)} targets and {len(masks)} masks")
    per_branch = np.array([masked_mse(p, t, m) for p, t, m in zip(preds, targets, masks)], dtype=np.float64)
    return float(per_branch.sum()), per_branch
