"""MindSpore targets, per-scale masks and loss against core.targets (numpy) and hand-derived values."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from localmim.backends.mindspore import targets as T
from localmim.core import targets as C


def test_scale_masks_match_core(h):
    m = h.make_mask(type("S", (), {"num_patches": 64})(), 3).mask  # 8x8 grid
    scales = (4.0, 2.0, 1.0, 0.5)
    ours = T.scale_masks(Tensor(m), 8, scales)
    ref = C.scale_masks(m, 8, scales)
    for o, r in zip(ours, ref):
        assert o.dtype == ms.float32
        np.testing.assert_array_equal(o.asnumpy(), r)
    assert set(np.unique(ours[3].asnumpy())) <= {0.0, 0.25, 0.5, 0.75, 1.0}


def test_scale_masks_bad_input():
    with pytest.raises(ValueError, match=r"mask must be \(B, 16\)"):
        T.scale_masks(Tensor(np.zeros((2, 15), np.float32)), 4, (1.0,))
    with pytest.raises(ValueError, match="scale 1.5"):
        T.scale_masks(Tensor(np.zeros((2, 16), np.float32)), 4, (1.5,))


def test_patchify_unpatchify_and_pixel_targets(h):
    imgs = h.make_images(2, 32, seed=1)
    for p in (4, 8, 16):
        ours = T.patchify(Tensor(imgs), p).asnumpy()
        np.testing.assert_array_equal(ours, C.patchify(imgs, p))
        np.testing.assert_array_equal(T.unpatchify(Tensor(ours), p).asnumpy(), imgs)
    for norm_pix in (True, False):
        ours = T.pixel_targets(Tensor(imgs), [4, 8, 32], norm_pix)
        ref = C.pixel_targets(imgs, [4, 8, 32], norm_pix)
        for o, r in zip(ours, ref):
            assert h.rel_err(o, r) < 1e-5


def test_normalize_pixels_uses_unbiased_variance():
    t = np.array([[[1.0, 2.0, 3.0, 6.0]]], np.float32)
    out = T.normalize_pixels(Tensor(t)).asnumpy()
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 3.0)  # divisor n - 1
    np.testing.assert_allclose(out, (t - mean) / np.sqrt(var + 1e-6), rtol=1e-6)


def test_sobel_kernel_and_gradients_match_core_bit_for_bit(h):
    np.testing.assert_array_equal(T.sobel_kernel(), C.sobel_kernel())
    bias = np.array([0.2, -0.1], np.float32)
    for imgs in (h.make_images(2, 16, seed=2), h.eight_bit_images(0, 2, 16)):
        ours = T.image_gradients(Tensor(imgs)).asnumpy()
        assert ours.shape == (2, 3, 2, 16, 16) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, C.image_gradients(imgs))
        np.testing.assert_array_equal(T.image_gradients(Tensor(imgs), bias=Tensor(bias)).asnumpy(),
                                      C.image_gradients(imgs, bias))


def test_orientation_bins_match_core_exactly():
    """Random gradients over 12 decades, exact zeros, +-tiny residues and edge-exact angles."""
    rng = np.random.default_rng(3)
    g = (rng.standard_normal((2, 4000)) * np.exp(rng.uniform(-6, 6, (1, 4000)))).astype(np.float32)
    g[0, :200] = 0.0
    g[0, 200:400] = np.float32(1e-8) * np.sign(rng.standard_normal(200))
    for nbins in (9, 18):
        cot = C.bin_edge_cotangents(nbins)
        edge = np.stack([np.ones(len(cot), np.float32), cot])              # exactly on each edge
        gg = np.concatenate([g, edge, -edge, np.stack([edge[0], np.nextafter(cot, np.float32(9))])], axis=1)
        got = T.orientation_bins(Tensor(gg[0]), Tensor(gg[1]), nbins).asnumpy()
        np.testing.assert_array_equal(got, C.orientation_bins(gg[0], gg[1], nbins).astype(np.float32))


@pytest.mark.parametrize("image, interior_bin, interior_mag", [
    ("x", 4, 8.0), ("-x", 4, 8.0), ("y", 0, 8.0), ("x+y", 2, 8.0 * math.sqrt(2.0))])
def test_hog_ramps_hand_derived(image, interior_bin, interior_mag):
    """HOG test vectors (docs/method.md#hog-test-vectors): unit-slope ramps, nbins 9; reflect padding
    zeroes the border."""
    yy, xx = np.mgrid[0:12, 0:12].astype(np.float32)
    img = {"x": xx, "-x": -xx, "y": yy, "x+y": xx + yy}[image]
    imgs = np.broadcast_to(img, (1, 3, 12, 12)).copy()
    hist = T.hog_histogram(T.image_gradients(Tensor(imgs)), 9).asnumpy()  # (1, 3, 9, 12, 12)
    inner = hist[0, :, :, 1:-1, 1:-1]
    np.testing.assert_allclose(inner[:, interior_bin], interior_mag, rtol=1e-6)
    assert np.all(np.delete(inner, interior_bin, axis=1) == 0)
    if image == "x":
        assert np.all(hist[0, :, :, :, 0] == 0) and np.all(hist[0, :, :, :, -1] == 0)
    if image == "y":
        assert np.all(hist[0, :, :, 0, :] == 0) and np.all(hist[0, :, :, -1, :] == 0)


def test_hog_histogram_negative_angles_use_floor_mod():
    """theta in (-pi, 0) must land in bins nbins/2..nbins-1 (floor-mod), theta = +-pi in bin 0."""
    g0 = np.array([-0.1, -1.0, 0.0, 1.0], np.float32)
    g1 = np.array([1.0, 0.0, -1.0, 1.0], np.float32)
    grad = np.stack([g0, g1]).reshape(1, 1, 2, 1, 4)
    hist = T.hog_histogram(Tensor(grad), 9).asnumpy()[0, 0, :, 0]
    bins = hist.argmax(0)
    ref = np.mod(np.floor(np.arctan2(g0, g1) / np.pi * 9), 9).astype(int)
    np.testing.assert_array_equal(bins, ref)
    assert list(bins) == [8, 4, 0, 2]


def _compare_hog(ours, ref, atol=1e-6):
    """Every cell of every scale agrees: the bins are identical, only the pooling order differs."""
    for o, r in zip(ours, ref):
        assert o.dtype == ms.float32 and o.shape == r.shape
        np.testing.assert_allclose(o.asnumpy(), r, rtol=0, atol=atol)


@pytest.mark.parametrize("with_bias", [False, True])
def test_hog_targets_match_core(h, with_bias):
    imgs = h.make_images(2, 64, seed=3)
    cells = [4, 8, 16, 32]
    biases = C.sample_hog_bias(np.random.default_rng(0), 4) if with_bias else None
    ours = T.hog_targets(Tensor(imgs), cells, 9, biases=None if biases is None else Tensor(biases))
    ref = C.hog_targets(imgs, cells, 9, biases)
    assert [o.shape for o in ours] == [(2, (64 // c) ** 2, 27) for c in cells]
    _compare_hog(ours, ref)
    grad = C.image_gradients(imgs)
    for nbins in (9, 18):
        np.testing.assert_array_equal(T.hog_histogram(Tensor(grad), nbins).asnumpy() != 0,
                                      C.hog_histogram(grad, nbins) != 0)       # the same bins


@pytest.mark.parametrize("nbins, with_bias", [(9, False), (18, True)])
def test_hog_targets_of_8bit_images_match_core_in_every_cell(nbins, with_bias, h):
    """The recipes' targets on photograph-like images: exactly zero gradients bin like the core."""
    imgs = h.eight_bit_images(2, 2, 32)
    assert (C.image_gradients(imgs)[:, :, 0] == 0).mean() > 0.1
    biases = C.sample_hog_bias(np.random.default_rng(1), 4) if with_bias else None
    ours = T.hog_targets(Tensor(imgs), [4, 8, 16, 32], nbins, biases=None if biases is None else Tensor(biases))
    _compare_hog(ours, C.hog_targets(imgs, [4, 8, 16, 32], nbins, biases))


def test_hog_targets_under_jit_match_core(h):
    """Graph mode compiles the same operations: per-scale biases as a list of (2,) Parameters'
    values, as LocalMIMModel.forward_targets passes them."""
    imgs = h.eight_bit_images(4, 2, 32)
    biases = C.sample_hog_bias(np.random.default_rng(2), 4)

    @ms.jit
    def targets(x, b):
        return T.hog_targets(x, [4, 8, 16, 32], 18, [b[0], b[1], b[2], b[3]]) + T.hog_targets(x, [4, 8], 9)

    ours = targets(Tensor(imgs), Tensor(biases))
    _compare_hog(ours, C.hog_targets(imgs, [4, 8, 16, 32], 18, biases) + C.hog_targets(imgs, [4, 8], 9))


def test_hog_targets_scale_invariant_l2(h):
    """v / max(||v||, 1e-12): a 1e-4 dimmer image gives the same targets (ops.L2Normalize would not)."""
    imgs = h.make_images(1, 32, seed=4)
    a = T.hog_targets(Tensor(imgs), [8], 9)[0].asnumpy()
    b = T.hog_targets(Tensor(imgs * 1e-4), [8], 9)[0].asnumpy()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    norms = np.linalg.norm(a.reshape(1, -1, 3, 9), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_hog_targets_flat_image_and_bias():
    """Flat image: zero gradients give all-zero HOG; with a bias every cell has the bias's bin, norm 1."""
    imgs = np.zeros((1, 3, 16, 16), np.float32)
    flat = T.hog_targets(Tensor(imgs), [4], 9)[0].asnumpy()
    assert np.all(flat == 0)
    bias = np.array([[0.0, -0.25]], np.float32)  # atan2(0, -0.25) = pi -> bin 0
    biased = T.hog_targets(Tensor(imgs), [4], 9, biases=Tensor(bias))[0].asnumpy().reshape(1, 16, 3, 9)
    expected = np.zeros(9)
    expected[0] = 1.0
    np.testing.assert_allclose(biased, np.broadcast_to(expected, biased.shape), atol=1e-7)


def test_hog_targets_rejects_bias_count():
    with pytest.raises(ValueError, match="2 biases for 4 cell sizes"):
        T.hog_targets(Tensor(np.zeros((1, 3, 32, 32), np.float32)), [4, 8, 16, 32], 9,
                      biases=Tensor(np.zeros((2, 2), np.float32)))


def test_hog_layer_parameters_and_forward(h):
    ms.set_seed(3)
    layer = T.HOGLayer(bias=True)
    names = {n: p for n, p in layer.parameters_and_names()}
    assert sorted(names) == ["conv.bias", "conv.weight"]
    assert all(not p.requires_grad for p in names.values())
    np.testing.assert_array_equal(layer.conv.weight.asnumpy(), C.sobel_kernel())
    bias = layer.conv.bias.asnumpy()
    assert bias.shape == (2,) and np.all(np.abs(bias) <= 1 / 3) and np.any(bias != 0)
    assert len(T.HOGLayer(bias=False).trainable_params()) == 0
    assert [n for n, _ in T.HOGLayer(bias=False).parameters_and_names()] == ["conv.weight"]
    img = h.make_images(1, 16, seed=5)
    out = layer(Tensor(img[:, :1])).asnumpy()  # (1, 2, 16, 16)
    ref = C.image_gradients(np.repeat(img[:, :1], 3, axis=1), bias)[:, 0]
    np.testing.assert_array_equal(out, ref)


def test_masked_mse_and_loss_match_core():
    rng = np.random.default_rng(6)
    preds = [rng.standard_normal((2, n, 5)).astype(np.float32) for n in (16, 4)]
    tgts = [rng.standard_normal((2, n, 5)).astype(np.float32) for n in (16, 4)]
    masks = [(rng.random((2, 16)) > 0.5).astype(np.float32), np.array([[0, .25, .5, 1], [.75, 0, 1, 0]], np.float32)]
    total, per = T.localmim_loss([Tensor(p) for p in preds], [Tensor(t) for t in tgts], [Tensor(m) for m in masks])
    ref_total, ref_per = C.localmim_loss(preds, tgts, masks)
    assert per.shape == (2,) and per.dtype == ms.float32
    np.testing.assert_allclose(per.asnumpy(), ref_per, rtol=1e-6)
    assert float(total.asnumpy()) == pytest.approx(ref_total, rel=1e-6)
    # hand check of the fractional weighting on branch 1
    err = ((preds[1] - tgts[1]) ** 2).mean(-1)
    assert float(per.asnumpy()[1]) == pytest.approx(float((err * masks[1]).sum() / masks[1].sum()), rel=1e-6)
