"""Mask sampling (docs/method.md#masking): ViT per-sample argsort, Swin per-batch cell mask."""
import numpy as np
import pytest

from localmim.core import masking
from localmim.core.masking import mask_rng, num_keep, swin_cell_mask, vit_mask


def test_mask_rng_is_default_rng_of_the_four_ints():
    expected = np.random.default_rng([3, 1, 4, 1]).random(5)
    np.testing.assert_array_equal(mask_rng(3, 1, 4, 1).random(5), expected)
    np.testing.assert_array_equal(mask_rng(np.int64(3), 1, 4, 1).random(5), expected)


@pytest.mark.parametrize("args, name", [
    ((-1, 0, 0, 0), "seed"), ((0, 1.5, 0, 0), "epoch"), ((0, 0, True, 0), "step"), ((0, 0, 0, "1"), "rank"),
])
def test_mask_rng_rejects_bad_components(args, name):
    with pytest.raises(ValueError, match=f"component {name} must be a non-negative integer"):
        mask_rng(*args)


@pytest.mark.parametrize("n, ratio, keep", [
    (196, 0.75, 49), (196, 0.0, 196), (49, 0.75, 12), (100, 0.9, 10), (10, 0.7, 3), (196, 0.6, 78),
])
def test_num_keep(n, ratio, keep):
    assert num_keep(n, ratio) == keep


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "0.5", None])
def test_num_keep_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask ratio must be a number in"):
        num_keep(196, ratio)


def test_vit_mask_shapes_counts_dtypes():
    m = vit_mask(mask_rng(0, 0, 0, 0), batch=3, num_patches=196, ratio=0.75)
    assert m.ids_keep.shape == (3, 49) and m.ids_keep.dtype == np.int64
    assert m.ids_restore.shape == (3, 196) and m.ids_restore.dtype == np.int64
    assert m.mask.shape == (3, 196) and m.mask.dtype == np.float32
    np.testing.assert_array_equal(m.mask.sum(axis=1), [147, 147, 147])
    assert set(np.unique(m.mask)) == {0.0, 1.0}
    assert set(m.as_dict()) == {"ids_keep", "ids_restore", "mask"}
    assert m.as_dict()["mask"] is m.mask


def test_vit_mask_keeps_smallest_noise_in_noise_order():
    batch, n, ratio = 4, 16, 0.75
    noise = np.random.default_rng([5, 6, 7, 8]).random((batch, n))
    m = vit_mask(mask_rng(5, 6, 7, 8), batch, n, ratio)
    for b in range(batch):
        order = sorted(range(n), key=lambda i: noise[b, i])  # independent of numpy's argsort
        assert m.ids_keep[b].tolist() == order[:4]
        # ids_restore[i] is the rank of patch i in the shuffle
        assert [int(m.ids_restore[b, i]) for i in order] == list(range(n))


def test_vit_mask_is_consistent_in_raster_order():
    m = vit_mask(mask_rng(1, 2, 3, 0), batch=5, num_patches=64, ratio=0.6)
    keep = num_keep(64, 0.6)
    ids_shuffle = np.argsort(m.ids_restore, axis=1)
    np.testing.assert_array_equal(ids_shuffle[:, :keep], m.ids_keep)
    np.testing.assert_array_equal(np.take_along_axis(ids_shuffle, m.ids_restore, axis=1),
                                  np.tile(np.arange(64), (5, 1)))
    np.testing.assert_array_equal(np.take_along_axis(m.mask, m.ids_keep, axis=1), 0.0)
    np.testing.assert_array_equal(m.mask, (m.ids_restore >= keep).astype(np.float32))
    # un-shuffling [visible tokens, mask tokens] with ids_restore puts every visible patch back
    seq = np.concatenate([m.ids_keep, np.full((5, 64 - keep), -1)], axis=1)
    restored = np.take_along_axis(seq, m.ids_restore, axis=1)
    for b in range(5):
        visible = np.flatnonzero(m.mask[b] == 0)
        np.testing.assert_array_equal(restored[b, visible], visible)


def test_vit_masks_differ_per_sample():
    m = vit_mask(mask_rng(0, 0, 0, 0), batch=4, num_patches=196, ratio=0.75)
    assert len({row.tobytes() for row in m.mask}) == 4


def test_vit_mask_reproducible_and_keyed_by_step_and_rank():
    def draw(*key):
        return vit_mask(mask_rng(*key), 2, 196, 0.75).mask
    np.testing.assert_array_equal(draw(0, 1, 2, 3), draw(0, 1, 2, 3))
    assert not np.array_equal(draw(0, 1, 2, 3), draw(0, 1, 2, 4))
    assert not np.array_equal(draw(0, 1, 2, 3), draw(0, 1, 3, 3))
    assert not np.array_equal(draw(0, 1, 2, 3), draw(0, 2, 2, 3))


def test_vit_mask_ratio_zero_keeps_all():
    m = vit_mask(mask_rng(0, 0, 0, 0), 2, 9, 0.0)
    assert m.ids_keep.shape == (2, 9) and not m.mask.any()


def test_vit_mask_errors():
    with pytest.raises(ValueError, match="leaves no visible token out of 4"):
        vit_mask(mask_rng(0, 0, 0, 0), 1, 4, 0.9)
    with pytest.raises(ValueError, match="batch size must be a positive integer, got 0"):
        vit_mask(mask_rng(0, 0, 0, 0), 0, 4, 0.5)


@pytest.mark.parametrize("grid, ratio, masked", [(7, 0.75, 37), (7, 0.5, 25), (4, 0.5, 9), (7, 0.0, 1)])
def test_swin_cell_mask_count(grid, ratio, masked):
    m = swin_cell_mask(mask_rng(0, 0, 0, 0), grid, ratio)
    assert m.dtype == np.bool_ and m.shape == (grid * grid,)
    assert int(m.sum()) == masked == masking.num_masked_cells(grid * grid, ratio)


def test_swin_cell_mask_is_randperm_le_floor():
    perm = np.random.default_rng([9, 0, 1, 2]).permutation(49)
    np.testing.assert_array_equal(swin_cell_mask(mask_rng(9, 0, 1, 2), 7, 0.75), perm <= 36)


def test_swin_cell_mask_reproducible_and_keyed_by_rank():
    a = swin_cell_mask(mask_rng(0, 3, 5, 0), 7, 0.75)
    np.testing.assert_array_equal(a, swin_cell_mask(mask_rng(0, 3, 5, 0), 7, 0.75))
    assert not np.array_equal(a, swin_cell_mask(mask_rng(0, 3, 5, 1), 7, 0.75))


def test_swin_cell_mask_needs_a_visible_cell():
    with pytest.raises(ValueError, match="masks floor\\(0.75\\*4\\)\\+1 = 4 of 4 cells, leaving no visible cell"):
        swin_cell_mask(mask_rng(0, 0, 0, 0), 2, 0.75)
    with pytest.raises(ValueError, match="mask_grid must be a positive integer"):
        swin_cell_mask(mask_rng(0, 0, 0, 0), 0, 0.5)
