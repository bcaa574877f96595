"""tools.heldout: the split of the sample photographs and the held-out losses against hand-computed
numbers; the evaluation driven through a stand-in inference module (core targets, no framework)."""
import os
import types

import numpy as np
import pytest

from localmim.core import masking
from localmim.core import targets as core_targets
from localmim.core.specs import TargetSpec, get_spec
from localmim.tools import heldout


def test_hand_computed_losses_of_the_model_and_of_the_mean():
    # image 0: 4 cells of 2 features, mean vector [1, 1]; cells 0 and 1 masked
    t0 = np.array([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])
    p0 = t0 + np.array([[[0.5, 0.5], [0.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])    # visible cells do not count
    m0 = np.array([[1.0, 1.0, 0.0, 0.0]])
    model, mean = heldout.masked_losses([p0], [t0], [m0])
    # mean: cell 0 ((1-1)^2 + (1-0)^2) / 2 = 0.5, cell 1 ((1-3)^2 + 1^2) / 2 = 2.5 -> 1.5
    assert mean == [pytest.approx(1.5)] and model == [pytest.approx((0.25 + 0.0) / 2)]
    # two images pooled, the second with a fractional weight: mean vector [2, 2]
    t1 = np.array([[[2.0, 2.0], [4.0, 2.0], [0.0, 2.0], [2.0, 2.0]]])
    m1 = np.array([[0.5, 1.0, 1.0, 0.0]])
    _, both = heldout.masked_losses([np.concatenate([t0, t1])], [np.concatenate([t0, t1])],
                                    [np.concatenate([m0, m1])])
    # image 1 cells: 0 -> 0, 1 -> (4 + 0) / 2 = 2, 2 -> (4 + 0) / 2 = 2; weights 0.5, 1, 1
    assert both == [pytest.approx((1.0 * 0.5 + 1.0 * 2.5 + 0.5 * 0.0 + 1.0 * 2.0 + 1.0 * 2.0) / 4.5)]


def test_mean_prediction_is_each_images_own_mean():
    t = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    pred = heldout.mean_target_predictions(t)
    np.testing.assert_array_equal(pred[0], np.tile([2.0, 3.0], (3, 1)))
    np.testing.assert_array_equal(pred[1], np.tile([8.0, 9.0], (3, 1)))
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        heldout.mean_target_predictions(t[0])


def test_normalised_pixels_of_noise_have_a_baseline_near_one():
    """Each norm_pix cell has zero mean and unbiased unit variance, so its mean square is (n-1)/n;
    for noise the image's mean cell is near zero, so the baseline is near (n-1)/n."""
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((4, 3, 64, 64)).astype(np.float32)
    (t,) = core_targets.pixel_targets(imgs, [4], True)                      # 48 values per cell
    mask = np.ones(t.shape[:2])
    _, (mean,) = heldout.masked_losses([t], [t], [mask])
    assert mean == pytest.approx(47 / 48, abs=0.02)


def test_held_out_names():
    for name in ("chelsea.png", "chelsea_q0.png", "chelsea_t8.png", "coffee_q3.png", "/a/b/coffee.png"):
        assert heldout.is_held_out(name)
    for name in ("astronaut.png", "chelsea2.png", "coffeecup.png", "chelsea_x1.png", "rocket_t0.png"):
        assert not heldout.is_held_out(name)


def test_split_of_the_sample_photographs(sample_dir):
    train, held = heldout.split_sample_images(sample_dir)
    names = sorted(os.listdir(sample_dir))
    assert len(names) == 126 and len(held) == 28
    assert sorted(os.listdir(train)) == [n for n in names if not heldout.is_held_out(n)]
    assert {os.path.basename(p).split("_")[0].split(".")[0] for p in held} == {"chelsea", "coffee"}
    assert all(os.path.dirname(p) == sample_dir for p in held)
    mtime = os.stat(train).st_mtime_ns
    assert heldout.split_sample_images(sample_dir) == (train, held) and os.stat(train).st_mtime_ns == mtime


def _stand_in_inference(spec, calls):
    """reconstruct() from core targets: predictions are half the targets."""
    def reconstruct(model, images, mask):
        calls.append((len(images), mask))
        branches = spec.branches()
        tg = core_targets.pixel_targets(images, [b.cell for b in branches], spec.target.norm_pix)
        return {"targets": tg, "preds": [t * 0.5 for t in tg],
                "masks": core_targets.scale_masks(mask.mask, spec.grid, [b.scale for b in branches])}
    return types.SimpleNamespace(reconstruct=reconstruct)


def test_evaluate_images_pools_every_image(sample_dir):
    spec = get_spec("vit_tiny_test", target=TargetSpec(kind="pixel", norm_pix=False))   # 32 px
    paths = [os.path.join(sample_dir, n) for n in ("chelsea.png", "coffee.png", "coffee_q1.png")]
    calls = []
    result = heldout.evaluate_images(_stand_in_inference(spec, calls), None, spec, paths, seed=5, ratio=0.75,
                                     batch_size=2)
    # batches of 2 and 1; batch b is masked with mask_rng(5, 0, b, 0), one mask per image
    assert [n for n, _ in calls] == [2, 1] and result.images == 3
    for b, (n, mask) in enumerate(calls):
        want = masking.vit_mask(masking.mask_rng(5, 0, b, 0), n, spec.num_patches, 0.75)
        np.testing.assert_array_equal(mask.mask, want.mask)
    masks = np.concatenate([m.mask for _, m in calls])
    assert len({row.tobytes() for row in masks}) == 3
    # predicting half the target costs a quarter of the mean square of the masked targets
    from localmim.tools.visualize import load_image, normalize_image
    imgs = np.concatenate([normalize_image(load_image(p, 32)) for p in paths])
    for k, b in enumerate(spec.branches()):
        (t,) = core_targets.pixel_targets(imgs, [b.cell], False)
        (m,) = core_targets.scale_masks(masks, spec.grid, [b.scale])
        want = (m * (t ** 2).mean(-1)).sum() / m.sum() / 4
        assert result.model[k] == pytest.approx(want, rel=1e-5)
        assert result.mean[k] == pytest.approx(core_targets.masked_mse(heldout.mean_target_predictions(t), t, m),
                                               rel=1e-6)
    assert result.model_total == pytest.approx(sum(result.model)) and result.ratio == pytest.approx(
        sum(result.model) / sum(result.mean))
    line = result.line()
    assert line == f"held-out masked loss: {result.model_total:.4f} (predicting the mean: {result.mean_total:.4f})"


def test_swin_batches_share_one_cell_mask():
    spec = get_spec("swin_tiny_test")
    cells = heldout.batch_mask(spec, 3, 1, 8, 0.75)
    np.testing.assert_array_equal(cells, masking.swin_cell_mask(masking.mask_rng(3, 0, 1, 0), spec.mask_grid, 0.75))
