"""Resampling position tables to another image size or window (docs/method.md#resampling).

Two rules, chosen per table by its content:

- A table that is the fixed sin-cos table of its grid (core.pos_embed.sincos_2d, to within
  SINCOS_ATOL, which covers float16 / bfloat16 storage) is recomputed for the new grid: that is
  the exact answer, since the model itself builds that table for any grid. This applies to every
  `pos_embed` this package, the official LocalMIM and MAE pretraining write (ViT `pos_embed`,
  `decoder.{k}.pos_embed`, MAE `decoder_pos_embed`, Swin `decoder.{k}.pos_embed`).
- Any other table (learned: a fine-tuned timm / MAE ViT's `pos_embed`, every Swin
  `relative_position_bias_table`) is resized with bicubic interpolation, the numbers of
  torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias=False): the patch
  part of a position table as a g x g image per channel (the cls row kept as it is), a relative
  table as a (2w-1) x (2w-1) image per head (Swin's own fine-tuning recipe).

Pure numpy (float64 arithmetic, float32 results), so both backends load the same numbers.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import numpy as np

from localmim.core.pos_embed import sincos_2d

__all__ = ["SINCOS_ATOL", "CUBIC_A", "bicubic_resize", "is_sincos_table", "resample_pos_embed",
           "resize_pos_table", "resample_relative_table", "resample_state"]

SINCOS_ATOL = 5e-3  # bfloat16 keeps 8 mantissa bits: |sin| <= 1 rounds by at most 2^-9 ~ 2e-3
CUBIC_A = -0.75  # the cubic-convolution constant of PyTorch's bicubic mode


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n,) fractional offsets in [0, 1) -> (n, 4) weights of the samples at floor-1 .. floor+2
    (Keys' cubic convolution with a = CUBIC_A, as PyTorch's upsample_bicubic2d)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of 1-D bicubic resampling with align_corners=False: output i
    samples the input at (i + 0.5) * n_in / n_out - 0.5; taps outside [0, n_in) take the border."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    out = np.zeros((n_out, n_in), dtype=np.float64)
    for j in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + j, 0, n_in - 1)
        np.add.at(out, (np.arange(n_out), idx), weights[:, j])
    return out


def bicubic_resize(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize images bicubically. x: (..., H, W); size: (h, w) -> float32 (..., h, w).

    Matches torch.nn.functional.interpolate(x, size, mode="bicubic", align_corners=False) (no
    antialiasing, also when shrinking) to float32 rounding.
    """
    x = np.asarray(x, dtype=np.float64)
    rows = _resize_matrix(x.shape[-2], int(size[0]))
    cols = _resize_matrix(x.shape[-1], int(size[1]))
    return np.einsum("ih,...hw,jw->...ij", rows, x, cols).astype(np.float32)


def _grid_of(n: int, what: str) -> int:
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"{what}: {n} positions are not a square grid")
    return g


def is_sincos_table(table: np.ndarray, cls_token: bool, atol: float = SINCOS_ATOL) -> bool:
    """Whether `table` ((1,) N, D) is core.pos_embed.sincos_2d(D, sqrt(N - cls), cls_token)."""
    t = np.asarray(table, dtype=np.float32)
    t = t.reshape(t.shape[-2:])
    n, dim = t.shape[0] - int(cls_token), t.shape[1]
    g = int(round(max(n, 0) ** 0.5))
    if g * g != n or g == 0 or dim % 4:
        return False
    return bool(np.allclose(t, sincos_2d(dim, g, cls_token=cls_token), rtol=0.0, atol=atol))


def resample_pos_embed(table: np.ndarray, grid: int, cls_token: bool = True) -> np.ndarray:
    """Bicubic resize of a position table to a `grid` x `grid` patch grid.

    table: (1, [1+] g*g, D) or ([1+] g*g, D); the cls row (when cls_token) is kept unchanged, the
    g*g patch rows (row-major) are resized as D images of g x g. Returns float32 of the same rank
    with [1+] grid*grid rows.
    """
    t = np.asarray(table)
    lead = t.shape[:-2]
    flat = t.reshape(t.shape[-2:])
    head, patches = (flat[:1], flat[1:]) if cls_token else (flat[:0], flat)
    g = _grid_of(patches.shape[0], "position table")
    images = patches.T.reshape(-1, g, g)  # (D, g, g)
    resized = bicubic_resize(images, (grid, grid)).reshape(flat.shape[1], grid * grid).T
    out = np.concatenate([head.astype(np.float32), resized], axis=0)
    return out.reshape(lead + out.shape)


def resize_pos_table(table: np.ndarray, grid: int, cls_token: bool) -> Tuple[np.ndarray, str]:
    """A position table for `grid` x `grid` patches by the module's rule -> (table, how) with how
    "unchanged", "recomputed" (the sin-cos table of the new grid) or "bicubic"."""
    t = np.asarray(table)
    if _grid_of(t.shape[-2] - int(cls_token), "position table") == grid:
        return t, "unchanged"
    if is_sincos_table(t, cls_token):
        new = sincos_2d(t.shape[-1], grid, cls_token=cls_token)
        return new.reshape(t.shape[:-2] + new.shape), "recomputed"
    return resample_pos_embed(t, grid, cls_token), "bicubic"


def resample_relative_table(table: np.ndarray, window: int) -> np.ndarray:
    """A Swin relative-position bias table ((2w-1)^2, heads) resized for a `window` x `window`
    window -> float32 ((2*window-1)^2, heads): each head's (2w-1) x (2w-1) grid (rows: row offset,
    columns: column offset) resized bicubically."""
    t = np.asarray(table)
    side = _grid_of(t.shape[0], "relative position table")
    new = 2 * int(window) - 1
    images = t.T.reshape(t.shape[1], side, side)
    return bicubic_resize(images, (new, new)).reshape(t.shape[1], new * new).T.copy()


def _resample_vit(state: Dict[str, np.ndarray], src, dst, notes: List[str]) -> None:
    for key in ["pos_embed"] + [f"decoder.{k}.pos_embed" for k in range(len(src.taps))]:
        if key in state:
            state[key], how = resize_pos_table(state[key], dst.grid, cls_token=True)
            if how != "unchanged":
                notes.append(f"{key}: grid {src.grid} -> {dst.grid} ({how})")


def _resample_swin(state: Dict[str, np.ndarray], src, dst, notes: List[str]) -> None:
    for k, (a, b) in enumerate(zip(src.branches(), dst.branches())):
        key = f"decoder.{k}.pos_embed"
        if key in state:
            state[key], how = resize_pos_table(state[key], b.grid, cls_token=False)
            if how != "unchanged":
                notes.append(f"{key}: grid {a.grid} -> {b.grid} ({how})")
    for s in range(src.num_stages):
        w0, w1 = src.stage_window(s), dst.stage_window(s)
        if w0 == w1:
            continue
        keys = [f"encoder.layers.{s}.blocks.{b}.attn.relative_position_bias_table" for b in range(src.depths[s])]
        for key in keys:
            if key in state:
                state[key] = resample_relative_table(state[key], w1)
        notes.append(f"stage {s} relative_position_bias_table x{len(keys)}: window {w0} -> {w1} (bicubic)")


def resample_state(state: Mapping[str, np.ndarray], src, dst) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """A canonical state (or part of one) of spec `src` resampled for spec `dst`, which differs
    from `src` in img_size (ViT, Swin) and/or window_size (Swin) only -> (state, notes).

    ViT: `pos_embed` and `decoder.{k}.pos_embed` go to dst's patch grid. Swin: `decoder.{k}.pos_embed`
    to dst's branch grids, and every stage's relative_position_bias_table whose window
    (min(window_size, stage resolution)) changes. Each table by the module's rule; notes say which.
    """
    if src.family != dst.family:
        raise ValueError(f"cannot resample a {src.family} state for a {dst.family} model")
    out = dict(state)
    notes: List[str] = []
    if src.family == "vit":
        _resample_vit(out, src, dst, notes)
    else:
        _resample_swin(out, src, dst, notes)
    return out, notes
