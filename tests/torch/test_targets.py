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


def test_sobel_and_gradients_match_core(h):
    np.testing.assert_array_equal(T.sobel_kernel().numpy(), C.sobel_kernel())
    imgs = h.make_images(2, 16, seed=2)
    got = T.image_gradients(_t(imgs))
    assert got.shape == (2, 3, 2, 16, 16)
    assert np.abs(got.numpy() - C.image_gradients(imgs)).max() < 1e-5
    bias = np.array([0.2, -0.1], dtype=np.float32)
    got_b = T.image_gradients(_t(imgs), bias=_t(bias))
    assert np.abs(got_b.numpy() - C.image_gradients(imgs, bias)).max() < 1e-5
    # the frozen HOGLayer module is the same reflect-padded filter
    layer = T.HOGLayer(bias=False)
    with torch.no_grad():
        out = layer(_t(imgs).reshape(6, 1, 16, 16)).reshape(2, 3, 2, 16, 16)
    assert torch.allclose(out, got, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())


def test_histogram_matches_core_on_same_gradients(h):
    imgs = h.make_images(2, 16, seed=3)
    grad = C.image_gradients(imgs)
    for nbins in (9, 18):
        got = T.hog_histogram(_t(grad), nbins).numpy()
        want = C.hog_histogram(grad, nbins)
        assert got.shape == (2, 3, nbins, 16, 16)
        flipped = np.mean(got.argmax(2) != want.argmax(2))
        assert flipped < 1e-3
        same = got.argmax(2) == want.argmax(2)
        assert np.allclose(got.max(2)[same], want.max(2)[same], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("image, mag, bin_", [
    ("x", 8.0, 4), ("-x", 8.0, 4), ("y", 8.0, 0), ("x+y", 8.0 * math.sqrt(2.0), 2)])
def test_hog_ramp_vectors(image, mag, bin_):
    """Spec §1.5 test vectors: unit-slope ramps, 9 bins, interior magnitude and bin, zero borders."""
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


def _compare_hog(got, want, flip_share=0.01, atol=1e-5):
    """Targets agree except for cells whose histogram changed through a bin flip at an edge."""
    for g, w in zip(got, want):
        g = g.numpy()
        assert g.shape == w.shape and g.dtype == np.float32
        bad = np.abs(g - w).max(-1) > atol
        assert bad.mean() <= flip_share, bad.mean()


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
