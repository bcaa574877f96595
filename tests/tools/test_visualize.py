"""tools.visualize (pure rendering on synthetic arrays, image loading) and tools.sample_images."""
import math
import os

import numpy as np
import pytest
from PIL import Image

from localmim.core import masking
from localmim.core import targets as core_targets
from localmim.core.specs import get_spec
from localmim.tools import visualize as vis
from localmim.tools.sample_images import sample_image_dir


def _hog_inputs(spec, seed=0):
    """A real image's HOG targets, noisy predictions and per-scale masks for a ViT spec."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:spec.img_size, 0:spec.img_size] / spec.img_size
    image = (np.stack([np.sin(7 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 127 + 128).astype(np.uint8)
    branches = spec.branches()
    targets = [t[0] for t in core_targets.hog_targets(vis.normalize_image(image), [b.cell for b in branches],
                                                       spec.target.nbins)]
    preds = [t + 0.2 * rng.standard_normal(t.shape).astype(np.float32) for t in targets]
    vm = masking.vit_mask(masking.mask_rng(seed, 0, 0, 0), 1, spec.num_patches, 0.75)
    masks = [m[0] for m in core_targets.scale_masks(vm.mask, spec.grid, [b.scale for b in branches])]
    return image, vm.mask[0], targets, preds, masks


def _panel_box(spec, row, col):
    """(top, left, size) of the panel at `row` (0 = header), `col` (0 target, 1 prediction)."""
    panel = spec.img_size * vis._panel_scale(spec.img_size)
    top = vis.MARGIN + row * (vis.LABEL_H + panel + vis.MARGIN) + vis.LABEL_H
    left = vis.MARGIN + col * (panel + vis.MARGIN)
    return top, left, panel


def _crop(fig, box):
    top, left, size = box
    return fig[top:top + size, left:left + size].astype(np.float64)


def test_figure_shape_and_layout():
    spec = get_spec("vit_tiny_test", img_size=64)
    image, mask, targets, preds, masks = _hog_inputs(spec)
    fig = vis.render_reconstruction(image, mask, targets, preds, masks, spec)
    panel = 256                                                    # 64 px x 4, the smallest >= 256
    assert fig.dtype == np.uint8 and fig.shape == (
        vis.MARGIN + 5 * (vis.LABEL_H + panel + vis.MARGIN) + 2 * vis.LABEL_H, 3 * vis.MARGIN + 2 * panel, 3)
    # the header's original panel is the image, upscaled 4x by repetition
    np.testing.assert_array_equal(_crop(fig, _panel_box(spec, 0, 0))[::4, ::4], image)
    # the masked input greys out exactly the masked patches (8 px patches -> 32 px blocks)
    masked = _crop(fig, _panel_box(spec, 0, 1))
    g = spec.grid
    for idx in range(g * g):
        r, c = divmod(idx, g)
        block = masked[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
        if mask[idx] > 0.5:
            assert np.all(block == vis.MASK_GREY)
        else:
            np.testing.assert_array_equal(block[::4, ::4], image[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8])


def test_visible_cells_are_dimmed_and_masked_cells_are_not():
    spec = get_spec("vit_tiny_test", img_size=64)
    image, mask, targets, preds, _ = _hog_inputs(spec)
    all_masked = [np.ones(t.shape[0], np.float32) for t in targets]
    all_visible = [np.zeros(t.shape[0], np.float32) for t in targets]
    bright = vis.render_reconstruction(image, mask, targets, preds, all_masked, spec)
    dim = vis.render_reconstruction(image, mask, targets, preds, all_visible, spec)
    for row in range(1, 5):
        for col in range(2):
            a, b = _crop(bright, _panel_box(spec, row, col)), _crop(dim, _panel_box(spec, row, col))
            assert a.mean() > 20
            np.testing.assert_allclose(b, a * vis.VISIBLE_DIM, atol=1.01)
    # mixed mask: branch 2 (scale 1, 8x8 cells of 32 px) dims exactly the visible cells
    half = [np.ones(t.shape[0], np.float32) for t in targets]
    half[2][::2] = 0.0
    mixed = vis.render_reconstruction(image, mask, targets, preds, half, spec)
    a, m = _crop(bright, _panel_box(spec, 3, 0)), _crop(mixed, _panel_box(spec, 3, 0))
    for idx in range(64):
        r, c = divmod(idx, 8)
        cell = (slice(r * 32, (r + 1) * 32), slice(c * 32, (c + 1) * 32))
        expect = a[cell] * (vis.VISIBLE_DIM if idx % 2 == 0 else 1.0)
        np.testing.assert_allclose(m[cell], expect, atol=1.01)


def test_different_predictions_give_different_pixels_and_targets_stay():
    spec = get_spec("vit_tiny_test", img_size=64)
    image, mask, targets, preds, masks = _hog_inputs(spec)
    other = [p[:, ::-1].copy() for p in preds]                       # bins reversed: other orientations
    fig_a = vis.render_reconstruction(image, mask, targets, preds, masks, spec)
    fig_b = vis.render_reconstruction(image, mask, targets, other, masks, spec)
    for row in range(1, 5):
        np.testing.assert_array_equal(_crop(fig_a, _panel_box(spec, row, 0)), _crop(fig_b, _panel_box(spec, row, 0)))
        assert np.abs(_crop(fig_a, _panel_box(spec, row, 1)) - _crop(fig_b, _panel_box(spec, row, 1))).mean() > 2
    # a prediction equal to the target renders identically
    same = vis.render_reconstruction(image, mask, targets, targets, masks, spec)
    for row in range(1, 5):
        np.testing.assert_array_equal(_crop(same, _panel_box(spec, row, 0)), _crop(same, _panel_box(spec, row, 1)))


def test_hog_glyph_runs_along_the_edge():
    """An x ramp has its gradient in bin 4 of 9 (docs/method.md#hog-test-vectors); its edges, and the
    glyph, are vertical."""
    nbins = 9
    ramp = np.tile(np.arange(32, dtype=np.float32), (32, 1))
    img = np.repeat(ramp[None, None], 3, axis=1)
    hog = core_targets.hog_targets(img, [32], nbins)[0][0]             # one 32-px cell
    assert int(np.argmax(hog[0, :nbins])) == 4
    panel = vis.render_hog(hog, nbins, 64)                             # one 64-px cell: glyphs drawn
    centre_col, centre_row = panel[4:60, 31:33].max(axis=(1, 2)), panel[31:33, 4:60].max(axis=(0, 2))
    assert (centre_col > 200).mean() > 0.8                              # a long vertical line
    assert (centre_row > 200).mean() < 0.15                             # not a horizontal one
    # y ramp: bin 0 (centre 10 degrees), nearly horizontal edges: within +-6 px of the middle row
    hog_y = core_targets.hog_targets(img.transpose(0, 1, 3, 2).copy(), [32], nbins)[0][0]
    assert int(np.argmax(hog_y[0, :nbins])) == 0
    panel_y = vis.render_hog(hog_y, nbins, 64)
    assert (panel_y[25:39, 4:60].max(axis=(0, 2)) > 200).mean() > 0.8
    assert (panel_y[4:24].max(axis=2) > 200).sum() == 0 and (panel_y[40:60].max(axis=2) > 200).sum() == 0
    # glyph directions: bin centres (b + 0.5) * pi / nbins, edge = gradient + 90 degrees
    assert vis.bin_angle(4, 9) == pytest.approx(math.pi / 2)
    dx, dy = vis._edge_direction(vis.bin_angle(4, 9))
    assert abs(dx) < 1e-12 and dy == pytest.approx(-1.0)


def test_hog_colour_code_hue_follows_orientation_and_flat_cells_are_black():
    nbins = 9
    feats = np.zeros((4, 3 * nbins), np.float32)
    feats[0, [0, nbins, 2 * nbins]] = 1.0                                  # bin 0 in R, G, B
    feats[1, [3, nbins + 3, 2 * nbins + 3]] = 1.0                          # bin 3
    feats[2, :] = 1.0                                                      # uniform: dim
    panel = vis.render_hog(feats, nbins, 8)                                # 4-px cells: colour only
    c0, c1, c2, c3 = panel[1, 1], panel[1, 5], panel[5, 1], panel[5, 5]
    expect0 = vis._hsv_to_rgb(np.array([0.5 / 9]), np.array([0.85]), np.array([1.0]))[0] * 255
    expect1 = vis._hsv_to_rgb(np.array([3.5 / 9]), np.array([0.85]), np.array([1.0]))[0] * 255
    np.testing.assert_allclose(c0, expect0, atol=1.0)
    np.testing.assert_allclose(c1, expect1, atol=1.0)
    assert c2.max() < c0.max() and c2.max() > 0
    assert c3.max() == 0


def test_pixel_panels_invert_patchify():
    spec = get_spec("swin_tiny_test")                                      # 64 px, pixel norm_pix targets
    image, _, _, _, _ = _hog_inputs(get_spec("vit_tiny_test", img_size=64))
    x = vis.normalize_image(image)
    tokens = core_targets.patchify(x, 8)[0]
    np.testing.assert_allclose(vis.unpatchify(tokens, 8, 8), x[0].transpose(1, 2, 0), atol=1e-6)
    plain = vis.render_pixels(tokens, 64, norm_pix=False)                   # un-normalised: the image
    np.testing.assert_allclose(plain.astype(int), image.astype(int), atol=1)
    normed = core_targets.pixel_targets(x, [8], True)[0][0]
    stretched = vis.render_pixels(normed, 64, norm_pix=True).reshape(8, 8, 8, 8, 3)
    assert stretched.min() == 0 and stretched.max() == 255
    per_cell = stretched.transpose(0, 2, 1, 3, 4).reshape(64, -1)
    assert (per_cell.min(1) == 0).all() and (per_cell.max(1) == 255).all()  # every cell spans the range
    # the whole figure for a Swin spec: 4 branch rows, pixel targets
    branches = spec.branches()
    tg = [t[0] for t in core_targets.pixel_targets(x, [b.cell for b in branches], True)]
    cells = masking.swin_cell_mask(masking.mask_rng(0, 0, 0, 0), spec.mask_grid, 0.75)
    masks = [np.repeat(np.repeat(cells.reshape(4, 4), b.grid // 4, 0), b.grid // 4, 1).reshape(-1).astype(np.float32)
             for b in branches]
    fig = vis.render_reconstruction(image, cells.astype(np.float32), tg, [t * 0.5 for t in tg], masks, spec)
    assert fig.shape[0] == vis.MARGIN + 5 * (vis.LABEL_H + 256 + vis.MARGIN) + 2 * vis.LABEL_H


def test_render_rejects_mismatched_inputs():
    spec = get_spec("vit_tiny_test", img_size=64)
    image, mask, targets, preds, masks = _hog_inputs(spec)
    with pytest.raises(ValueError, match="branch 1"):
        vis.render_reconstruction(image, mask, targets, [preds[0], preds[2], preds[2], preds[3]], masks, spec)
    with pytest.raises(ValueError, match=r"\(64, 64, 3\) uint8"):
        vis.render_reconstruction(image[:32], mask, targets, preds, masks, spec)


def test_load_image_converts_resizes_and_names_bad_files(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (60, 1))).save(gray)       # 100 x 60, mode L
    out = vis.load_image(str(gray), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all()
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (80, 50), (0, 255, 0, 0)).save(cmyk)
    assert vis.load_image(str(cmyk), 48).shape == (48, 48, 3)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(vis.VisualizeError) as e:
        vis.load_image(str(bad), 32)
    assert "broken.png" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        vis.load_image(str(tmp_path / "nowhere.png"), 32)


def test_backend_from_checkpoint_extension():
    assert vis.backend_for_checkpoint("a/checkpoint-10.pth") == "torch"
    assert vis.backend_for_checkpoint("a/checkpoint-10.ckpt") == "mindspore"
    assert vis.backend_for_checkpoint("weights.bin", "torch") == "torch"
    with pytest.raises(vis.VisualizeError, match="pass --backend"):
        vis.backend_for_checkpoint("weights.bin")


def test_sample_image_dir_holds_colour_photographs(sample_dir, tmp_path):
    names = sorted(os.listdir(sample_dir))
    assert len(names) >= 10 and all(n.endswith(".png") for n in names)
    for name in names[::7]:
        with Image.open(os.path.join(sample_dir, name)) as im:
            assert im.mode == "RGB" and min(im.size) >= 64
            arr = np.asarray(im, dtype=np.int16)
        assert np.abs(arr[..., 0] - arr[..., 1]).mean() > 1 or np.abs(arr[..., 1] - arr[..., 2]).mean() > 1
    assert {"astronaut.png", "chelsea.png", "coffee.png", "rocket.png"} <= set(names)
    # idempotent: a second call returns the same folder without rewriting it
    before = {n: os.stat(os.path.join(sample_dir, n)).st_mtime_ns for n in names}
    assert sample_image_dir(os.path.dirname(sample_dir)) == sample_dir
    assert {n: os.stat(os.path.join(sample_dir, n)).st_mtime_ns for n in names} == before


def test_sample_image_dir_uses_env_cache(monkeypatch, tmp_path, sample_dir):
    import shutil
    cache = tmp_path / "cache"
    (cache / "sample_images").mkdir(parents=True)
    shutil.copy(os.path.join(sample_dir, "chelsea.png"), cache / "sample_images")
    (cache / "sample_images.complete").write_text("1")
    monkeypatch.setenv("LOCALMIM_CACHE", str(cache))
    assert sample_image_dir() == str(cache / "sample_images")


def test_pixel_predictions_come_back_as_images_with_the_visible_patches_pasted():
    """norm_pix and plain targets de-normalise to the original image; the pixel rows show the
    prediction in the hidden patches (grey elsewhere) and the original pasted in the visible ones."""
    spec = get_spec("swin_tiny_test")                                      # 64 px, 4x4 mask cells of 16 px
    image, _, _, _, _ = _hog_inputs(get_spec("vit_tiny_test", img_size=64))
    x = vis.normalize_image(image)
    for norm in (True, False):
        (t,) = core_targets.pixel_targets(x, [8], norm)
        back = vis.denormalize_pixels(t[0], image, norm) * 255.0
        assert np.abs(back - image).max() < 0.6                            # the original, to rounding
    # a norm_pix prediction of 0 is each cell's mean over its 3 x 8 x 8 normalised values, in every channel
    (t,) = core_targets.pixel_targets(x, [8], True)
    flat = vis.denormalize_pixels(np.zeros_like(t[0]), image, True)
    cell_means = x[0].reshape(3, 8, 8, 8, 8).mean(axis=(0, 2, 4))[..., None]        # (8, 8, 1)
    want = np.clip(cell_means * vis.IMAGENET_STD + vis.IMAGENET_MEAN, 0, 1)
    np.testing.assert_allclose(flat[::8, ::8], want, atol=1e-5)
    np.testing.assert_allclose(flat[3::8, 5::8], want, atol=1e-5)                  # the same in the whole cell
    # paste_visible: 0 = visible -> original, 1 = hidden -> reconstruction
    mask = np.zeros(16, np.float32)
    mask[[0, 5, 15]] = 1.0
    recon = np.full((64, 64, 3), 0.25, np.float32)
    pasted = vis.paste_visible(recon, image, mask)
    hidden = np.kron(mask.reshape(4, 4), np.ones((16, 16))) > 0.5
    np.testing.assert_array_equal(pasted[hidden], 0.25)
    np.testing.assert_allclose(pasted[~hidden], image[~hidden] / 255.0)
    # in the figure: branch rows are prediction (grey where visible) | prediction + visible patches
    branches = spec.branches()
    tg = [t[0] for t in core_targets.pixel_targets(x, [b.cell for b in branches], True)]
    preds = [np.zeros_like(t) for t in tg]                                 # predicts each cell's mean
    masks = [np.repeat(np.repeat(mask.reshape(4, 4), b.grid // 4, 0), b.grid // 4, 1).reshape(-1) for b in branches]
    fig = vis.render_reconstruction(image, mask, tg, preds, masks, spec)
    hidden_px = np.kron(hidden, np.ones((4, 4))) > 0.5                      # panels are 4x the 64-px image
    for row in range(1, 5):
        left, right = _crop(fig, _panel_box(spec, row, 0)), _crop(fig, _panel_box(spec, row, 1))
        assert (left[~hidden_px] == vis.MASK_GREY).all()
        np.testing.assert_array_equal(right[~hidden_px][:, :], np.repeat(np.repeat(image, 4, 0), 4, 1)[~hidden_px])
        np.testing.assert_array_equal(left[hidden_px], right[hidden_px])
    # branch 0: hidden cell (0, 0) is flat at the mean of that cell's normalised values
    c0 = branches[0].cell
    cell = _crop(fig, _panel_box(spec, 1, 1))[:4 * c0, :4 * c0]           # 4x upscaled
    colour = np.clip(x[0, :, :c0, :c0].mean() * vis.IMAGENET_STD + vis.IMAGENET_MEAN, 0, 1) * 255.0
    np.testing.assert_allclose(cell, np.broadcast_to(colour, cell.shape), atol=0.51)
