"""core.resample: bicubic resizing against torch's interpolate, the sin-cos rule, state resampling."""
import subprocess
import sys

import numpy as np
import pytest

from localmim.core import resample as R
from localmim.core import state as S
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import get_spec

TINY = get_spec("vit_tiny_test")  # patch 8, D 32, img 32 -> 4x4 grid
SWIN = get_spec("swin_tiny_test")  # window 4, patch 2, img 64: stage resolutions 32, 16, 8, 4


def torch_bicubic(x, size, dtype="float64"):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.asarray(x)).to(getattr(torch, dtype))
    return torch.nn.functional.interpolate(t[None], size=size, mode="bicubic", align_corners=False)[0].float().numpy()


def test_core_resample_imports_no_framework():
    code = ("import sys, localmim.core.resample\n"
            "assert not [m for m in ('torch', 'mindspore', 'timm') if m in sys.modules]\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


def test_cubic_weights_hand_values():
    # a = -0.75 at offset t = 0.5: the outer taps get a(t+1)^3 - 5a(t+1)^2 + 8a(t+1) - 4a = -0.09375
    np.testing.assert_allclose(R._cubic_weights(np.array([0.5])), [[-0.09375, 0.59375, 0.59375, -0.09375]])
    np.testing.assert_allclose(R._cubic_weights(np.array([0.0])), [[0.0, 1.0, 0.0, 0.0]])
    # each row of the resampling matrix sums to 1 (border taps folded onto the edge pixels)
    np.testing.assert_allclose(R._resize_matrix(5, 9).sum(1), np.ones(9))


@pytest.mark.parametrize("shape,size", [((3, 4, 4), (6, 6)), ((2, 14, 14), (24, 24)), ((2, 24, 24), (14, 14)),
                                        ((4, 13, 13), (23, 23)), ((1, 7, 5), (3, 9)), ((2, 1, 1), (3, 3))])
def test_bicubic_resize_equals_torch_interpolate(shape, size):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = R.bicubic_resize(x, size)
    assert got.dtype == np.float32 and got.shape == shape[:1] + size
    np.testing.assert_array_equal(got, torch_bicubic(x, size))  # torch in float64, rounded once
    np.testing.assert_allclose(got, torch_bicubic(x, size, "float32"), rtol=0, atol=2e-5)  # torch's float32 path


def test_resample_pos_embed_keeps_cls_row_and_matches_torch():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((1, 1 + 14 * 14, 8)).astype(np.float32)  # a learned (1, 1+N, D) table
    out = R.resample_pos_embed(table, 24)
    assert out.shape == (1, 1 + 24 * 24, 8)
    np.testing.assert_array_equal(out[0, 0], table[0, 0])
    grid = table[0, 1:].T.reshape(8, 14, 14)  # channels as images, tokens row-major
    expected = torch_bicubic(grid, (24, 24)).reshape(8, -1).T
    np.testing.assert_array_equal(out[0, 1:], expected)
    no_cls = R.resample_pos_embed(table[:, 1:], 7, cls_token=False)
    np.testing.assert_array_equal(no_cls[0], torch_bicubic(grid, (7, 7)).reshape(8, -1).T)


def test_sincos_tables_are_recomputed_learned_ones_interpolated():
    exact = sincos_2d(32, 4, cls_token=True)[None]
    assert R.is_sincos_table(exact, cls_token=True)
    assert R.is_sincos_table(exact.astype(np.float16).astype(np.float32), cls_token=True)  # fp16 storage
    new, how = R.resize_pos_table(exact, 6, cls_token=True)
    assert how == "recomputed" and np.array_equal(new, sincos_2d(32, 6, cls_token=True)[None])
    learned = exact + 0.1
    assert not R.is_sincos_table(learned, cls_token=True)
    new, how = R.resize_pos_table(learned, 6, cls_token=True)
    assert how == "bicubic" and np.array_equal(new, R.resample_pos_embed(learned, 6))
    same, how = R.resize_pos_table(learned, 4, cls_token=True)
    assert how == "unchanged" and same is learned
    # a bicubic resize of the sin-cos table is not the sin-cos table of the new grid: the rule matters
    assert np.abs(R.resample_pos_embed(exact, 6) - sincos_2d(32, 6, cls_token=True)).max() > 1e-2


def test_relative_table_resize_is_per_head_bicubic():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((13 * 13, 3)).astype(np.float32)  # window 7, 3 heads
    out = R.resample_relative_table(table, 12)
    assert out.shape == (23 * 23, 3)
    expected = torch_bicubic(table.T.reshape(3, 13, 13), (23, 23)).reshape(3, -1).T
    np.testing.assert_array_equal(out, expected)


def test_resample_state_vit_and_swin():
    rng = np.random.default_rng(3)
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in S.vit_canonical_shapes(TINY).items()}
    state["pos_embed"] = sincos_2d(32, 4, cls_token=True)[None]
    big = TINY.with_(img_size=48)
    out, notes = R.resample_state(state, TINY, big)
    assert {k: v.shape for k, v in out.items()} == S.vit_canonical_shapes(big)
    np.testing.assert_array_equal(out["pos_embed"], sincos_2d(32, 6, cls_token=True)[None])
    np.testing.assert_array_equal(out["decoder.1.pos_embed"], R.resample_pos_embed(state["decoder.1.pos_embed"], 6))
    assert "pos_embed: grid 4 -> 6 (recomputed)" in notes and "decoder.0.pos_embed: grid 4 -> 6 (bicubic)" in notes
    np.testing.assert_array_equal(out["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])

    swin = {k: rng.standard_normal(s).astype(np.float32) for k, s in S.swin_canonical_shapes(SWIN).items()}
    wide = SWIN.with_(window_size=8)  # stage windows 4, 4, 4, 4 -> 8, 8, 8, 4
    out, notes = R.resample_state(swin, SWIN, wide)
    assert {k: v.shape for k, v in out.items()} == S.swin_canonical_shapes(wide)
    key = "encoder.layers.1.blocks.1.attn.relative_position_bias_table"
    np.testing.assert_array_equal(out[key], R.resample_relative_table(swin[key], 8))
    last = "encoder.layers.3.blocks.0.attn.relative_position_bias_table"
    assert out[last] is swin[last]  # the last stage's window stays its resolution, 4
    assert "stage 0 relative_position_bias_table x2: window 4 -> 8 (bicubic)" in notes
    assert not any("stage 3" in n for n in notes)
