"""PyTorch targets, per-scale masks and loss against the numpy references in core.targets."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from localmim.backends.torch import targets as T
from localmim.core import targets as C


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def test_scale_masks_match_core(tiny64_spec, h):
    m = h.make_mask(tiny64_spec, 3)
    got = T.scale_masks(_t(m.mask), tiny64_spec.grid, tiny64_spec.scales)
    want = C.scale_masks(m.mask, tiny64_spec.grid, tiny64_spec.scales)
    assert [tuple(g.shape) for g in got] == [(3, 1024), (3, 256), (3, 64), (3, 16)]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        np.testing.assert_array_equal(g.numpy(), w)
    # the 0.5 scale is fractional: a 2x2 block with one masked patch weighs 0.25
    coarse = T.scale_masks(torch.tensor([[1.0, 0, 0, 0]]), 2, [0.5, 2.0])
    assert coarse[0].tolist() == [[0.25]]
    assert coarse[1].reshape(4, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"mask must be \(B, 64\) for grid 8"):
        T.scale_masks(torch.zeros(2, 10), 8, [1.0])


def test_patchify_and_pixel_targets_match_core(h):
    imgs = h.make_images(2, 32, seed=1)
    for p in (2, 4, 8, 16):
        np.testing.assert_array_equal(T.patchify(_t(imgs), p).numpy(), C.patchify(imgs, p))
        assert torch.equal(T.unpatchify(T.patchify(_t(imgs), p), p), _t(imgs))
    for norm in (True, False):
        got = T.pixel_targets(_t(imgs), [2, 4, 8, 16], norm)
        want = C.pixel_targets(imgs, [2, 4, 8, 16], norm)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == torch.float32
            assert h.rel_err(g, w) < 1e-5
    # unbiased variance: tokens [0, 2] have mean 1 and var 2 -> +-1/sqrt(2 + 1e-6)
    t = T.normalize_pixels(torch.tensor([[[0.0, 2.0]]]))
    assert torch.allclose(t, torch.tensor([[[-1.0, 1.0]]]) / math.sqrt(2.0 + 1e-6), atol=1e-7)


def test_sobel_and_gradients_match_core_bit_for_bit(h):
    np.testing.assert_array_equal(T.sobel_kernel().numpy(), C.sobel_kernel())
    for imgs in (h.make_images(2, 16, seed=2), h.eight_bit_images(0, 2, 16)):
        got = T.image_gradients(_t(imgs))
        assert got.shape == (2, 3, 2, 16, 16) and got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), C.image_gradients(imgs))
        bias = np.array([0.2, -0.1], dtype=np.float32)
        np.testing.assert_array_equal(T.image_gradients(_t(imgs), bias=_t(bias)).numpy(),
                                      C.image_gradients(imgs, bias))
    # the frozen HOGLayer module is the same reflect-padded filter, bias included
    for bias in (False, True):
        layer = T.HOGLayer(bias=bias)
        with torch.no_grad():
            out = layer(_t(imgs).reshape(6, 1, 16, 16)).reshape(2, 3, 2, 16, 16)
        want = C.image_gradients(imgs, layer.conv.bias.numpy() if bias else None)
        np.testing.assert_array_equal(out.numpy(), want)
        assert not any(p.requires_grad for p in layer.parameters())


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
        got = T.orientation_bins(_t(gg[0]), _t(gg[1]), nbins)
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), C.orientation_bins(gg[0], gg[1], nbins))


def test_histogram_matches_core_on_same_gradients(h):
    for imgs in (h.make_images(2, 16, seed=3), h.eight_bit_images(1, 2, 16)):
        grad = C.image_gradients(imgs)
        for nbins in (9, 18):
            got = T.hog_histogram(_t(grad), nbins).numpy()
            want = C.hog_histogram(grad, nbins)
            assert got.shape == (2, 3, nbins, 16, 16)
            np.testing.assert_array_equal(got != 0, want != 0)                 # the same bins
            np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)         # sqrt: 1 ulp on CPU


@pytest.mark.parametrize("image, mag, bin_", [
    ("x", 8.0, 4), ("-x", 8.0, 4), ("y", 8.0, 0), ("x+y", 8.0 * math.sqrt(2.0), 2)])
def test_hog_ramp_vectors(image, mag, bin_):
    """HOG test vectors (docs/method.md#hog-test-vectors): unit-slope ramps, 9 bins, interior
    magnitude and bin, zero borders."""
    y, x = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    img = {"x": x, "-x": -x, "y": y, "x+y": x + y}[image]
    hist = T.hog_histogram(T.image_gradients(img.expand(1, 3, 12, 12).contiguous()), 9)[0, 0]
    inner = hist[:, 1:-1, 1:-1]
    assert torch.allclose(inner.sum(0), torch.full((10, 10), mag), atol=1e-5)
    assert torch.all(inner.argmax(0) == bin_)
    if image in ("x", "-x"):
        assert torch.all(hist[:, :, [0, 11]].sum(0) == 0)
    if image == "y":
        assert torch.all(hist[:, [0, 11], :].sum(0) == 0)


def _compare_hog(got, want, atol=1e-6):
    """Every cell of every scale agrees: the bins are identical, only the pooling order differs."""
    for g, w in zip(got, want):
        g = g.numpy()
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0, atol=atol)


def test_hog_targets_match_core(h):
    imgs = h.make_images(3, 32, seed=4)
    cells = [2, 4, 8, 16]
    got = T.hog_targets(_t(imgs), cells, 9)
    want = C.hog_targets(imgs, cells, 9)
    assert [tuple(g.shape) for g in got] == [(3, 256, 27), (3, 64, 27), (3, 16, 27), (3, 4, 27)]
    _compare_hog(got, want)
    # each colour channel's bins are unit vectors (non-flat images)
    norms = torch.linalg.vector_norm(got[1].reshape(3, 64, 3, 9), dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_hog_targets_with_bias_match_core(h):
    imgs = h.make_images(2, 32, seed=5)
    imgs[:, :, :8, :8] = 0.0  # a flat region: only the bias gives it an orientation
    biases = C.sample_hog_bias(np.random.default_rng(0), 4)
    cells = [2, 4, 8, 16]
    got = T.hog_targets(_t(imgs), cells, 18, biases=_t(biases))
    want = C.hog_targets(imgs, cells, 18, biases=biases)
    _compare_hog(got, want)
    plain = T.hog_targets(_t(imgs), cells, 18)
    assert plain[0][0, 0].abs().sum() == 0 and got[0][0, 0].abs().sum() > 0


@pytest.mark.parametrize("nbins, with_bias", [(9, False), (18, True)])
def test_hog_targets_of_8bit_images_match_core_in_every_cell(nbins, with_bias, h):
    """The recipes' targets on photograph-like images: exactly zero gradients bin like the core."""
    imgs = h.eight_bit_images(2, 2, 32)
    assert (C.image_gradients(imgs)[:, :, 0] == 0).mean() > 0.1
    biases = C.sample_hog_bias(np.random.default_rng(1), 4) if with_bias else None
    got = T.hog_targets(_t(imgs), [4, 8, 16, 32], nbins, biases=None if biases is None else _t(biases))
    _compare_hog(got, C.hog_targets(imgs, [4, 8, 16, 32], nbins, biases))


def test_hierarchical_pooling_equals_direct():
    hist = torch.rand(2, 3, 9, 32, 32)
    got = T._pool_cells(hist, [16, 2, 8, 4])
    for g, c in zip(got, [16, 2, 8, 4]):
        want = F.avg_pool2d(hist.reshape(2, 27, 32, 32), c).reshape(2, 3, 9, 32 // c, 32 // c)
        assert torch.allclose(g, want, atol=1e-6)


def test_loss_matches_core_and_stays_float32(tiny64_spec, h):
    g = torch.Generator().manual_seed(0)
    m = h.make_mask(tiny64_spec, 2)
    masks_np = C.scale_masks(m.mask, tiny64_spec.grid, tiny64_spec.scales)
    preds = [torch.randn(2, mk.shape[1], 27, generator=g) for mk in masks_np]
    tgts = [torch.randn(2, mk.shape[1], 27, generator=g) for mk in masks_np]
    total, per = T.localmim_loss(preds, tgts, [_t(mk) for mk in masks_np])
    want_total, want_per = C.localmim_loss([p.numpy() for p in preds], [t.numpy() for t in tgts], masks_np)
    assert per.shape == (4,) and per.dtype == torch.float32 and total.dtype == torch.float32
    assert abs(total.item() - want_total) / want_total < 1e-6
    assert np.allclose(per.numpy(), want_per, rtol=1e-6)
    # low-precision predictions still reduce in float32
    bf_total, _ = T.localmim_loss([p.bfloat16() for p in preds], tgts, [_t(mk) for mk in masks_np])
    assert bf_total.dtype == torch.float32
    # only masked positions count: changing a visible prediction leaves the loss unchanged
    vis = int(np.flatnonzero(masks_np[2][0] == 0)[0])
    preds[2][0, vis] += 100.0
    assert torch.equal(T.localmim_loss(preds, tgts, [_t(mk) for mk in masks_np])[0], total)
