"""Target-scale math (docs/method.md#scale-masks, #pixel-targets, #hog-targets, #loss): per-scale
masks, pixel targets, HOG, loss."""
import math

import numpy as np
import pytest

from localmim.core import targets as T


# ------------------------------------------------------------------ per-scale masks

def test_scale_masks_small_hand_example():
    mask = np.array([[1, 0, 0, 1]], dtype=np.float32)  # 2x2 grid: [[1, 0], [0, 1]]
    up2, same, half = T.scale_masks(mask, 2, [2, 1, 0.5])
    np.testing.assert_array_equal(up2.reshape(4, 4), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(same, mask)
    np.testing.assert_array_equal(half, [[0.5]])
    assert up2.dtype == same.dtype == half.dtype == np.float32


def test_scale_masks_fractional_7x7():
    square = np.zeros((14, 14), dtype=np.float32)
    square[0, 0] = 1                                   # block (0,0): 1 of 4
    square[0, 2] = square[1, 3] = 1                    # block (0,1): 2 of 4
    square[0, 4] = square[0, 5] = square[1, 4] = 1     # block (0,2): 3 of 4
    square[12:14, 12:14] = 1                           # block (6,6): 4 of 4
    (half,) = T.scale_masks(square.reshape(1, 196), 14, [0.5])
    expected = np.zeros(49, dtype=np.float32)
    expected[[0, 1, 2, 48]] = [0.25, 0.5, 0.75, 1.0]
    assert half.shape == (1, 49)
    np.testing.assert_array_equal(half[0], expected)


def test_scale_masks_reference_vit_shapes_and_raster_order():
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 196)) < 0.75).astype(np.float32)
    out = T.scale_masks(mask, 14, [4, 2, 1, 0.5])
    assert [o.shape for o in out] == [(2, 3136), (2, 784), (2, 196), (2, 49)]
    fine = out[0]
    for b in range(2):
        for r in range(14):
            for c in range(14):
                block = [fine[b, (4 * r + i) * 56 + 4 * c + j] for i in range(4) for j in range(4)]
                assert block == [mask[b, r * 14 + c]] * 16
    np.testing.assert_allclose(out[3].sum(axis=1) * 4, mask.sum(axis=1))


def test_scale_masks_bool_swin_factors():
    cells = np.zeros((1, 49), dtype=bool)
    cells[0, 8] = True  # row 1, col 1
    m4, m2, m1, m1b = T.scale_masks(cells, 7, [4, 2, 1, 1])
    assert [m.shape[1] for m in (m4, m2, m1, m1b)] == [784, 196, 49, 49]
    assert set(np.unique(m4)) == {0.0, 1.0}
    assert np.flatnonzero(m2[0]).tolist() == [2 * 14 + 2, 2 * 14 + 3, 3 * 14 + 2, 3 * 14 + 3]


@pytest.mark.parametrize("mask, grid, scales, message", [
    (np.zeros((1, 49)), 7, [0.5], "needs a grid divisible by 2, got grid 7"),
    (np.zeros((1, 16)), 4, [1.5], "mask scale 1.5 unsupported"),
    (np.zeros((1, 15)), 4, [1], r"must have shape \(B, 16\)"),
    (np.zeros(16), 4, [1], r"must have shape \(B, 16\)"),
])
def test_scale_masks_errors(mask, grid, scales, message):
    with pytest.raises(ValueError, match=message):
        T.scale_masks(mask, grid, scales)


# ------------------------------------------------------------------ pixel targets

def test_patchify_order():
    imgs = np.arange(2 * 3 * 4 * 6, dtype=np.float32).reshape(2, 3, 4, 6)
    tok = T.patchify(imgs, 2)
    assert tok.shape == (2, 6, 12)
    for b in range(2):
        for pr in range(2):
            for pc in range(3):
                for i in range(2):
                    for j in range(2):
                        for ch in range(3):
                            assert tok[b, pr * 3 + pc, (i * 2 + j) * 3 + ch] == imgs[b, ch, 2 * pr + i, 2 * pc + j]


def test_patchify_roundtrip():
    imgs = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(T.unpatchify(T.patchify(imgs, 4), 4), imgs)
    wide = np.random.default_rng(2).standard_normal((1, 3, 4, 12)).astype(np.float32)
    np.testing.assert_array_equal(T.unpatchify(T.patchify(wide, 2), 2, height=4), wide)


def test_patchify_errors():
    with pytest.raises(ValueError, match="image size 10x8 is not divisible by the 4-px"):
        T.patchify(np.zeros((1, 3, 10, 8)), 4)
    with pytest.raises(ValueError, match="expected p\\*p\\*C = 12"):
        T.unpatchify(np.zeros((1, 4, 10)), 2)


def test_normalize_pixels_unbiased_variance():
    t = np.array([[[1.0, 2.0, 3.0, 4.0]]], dtype=np.float32)
    var = (2.25 + 0.25 + 0.25 + 2.25) / 3  # divisor n - 1
    expected = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(var + 1e-6)
    out = T.normalize_pixels(t)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)


def test_pixel_targets_shapes_and_normalisation():
    imgs = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    raw = T.pixel_targets(imgs, [8, 16, 32, 32], norm_pix=False)
    assert [r.shape for r in raw] == [(2, 16, 192), (2, 4, 768), (2, 1, 3072), (2, 1, 3072)]
    np.testing.assert_array_equal(raw[0], T.patchify(imgs, 8))
    normed = T.pixel_targets(imgs, [8], norm_pix=True)[0]
    np.testing.assert_allclose(normed.mean(axis=-1), 0.0, atol=1e-5)
    raw_var = raw[0].astype(np.float64).var(axis=-1, ddof=1)
    normed_var = normed.astype(np.float64).var(axis=-1, ddof=1)
    np.testing.assert_allclose(normed_var, raw_var / (raw_var + 1e-6), rtol=1e-5)


# ------------------------------------------------------------------ HOG

def test_sobel_kernel_values():
    k = T.sobel_kernel()
    assert k.shape == (2, 1, 3, 3) and k.dtype == np.float32
    np.testing.assert_array_equal(k[0, 0], [[1, 0, -1], [2, 0, -2], [1, 0, -1]])
    np.testing.assert_array_equal(k[1, 0], [[1, 2, 1], [0, 0, 0], [-1, -2, -1]])


def test_sample_hog_bias():
    b = T.sample_hog_bias(np.random.default_rng(0), 4)
    assert b.shape == (4, 2) and b.dtype == np.float32
    assert np.all(np.abs(b) <= 1 / 3) and len(np.unique(b)) == 8
    np.testing.assert_array_equal(b, T.sample_hog_bias(np.random.default_rng(0), 4))


def _ramps(size=8):
    x = np.tile(np.arange(size, dtype=np.float32), (size, 1))
    return x, x.T.copy()


def test_gradients_of_ramps():
    x, y = _ramps()
    g = T.image_gradients(np.stack([x, -x, y])[None])
    assert g.shape == (1, 3, 2, 8, 8) and g.dtype == np.float32
    np.testing.assert_array_equal(g[0, 0, 0, :, 1:-1], -8.0)   # left minus right of a rising ramp
    np.testing.assert_array_equal(g[0, 0, 0, :, [0, 7]], 0.0)  # reflect padding: no edge gradient
    np.testing.assert_array_equal(g[0, 0, 1], 0.0)
    np.testing.assert_array_equal(g[0, 1, 0, :, 1:-1], 8.0)
    np.testing.assert_array_equal(g[0, 2, 1, 1:-1, :], -8.0)   # top minus bottom of a downward ramp
    np.testing.assert_array_equal(g[0, 2, 1, [0, 7], :], 0.0)


def _reflect(i, n):
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


def test_gradients_match_direct_cross_correlation():
    imgs = np.random.default_rng(4).standard_normal((1, 3, 5, 6)).astype(np.float32)
    bias = np.array([0.25, -0.125], dtype=np.float32)
    k = T.sobel_kernel()[:, 0]
    g = T.image_gradients(imgs, bias)
    for ch in range(3):
        for r in range(5):
            for c in range(6):
                for o in range(2):
                    v = sum(float(k[o, i, j]) * float(imgs[0, ch, _reflect(r + i - 1, 5), _reflect(c + j - 1, 6)])
                            for i in range(3) for j in range(3)) + float(bias[o])
                    assert abs(g[0, ch, o, r, c] - v) < 1e-5


def test_histogram_of_reference_test_vectors():
    x, y = _ramps()
    h = T.hog_histogram(T.image_gradients(np.stack([x, -x, y])[None]), 9)[0]
    hd = T.hog_histogram(T.image_gradients(np.stack([x + y, x, x])[None]), 9)[0]
    assert h.shape == (3, 9, 8, 8)
    interior = (slice(1, -1), slice(1, -1))
    for hist, expected_bin, expected_m in [(h[0], 4, 8.0), (h[1], 4, 8.0), (h[2], 0, 8.0),
                                           (hd[0], 2, 8.0 * math.sqrt(2))]:
        np.testing.assert_array_equal(hist.argmax(axis=0)[interior], expected_bin)
        np.testing.assert_allclose(hist[expected_bin][interior], expected_m, rtol=1e-6)
        assert np.count_nonzero(hist[:, 1:-1, 1:-1]) == 36  # one bin per pixel
    np.testing.assert_array_equal(h[0][:, :, [0, 7]], 0.0)   # x ramp: border columns m = 0
    np.testing.assert_array_equal(h[2][:, [0, 7], :], 0.0)   # y ramp: border rows m = 0


def test_histogram_floor_mod_at_plus_minus_pi_and_just_below_zero():
    grad = np.zeros((1, 3, 2, 1, 1), dtype=np.float32)
    grad[0, 0] = [[[0.0]], [[-1.0]]]     # theta = +pi -> 9 mod 9 = 0
    grad[0, 1] = [[[-0.0]], [[-1.0]]]    # theta = -pi -> -9 mod 9 = 0
    grad[0, 2] = [[[-1e-3]], [[1.0]]]    # theta slightly below 0 -> -1 mod 9 = 8
    assert np.arctan2(np.float32(-0.0), np.float32(-1.0)) == -np.float32(np.pi)
    h = T.hog_histogram(grad, 9)[0, :, :, 0, 0]
    assert h.argmax(axis=1).tolist() == [0, 0, 8]
    np.testing.assert_allclose(h.max(axis=1), [1.0, 1.0, math.hypot(1e-3, 1.0)], rtol=1e-6)


def test_histogram_18_bins():
    x, _ = _ramps()
    h = T.hog_histogram(T.image_gradients(np.stack([x, x, x])[None]), 18)
    np.testing.assert_array_equal(h[0, 0].argmax(axis=0)[:, 1:-1], 9)  # theta = -pi/2 -> -9 mod 18


def _eight_bit_images(seed, batch=2, size=16):
    """Blocky 8-bit colour images normalised as the data pipeline does, (B, 3, S, S) float32: 4x4
    blocks of constant value, so many pixels have equal left/right (top/bottom) neighbours."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 256, size=(batch, 3, size // 4, size // 4)).astype(np.float32)
    v = np.repeat(np.repeat(levels, 4, axis=2), 4, axis=3) / np.float32(255.0)
    mean = np.array(T.IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.array(T.IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return ((v - mean) / std).astype(np.float32)


def test_gradients_are_the_fixed_order_float32_sums():
    """The definition, operation by operation in float32 scalars: d = left - right per row,
    g0 = (d_top + d_bottom) + 2 d_middle (g1 likewise with columns); bit for bit."""
    imgs = np.concatenate([_eight_bit_images(0, 1, 8),
                           np.random.default_rng(9).standard_normal((1, 3, 8, 8)).astype(np.float32)])
    g = T.image_gradients(imgs)
    f = np.float32
    for b in range(2):
        for ch in range(3):
            px = lambda i, j: f(imgs[b, ch, _reflect(i, 8), _reflect(j, 8)])
            for r in range(8):
                for c in range(8):
                    d = [px(r + i, c - 1) - px(r + i, c + 1) for i in (-1, 0, 1)]
                    e = [px(r - 1, c + j) - px(r + 1, c + j) for j in (-1, 0, 1)]
                    assert g[b, ch, 0, r, c] == (d[0] + d[2]) + f(2) * d[1]
                    assert g[b, ch, 1, r, c] == (e[0] + e[2]) + f(2) * e[1]


def test_equal_neighbours_give_an_exact_positive_zero():
    """Where the left and right neighbours of all three rows are equal, g0 is +0 exactly (never a
    +-1 ulp residue, never -0), so the pixel is in bin 0 with the full |g1| (likewise g1)."""
    imgs = _eight_bit_images(1, 2, 16)
    g = T.image_gradients(imgs)
    p = np.pad(imgs, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    lr_equal = (p[:, :, :, :-2] == p[:, :, :, 2:])
    lr_equal = lr_equal[:, :, :-2] & lr_equal[:, :, 1:-1] & lr_equal[:, :, 2:]
    tb_equal = (p[:, :, :-2, :] == p[:, :, 2:, :])
    tb_equal = tb_equal[..., :-2] & tb_equal[..., 1:-1] & tb_equal[..., 2:]
    assert lr_equal.mean() > 0.4 and tb_equal.mean() > 0.4       # the case is common here
    for o, equal in ((0, lr_equal), (1, tb_equal)):
        zero = g[:, :, o][equal]
        assert np.all(zero == 0) and not np.signbit(zero).any()
    bins = T.orientation_bins(g[:, :, 0], g[:, :, 1], 9)
    moving = lr_equal & (g[:, :, 1] != 0)
    assert moving.any() and np.all(bins[moving] == 0)


def test_constant_rows_put_everything_in_bin_0():
    """Rows of constant (8-bit, normalised) value: g0 = 0 at every pixel, borders included, so the
    whole histogram sits in bin 0 whichever sign g1 has; constant columns: the 90-degree bin."""
    levels = np.array([3, 200, 17, 17, 90, 255, 0, 128], np.float32) / np.float32(255.0)
    rows = np.broadcast_to(((levels - np.float32(0.485)) / np.float32(0.229))[:, None], (8, 8))
    imgs = np.broadcast_to(rows, (1, 3, 8, 8)).copy()
    g = T.image_gradients(imgs)
    assert np.all(g[:, :, 0] == 0) and not np.signbit(g[:, :, 0]).any()
    assert (g[:, :, 1] > 0).any() and (g[:, :, 1] < 0).any()
    for nbins in (9, 18):
        hist = T.hog_histogram(g, nbins)
        assert np.all(hist[:, :, 1:] == 0)
        np.testing.assert_array_equal(hist[:, :, 0], np.abs(g[:, :, 1]))
    (tok,) = T.hog_targets(imgs, [4], 9)
    moving = tok.reshape(-1, 3, 9)[:, 0]
    assert np.all(moving[:, 1:] == 0) and np.all(moving[:, 0] == 1.0)
    cols = np.ascontiguousarray(imgs.transpose(0, 1, 3, 2))
    gc = T.image_gradients(cols)
    assert np.all(gc[:, :, 1] == 0)
    b9, b18 = (T.orientation_bins(gc[:, :, 0], gc[:, :, 1], n)[gc[:, :, 0] != 0] for n in (9, 18))
    assert np.all(b9 == 4) and np.all(b18 == 9)          # 90 deg: inside bin 4 of 9, on edge 9 of 18


def test_bin_edge_cotangents_table():
    for nbins in (1, 2, 4, 8, 9, 18):
        cot = T.bin_edge_cotangents(nbins)
        assert cot.shape == (nbins - 1,) and cot.dtype == np.float32
        np.testing.assert_array_equal(cot, -cot[::-1])                     # exactly antisymmetric
        assert np.all(np.diff(cot) < 0)                                    # strictly decreasing
        k = np.arange(1, nbins)
        np.testing.assert_allclose(cot, 1.0 / np.tan(k * np.pi / nbins), rtol=1e-7, atol=1e-7)
    assert T.bin_edge_cotangents(18)[8] == 0.0 and T.bin_edge_cotangents(4).tolist() == [1.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="nbins must be a positive integer"):
        T.bin_edge_cotangents(0)


def test_orientation_bins_on_edges_zeros_and_next_to_them():
    """Hand-derived: g0 == 0 is bin 0 for either sign of g1 (theta = 0 and +-pi); an angle exactly
    on an edge belongs to the upper bin; the nearest float on either side decides by its side."""
    tiny, f = np.float32(1e-30), np.float32
    cases = [  # (g0, g1, nbins, bin)
        (0.0, 1.0, 9, 0), (0.0, -1.0, 9, 0), (-0.0, -1.0, 9, 0), (-0.0, 1.0, 9, 0), (0.0, 0.0, 9, 0),
        (tiny, 1.0, 9, 0), (-tiny, 1.0, 9, 8), (tiny, -1.0, 9, 8), (-tiny, -1.0, 9, 0),
        (1.0, 0.0, 18, 9), (-1.0, 0.0, 18, 9), (1.0, tiny, 18, 8), (1.0, -tiny, 18, 9),
        (1.0, 1e-45, 18, 9), (1e-45, -1.0, 9, 0), (-1e-40, 1.0, 9, 0),   # subnormals count as 0
        (1.0, 1.0, 4, 1), (1.0, -1.0, 4, 3), (-1.0, 1.0, 4, 3), (2.0, 2.0, 8, 2), (3.0, -3.0, 8, 6),
    ]
    for k, cot in enumerate(T.bin_edge_cotangents(9), start=1):           # edges with irrational cot
        cases += [(1.0, float(cot), 9, k), (1.0, float(np.nextafter(cot, f(np.inf))), 9, k - 1),
                  (-1.0, -float(cot), 9, k)]
    g0 = np.array([c[0] for c in cases], np.float32)
    g1 = np.array([c[1] for c in cases], np.float32)
    for nbins in (4, 8, 9, 18):
        sel = [i for i, c in enumerate(cases) if c[2] == nbins]
        got = T.orientation_bins(g0[sel], g1[sel], nbins)
        assert got.dtype == np.int64
        assert got.tolist() == [cases[i][3] for i in sel], [cases[i] for i in sel]


def test_orientation_bins_equal_floor_atan2_away_from_edges():
    rng = np.random.default_rng(11)
    g = (rng.standard_normal((2, 20000)) * np.exp(rng.uniform(-6, 6, (1, 20000)))).astype(np.float32)
    theta = np.arctan2(g[0].astype(np.float64), g[1].astype(np.float64))
    for nbins in (9, 18):
        ref = np.mod(np.floor(theta / np.pi * nbins), nbins).astype(np.int64)
        edge_distance = np.abs(theta / np.pi * nbins - np.round(theta / np.pi * nbins))
        far = edge_distance > 1e-5
        assert far.mean() > 0.99
        np.testing.assert_array_equal(T.orientation_bins(g[0], g[1], nbins)[far], ref[far])


def test_hog_bias_exactly_on_an_edge():
    """A flat image with bias (b0, 0) has theta = +-pi/2: bin 4 of 9, and the upper bin 9 of 18."""
    flat = np.zeros((1, 3, 8, 8), np.float32)
    for nbins, b0, want in ((9, 0.25, 4), (18, 0.25, 9), (18, -0.25, 9)):
        (tok,) = T.hog_targets(flat, [4], nbins, np.array([[b0, 0.0]], np.float32))
        assert np.all(tok.reshape(-1, 3, nbins).argmax(-1) == want)
        np.testing.assert_array_equal(tok.reshape(-1, 3, nbins).max(-1), 1.0)


def test_pool_and_l2_hand_example():
    hist = np.zeros((1, 1, 2, 2, 2), dtype=np.float32)
    hist[0, 0, 0, 0, 0] = 3.0   # pixel (0,0): bin 0, m 3
    hist[0, 0, 1, 0, 1] = 4.0   # pixel (0,1): bin 1, m 4
    pooled = T.pool_cells(hist, 2)
    np.testing.assert_array_equal(pooled[0, 0, :, 0, 0], [0.75, 1.0])
    np.testing.assert_allclose(T.l2_normalize_cells(pooled)[0, 0, :, 0, 0], [0.6, 0.8], rtol=1e-7)
    np.testing.assert_array_equal(T.l2_normalize_cells(np.zeros((1, 1, 2, 1, 1))), 0.0)


def test_hog_targets_of_ramps():
    x, y = _ramps(4)
    (tok,) = T.hog_targets(np.stack([x, np.zeros_like(x), y])[None], [2], 9)
    assert tok.shape == (1, 4, 27) and tok.dtype == np.float32
    expected = np.zeros(27, dtype=np.float32)
    expected[4] = 1.0        # R: bin 4
    expected[18 + 0] = 1.0   # G: flat -> zeros; B: bin 0
    np.testing.assert_allclose(tok[0], np.tile(expected, (4, 1)), atol=1e-7)


def _hog_by_loops(img, cell, nbins, bias=(0.0, 0.0)):
    """Independent per-pixel reference for one image (3, H, W) -> (L, 3 * nbins)."""
    _, h, w = img.shape
    k = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    gh, gw = h // cell, w // cell
    hist = np.zeros((gh * gw, 3, nbins))
    for ch in range(3):
        for r in range(h):
            for c in range(w):
                px = lambda i, j: float(img[ch, _reflect(r + i - 1, h), _reflect(c + j - 1, w)])
                g0 = sum(k[i][j] * px(i, j) for i in range(3) for j in range(3)) + bias[0]
                g1 = sum(k[j][i] * px(i, j) for i in range(3) for j in range(3)) + bias[1]
                b = math.floor(math.atan2(g0, g1) / math.pi * nbins) % nbins
                hist[(r // cell) * gw + c // cell, ch, b] += math.hypot(g0, g1)
    norms = np.maximum(np.sqrt((hist ** 2).sum(axis=2, keepdims=True)), 1e-12)
    return (hist / norms).reshape(gh * gw, 3 * nbins)


def test_hog_targets_match_per_pixel_loops():
    imgs = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = T.hog_targets(imgs, [2, 4, 8], 9)
    assert [o.shape for o in out] == [(2, 16, 27), (2, 4, 27), (2, 1, 27)]
    for b in range(2):
        for o, c in zip(out, [2, 4, 8]):
            np.testing.assert_allclose(o[b], _hog_by_loops(imgs[b], c, 9), atol=1e-5)


def test_hog_targets_with_biases_match_loops():
    imgs = np.random.default_rng(6).standard_normal((1, 3, 4, 4)).astype(np.float32)
    biases = np.array([[0.3, -0.2], [-0.1, 0.25]], dtype=np.float32)
    out = T.hog_targets(imgs, [2, 4], 6, biases)
    for o, c, bias in zip(out, [2, 4], biases):
        np.testing.assert_allclose(o[0], _hog_by_loops(imgs[0], c, 6, tuple(map(float, bias))), atol=1e-5)
    zero = T.hog_targets(imgs, [2, 4], 6, np.zeros((2, 2), np.float32))
    for a, b in zip(zero, T.hog_targets(imgs, [2, 4], 6)):
        np.testing.assert_array_equal(a, b)


def test_hog_bias_gives_flat_regions_a_constant_signature():
    flat = np.zeros((1, 3, 8, 8), dtype=np.float32)
    assert all(not t.any() for t in T.hog_targets(flat, [4, 8], 9))
    biases = np.array([[0.1, 0.2], [-0.2, 0.1]], dtype=np.float32)
    # theta = atan2(0.1, 0.2) = 0.4636 -> floor(1.33) = bin 1;
    # theta = atan2(-0.2, 0.1) = -1.107 -> floor(-3.17) = -4 -> bin 5
    fine, coarse = T.hog_targets(flat, [4, 8], 9, biases)
    for tok, b in [(fine, 1), (coarse, 5)]:
        one = np.zeros(9, dtype=np.float32)
        one[b] = 1.0
        np.testing.assert_allclose(tok[0], np.tile(np.tile(one, 3), (tok.shape[1], 1)), atol=1e-7)


def test_hog_targets_reference_shapes():
    imgs = np.random.default_rng(7).standard_normal((1, 3, 64, 64)).astype(np.float32)
    out = T.hog_targets(imgs, [4, 8, 16, 32], 18)
    assert [o.shape for o in out] == [(1, 256, 54), (1, 64, 54), (1, 16, 54), (1, 4, 54)]
    for o in out:  # every colour block of every cell has unit norm (random images have no flat cells)
        np.testing.assert_allclose(np.linalg.norm(o.reshape(1, -1, 3, 18), axis=-1), 1.0, rtol=1e-5)


def test_hog_targets_errors():
    with pytest.raises(ValueError, match="image size 30x30 is not divisible by the HOG cell size 4"):
        T.hog_targets(np.zeros((1, 3, 30, 30), np.float32), [2, 4], 9)
    with pytest.raises(ValueError, match=r"HOG biases must have shape \(2, 2\)"):
        T.hog_targets(np.zeros((1, 3, 8, 8), np.float32), [2, 4], 9, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        T.hog_targets(np.zeros((1, 1, 8, 8), np.float32), [2], 9)


# ------------------------------------------------------------------ loss

def test_masked_mse_hand_example():
    pred = np.array([[[1.0, 1.0], [3.0, 3.0]]], dtype=np.float32)
    target = np.zeros_like(pred)
    assert T.masked_mse(pred, target, np.array([[1.0, 0.0]])) == pytest.approx(1.0)
    assert T.masked_mse(pred, target, np.array([[0.5, 1.0]])) == pytest.approx((0.5 * 1 + 9) / 1.5)
    with pytest.raises(ValueError, match="no masked position"):
        T.masked_mse(pred, target, np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"mask shape \(1, 3\) does not match"):
        T.masked_mse(pred, target, np.zeros((1, 3)))


def test_localmim_loss_sums_branches():
    preds = [np.full((1, 2, 3), 2.0), np.full((1, 1, 4), 1.0)]
    tgts = [np.zeros((1, 2, 3)), np.full((1, 1, 4), 4.0)]
    masks = [np.array([[1.0, 1.0]]), np.array([[0.25]])]
    total, per = T.localmim_loss(preds, tgts, masks)
    np.testing.assert_allclose(per, [4.0, 9.0])
    assert total == pytest.approx(13.0)
    with pytest.raises(ValueError, match="2 predictions, 1 targets and 2 masks"):
        T.localmim_loss(preds, tgts[:1], masks)
