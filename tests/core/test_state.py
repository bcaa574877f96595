"""core.state: strict checks and the canonical key lists the models are built to."""
import numpy as np
import pytest

from localmim.core import state as S
from localmim.core.specs import SWIN_SPECS, TargetSpec, get_spec

TINY = get_spec("vit_tiny_test")  # patch 8, D 32, depth 4, img 32 -> 16 patches, taps 0..3, dec 16
SWIN = get_spec("swin_tiny_test")  # C 16, depths (2,2,2,2), heads (1,2,2,4), window 4, patch 2, img 64


# ---------------------------------------------------------------- check_state

def test_check_state_accepts_exact_match():
    S.check_state({"a": (2, 3), "b": (4,)}, {"a": np.zeros((2, 3)), "b": np.zeros(4)})


def test_check_state_names_missing_unexpected_and_misshaped_keys_in_one_sentence():
    with pytest.raises(S.StateError) as e:
        S.check_state({"a": (2, 3), "b": (4,), "c": (1,)},
                      {"a": np.zeros((3, 2)), "b": np.zeros(4), "zz": np.zeros(1)}, what="file.pth")
    msg = str(e.value)
    assert msg.startswith("file.pth does not fit the model")
    assert "1 missing key(s): c" in msg
    assert "1 unexpected key(s): zz" in msg
    assert "a expected (2, 3) found (3, 2)" in msg
    assert "\n" not in msg


def test_check_state_truncates_long_lists_with_a_count():
    expected = {f"k{i:02d}": (1,) for i in range(20)}
    with pytest.raises(S.StateError) as e:
        S.check_state(expected, {})
    msg = str(e.value)
    assert "20 missing key(s)" in msg and "(+12 more)" in msg
    assert "k07" in msg and "k08" not in msg


def test_check_hog_kernels_accepts_only_the_fixed_sobel_filter():
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)  # x-gradient; y is its transpose
    kernels = np.stack([sobel, sobel.T])[:, None]  # (2, 1, 3, 3)
    S.check_hog_kernels({"hog_enc.0.conv.weight": kernels, "hog_enc.3.conv.weight": kernels.astype(np.float64),
                         "hog_enc.0.conv.bias": np.ones(2, np.float32), "cls_token": np.ones((1, 1, 4))})
    swapped = kernels[::-1].copy()
    with pytest.raises(S.StateError, match=r"hog_enc\.2\.conv\.weight is not the fixed Sobel kernel"):
        S.check_hog_kernels({"hog_enc.0.conv.weight": kernels, "hog_enc.2.conv.weight": swapped})


# ---------------------------------------------------------------- canonical shapes: ViT

def test_vit_base_canonical_key_count_and_shapes():
    spec = get_spec("vit_base_patch16")
    shapes = S.vit_canonical_shapes(spec)
    per_block = 12  # norm1, qkv, proj, norm2, fc1, fc2 x (weight, bias)
    encoder = 2 + 2 + 12 * per_block + 4 * 2
    decoders = 4 * (2 + 1 + 1 + per_block + 2) + (8 + 4 + 2 + 2)  # + pred heads of scales 4, 2, 1, 0.5
    assert len(shapes) == encoder + decoders + 4  # hog_enc weights, no bias for ViT-B
    assert shapes["cls_token"] == (1, 1, 768)
    assert shapes["pos_embed"] == (1, 197, 768)
    assert shapes["patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes["blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["blocks.0.mlp.fc1.weight"] == (3072, 768)
    assert shapes["norm.3.weight"] == (768,)
    assert shapes["decoder.0.embed.weight"] == (256, 768)
    assert shapes["decoder.2.pos_embed"] == (1, 197, 256)
    assert shapes["decoder.0.pred.0.weight"] == (256, 128, 2, 2)
    assert shapes["decoder.0.pred.1.weight"] == (128,)
    assert shapes["decoder.0.pred.3.weight"] == (128, 64, 2, 2)
    assert shapes["decoder.0.pred.4.weight"] == (27, 64, 1, 1)
    assert shapes["decoder.1.pred.1.weight"] == (27, 128, 1, 1)
    assert shapes["decoder.2.pred.0.weight"] == (27, 256, 1, 1)
    assert shapes["decoder.3.pred.1.weight"] == (27, 256, 1, 1)
    assert "decoder.3.pred.0.weight" not in shapes  # the AvgPool has no parameters
    assert shapes["hog_enc.3.conv.weight"] == (2, 1, 3, 3)
    assert "hog_enc.0.conv.bias" not in shapes


def test_vit_large_has_hog_bias_and_54_outputs():
    shapes = S.vit_canonical_shapes(get_spec("vit_large_patch16"))
    assert shapes["hog_enc.2.conv.bias"] == (2,)
    assert shapes["decoder.3.pred.1.weight"] == (54, 256, 1, 1)
    assert len(shapes) == (4 + 24 * 12 + 8) + 88 + 8


def test_pixel_target_has_no_hog_keys_and_cell_sized_outputs():
    spec = get_spec("vit_base_patch16", target=TargetSpec(kind="pixel"))
    shapes = S.vit_canonical_shapes(spec)
    assert not any(k.startswith("hog_enc") for k in shapes)
    assert shapes["decoder.0.pred.4.weight"] == (3 * 4 * 4, 64, 1, 1)
    assert shapes["decoder.3.pred.1.weight"] == (3 * 32 * 32, 256, 1, 1)


def test_include_flags_select_parts():
    enc = S.vit_canonical_shapes(TINY, include_decoder=False, include_targets=False)
    assert not any(k.startswith(("decoder.", "hog_enc.")) for k in enc)
    assert enc == S.vit_encoder_shapes(TINY)
    no_dec = S.vit_canonical_shapes(TINY, include_decoder=False)
    assert set(no_dec) - set(enc) == {f"hog_enc.{k}.conv.weight" for k in range(4)}


# ---------------------------------------------------------------- canonical shapes: Swin

def test_swin_canonical_shapes_match_torch_and_mindspore_models():
    pytest.importorskip("torch")
    from localmim.backends.torch import build_model as build_torch
    expected = S.swin_canonical_shapes(SWIN)
    torch_shapes = {k: tuple(v.shape) for k, v in build_torch(SWIN).state_dict().items()}
    assert torch_shapes == expected
    assert not any("relative_position_index" in k for k in expected)
    pytest.importorskip("mindspore")
    from localmim.backends.mindspore import build_model as build_ms
    assert build_ms(SWIN).state_shapes() == expected


def test_swin_canonical_shapes_hand_values_for_swin_base():
    spec = SWIN_SPECS["swin_large_patch4_win14"]  # C 192, stages 56/28/14/7: window 14, 14, 14, 7
    shapes = S.swin_canonical_shapes(spec)
    assert shapes["encoder.layers.0.blocks.1.attn.relative_position_bias_table"] == (27 * 27, 6)
    assert shapes["encoder.layers.2.blocks.17.attn.relative_position_bias_table"] == (27 * 27, 24)
    assert shapes["encoder.layers.3.blocks.1.attn.relative_position_bias_table"] == (13 * 13, 48)
    assert shapes["encoder.layers.1.downsample.reduction.weight"] == (768, 1536)
    assert shapes["encoder.layers.2.downsample.norm.weight"] == (3072,)
    assert "encoder.layers.3.downsample.norm.weight" not in shapes
    assert [shapes[f"encoder.norm.{k}.weight"] for k in range(4)] == [(384,), (768,), (1536,), (1536,)]
    assert [shapes[f"decoder.{k}.pos_embed"] for k in range(4)] == [(1, 784, 64), (1, 196, 128), (1, 49, 128),
                                                                     (1, 49, 128)]
    assert shapes["decoder.0.pred.weight"] == (54, 64) and shapes["hog_enc.3.conv.bias"] == (2,)
    enc = S.swin_canonical_shapes(spec, include_decoder=False, include_targets=False)
    assert all(k.startswith("encoder.") for k in enc)
