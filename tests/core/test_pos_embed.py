"""2-D sin-cos position tables (docs/method.md#sin-cos-position-tables): column half first, float64
then float32, zero cls row."""
import math

import numpy as np
import pytest

from localmim.core.pos_embed import sincos_2d


def test_dim4_grid2_by_hand():
    s1, c1 = math.sin(1.0), math.cos(1.0)
    # q = 1, omega = [1]; token (row r, col c) = [sin c, cos c, sin r, cos r], row-major tokens.
    expected = np.array([
        [0.0, 1.0, 0.0, 1.0],   # (0, 0)
        [s1, c1, 0.0, 1.0],     # (0, 1)
        [0.0, 1.0, s1, c1],     # (1, 0)
        [s1, c1, s1, c1],       # (1, 1)
    ], dtype=np.float32)
    table = sincos_2d(4, 2)
    assert table.dtype == np.float32 and table.shape == (4, 4)
    np.testing.assert_array_equal(table, expected)


def test_dim8_token_layout_by_hand():
    # q = 2, omega = [1, 10000 ** -0.5 = 0.01]; token 5 of a 3x3 grid is row 1, col 2.
    row = sincos_2d(8, 3)[5]
    expected = [math.sin(2.0), math.sin(0.02), math.cos(2.0), math.cos(0.02),
                math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)]
    np.testing.assert_allclose(row, expected, rtol=0, atol=1e-7)


def test_cls_row_is_zero_and_rest_unchanged():
    with_cls = sincos_2d(16, 5, cls_token=True)
    assert with_cls.shape == (26, 16)
    np.testing.assert_array_equal(with_cls[0], np.zeros(16, np.float32))
    np.testing.assert_array_equal(with_cls[1:], sincos_2d(16, 5))


def test_matches_float64_formula_cast_once():
    dim, grid = 32, 7
    q = dim // 4
    expected = np.zeros((grid * grid, dim), dtype=np.float64)
    for r in range(grid):
        for c in range(grid):
            for k in range(q):
                w = 10000.0 ** (-k / q)
                expected[r * grid + c, [k, q + k, 2 * q + k, 3 * q + k]] = [
                    math.sin(c * w), math.cos(c * w), math.sin(r * w), math.cos(r * w)]
    np.testing.assert_array_equal(sincos_2d(dim, grid), expected.astype(np.float32))


@pytest.mark.parametrize("dim, grid, message", [
    (6, 2, "multiple of 4, got dim=6"),
    (0, 2, "multiple of 4, got dim=0"),
    (8, 0, "grid must be a positive integer, got grid=0"),
])
def test_bad_sizes(dim, grid, message):
    with pytest.raises(ValueError, match=message):
        sincos_2d(dim, grid)
