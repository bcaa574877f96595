"""Fixed 2-D sin-cos position tables (docs/method.md#sin-cos-position-tables, MAE `get_2d_sincos_pos_embed`).

For a g x g grid flattened row-major (token index = row * g + col) and q = dim / 4,
omega_k = 10000 ** (-k / q), k = 0..q-1, the token at (row r, col c) gets

    concat[sin(c * omega), cos(c * omega), sin(r * omega), cos(r * omega)]

i.e. the first half encodes the column (x) and the second half the row (y). The table is
computed in float64 and cast to float32, as in the reference.
"""
from __future__ import annotations

import numpy as np

__all__ = ["sincos_1d", "sincos_2d"]


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding.

    Args:
        dim: even output width.
        positions: (M,) positions (any real values).
    Returns:
        (M, dim) float64: [sin(pos * omega), cos(pos * omega)] with omega_k = 10000 ** (-k / (dim / 2)).
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got dim={dim}")
    half = dim // 2
    omega = 1.0 / 10000.0 ** (np.arange(half, dtype=np.float64) / half)
    angles = np.asarray(positions, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: int, cls_token: bool = False) -> np.ndarray:
    """2-D sin-cos position table for a square grid.

    Args:
        dim: table width, a positive multiple of 4.
        grid: tokens per side (g).
        cls_token: prepend an all-zero row for the cls position.
    Returns:
        float32 array of shape (g*g, dim), or (1 + g*g, dim) with the zero cls row first.
        Columns [0, dim/2) encode the token's column, [dim/2, dim) its row.
    """
    if not isinstance(dim, (int, np.integer)) or dim <= 0 or dim % 4:
        raise ValueError(f"sin-cos position table width must be a positive multiple of 4, got dim={dim!r}")
    if not isinstance(grid, (int, np.integer)) or grid <= 0:
        raise ValueError(f"sin-cos position table grid must be a positive integer, got grid={grid!r}")
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                             indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim), dtype=np.float64), table], axis=0)
    return table.astype(np.float32)
