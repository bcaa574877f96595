"""Model specs: the branch layout of every registered model and the geometry errors
(docs/method.md#model-configurations, #swin-branches, #h1, #h2)."""
import pytest

from localmim.core import specs
from localmim.core.specs import SpecError, SwinSpec, TargetSpec, ViTSpec, get_spec


@pytest.mark.parametrize("name, depth, taps, width, out_dim", [
    ("vit_small_patch16", 12, (1, 3, 9, 11), 384, 27),
    ("vit_base_patch16", 12, (1, 3, 9, 11), 768, 27),
    ("vit_large_patch16", 24, (1, 3, 21, 23), 1024, 54),
])
def test_reference_vit_branches(name, depth, taps, width, out_dim):
    spec = get_spec(name)
    assert spec.depth == depth and spec.grid == 14 and spec.num_patches == 196
    branches = spec.branches()
    assert [b.tap for b in branches] == list(taps)
    assert [b.scale for b in branches] == [4.0, 2.0, 1.0, 0.5]
    assert [b.cell for b in branches] == [4, 8, 16, 32]
    assert [b.grid for b in branches] == [56, 28, 14, 7]
    assert all(b.in_dim == width and b.decoder_dim == 256 and b.decoder_depth == 1 and b.decoder_heads == 8
               for b in branches)
    assert spec.out_dims() == (out_dim,) * 4


def test_vit_large_uses_hog_bias_and_base_does_not():
    assert get_spec("vit_large_patch16").target == TargetSpec(kind="hog", nbins=18, hog_bias=True)
    assert get_spec("vit_base_patch16").target.hog_bias is False


def test_vit_pixel_out_dims_follow_cells():
    spec = get_spec("vit_base_patch16", target=TargetSpec(kind="pixel"))
    assert spec.out_dims() == (3 * 16, 3 * 64, 3 * 256, 3 * 1024)


def test_tiny_vit_geometry():
    spec = get_spec("vit_tiny_test")
    assert spec.grid == 4
    assert [(b.cell, b.grid) for b in spec.branches()] == [(2, 16), (4, 8), (8, 4), (16, 2)]


@pytest.mark.parametrize("name, width, cells, grids, in_dims", [
    ("swin_base_patch4_win7", 128, [8, 16, 32, 32], [28, 14, 7, 7], [256, 512, 1024, 1024]),
    ("swin_large_patch4_win14", 192, [8, 16, 32, 32], [28, 14, 7, 7], [384, 768, 1536, 1536]),
])
def test_reference_swin_branches(name, width, cells, grids, in_dims):
    spec = get_spec(name)
    assert spec.mask_grid == 7 and spec.mask_cell == 32
    assert [spec.stage_resolution(i) for i in range(4)] == [56, 28, 14, 7]
    branches = spec.branches()
    assert [b.cell for b in branches] == cells
    assert [b.grid for b in branches] == grids
    assert [b.in_dim for b in branches] == in_dims
    assert [b.decoder_dim for b in branches] == [64, 128, 128, 128]


def test_swin_out_dims():
    assert get_spec("swin_base_patch4_win7").out_dims() == (192, 768, 3072, 3072)
    assert get_spec("swin_large_patch4_win14").out_dims() == (54,) * 4


def test_swin_windows_and_shifts():
    spec = get_spec("swin_base_patch4_win14")
    assert [spec.stage_window(i) for i in range(4)] == [14, 14, 14, 7]
    assert [spec.stage_shift(i) for i in range(4)] == [7, 7, 0, 0]
    spec7 = get_spec("swin_base_patch4_win7")
    assert [spec7.stage_shift(i) for i in range(4)] == [3, 3, 3, 0]


def test_list_and_unknown_name():
    assert "vit_base_patch16" in specs.list_specs() and "swin_tiny_test" in specs.list_specs()
    with pytest.raises(SpecError, match="unknown model 'vit_giant'"):
        get_spec("vit_giant")


def test_duplicate_default_taps_for_shallow_vit():
    with pytest.raises(SpecError, match=r"\[1, 3, 3, 5\] contain duplicates"):
        ViTSpec("shallow", patch_size=8, embed_dim=32, depth=6, num_heads=2, img_size=64)


def test_vit_huge_patch14_cannot_use_hog_cells():
    with pytest.raises(SpecError, match="3.5-px target cell"):
        ViTSpec("vit_huge_patch14", 14, 1280, 32, 16)


def test_odd_grid_with_half_scale():
    with pytest.raises(SpecError, match="even patch grid, got 13"):
        get_spec("vit_base_patch16", img_size=208)


def test_image_not_divisible_by_patch():
    with pytest.raises(SpecError, match="img_size 200 is not a multiple of patch_size 16"):
        get_spec("vit_base_patch16", img_size=200)


def test_swin_image_not_divisible_by_mask_cell():
    with pytest.raises(SpecError, match="multiple of the 32-px mask cell"):
        get_spec("swin_base_patch4_win7", img_size=200)


def test_taps_out_of_range_and_unsorted():
    with pytest.raises(SpecError, match=r"must lie in \[0, 11\]"):
        get_spec("vit_base_patch16", taps=(1, 3, 9, 12))
    with pytest.raises(SpecError, match="must be increasing"):
        get_spec("vit_base_patch16", taps=(3, 1, 9, 11))


def test_bad_target():
    with pytest.raises(SpecError, match="kind must be 'hog' or 'pixel'"):
        TargetSpec(kind="depth")
    with pytest.raises(SpecError, match="nbins must be a positive integer"):
        TargetSpec(kind="hog", nbins=0)


def test_swin_spec_mismatched_heads():
    with pytest.raises(SpecError, match="4 stage depths but 3 head counts"):
        SwinSpec("bad", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4), window_size=4,
                 patch_size=2, img_size=64, decoder_dims=(8, 16, 16, 16), decoder_heads=2)
