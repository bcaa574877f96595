"""core.state: strict checks, canonical key lists, layout detection and key maps."""
import numpy as np
import pytest

from localmim.core import state as S
from localmim.core.specs import TargetSpec, get_spec

TINY = get_spec("vit_tiny_test")  # patch 8, D 32, depth 4, img 32 -> 16 patches, taps 0..3, dec 16


def rand_state(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def mae_shapes(spec, decoder=True, dd=24):
    """Hand-written MAE key list (facebookresearch/mae models_mae.py names)."""
    d, p, n = spec.embed_dim, spec.patch_size, spec.num_patches
    out = {k: v for k, v in S.vit_encoder_shapes(spec, branch_norms=False).items()}
    out.update({"norm.weight": (d,), "norm.bias": (d,)})
    if decoder:
        out.update({"mask_token": (1, 1, dd), "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
                    "decoder_pos_embed": (1, 1 + n, dd), "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                    "decoder_pred.weight": (p * p * 3, dd), "decoder_pred.bias": (p * p * 3,),
                    "decoder_blocks.0.norm1.weight": (dd,), "decoder_blocks.0.attn.qkv.weight": (3 * dd, dd)})
    return out


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


# ---------------------------------------------------------------- canonical shapes

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


# ---------------------------------------------------------------- layout detection

def test_detect_layout_on_each_family():
    assert S.detect_layout(S.vit_canonical_shapes(TINY)) == "localmim"
    assert S.detect_layout(S.vit_encoder_shapes(TINY)) == "localmim-encoder"
    assert S.detect_layout(mae_shapes(TINY)) == "mae"
    assert S.detect_layout(mae_shapes(TINY, decoder=False)) == "mae-encoder"
    timm = dict(mae_shapes(TINY, decoder=False), **{"head.weight": (10, 32), "head.bias": (10,)})
    assert S.detect_layout(timm) == "timm-vit"


def test_detect_layout_unknown_names_keys():
    with pytest.raises(S.StateError, match=r"unknown checkpoint layout.*conv1\.weight.*fc\.bias"):
        S.detect_layout(["conv1.weight", "fc.bias"])
    keys = list(S.vit_encoder_shapes(TINY)) + ["backbone.stem.weight"]
    with pytest.raises(S.StateError, match=r"1 key\(s\) match no known layout: backbone\.stem\.weight"):
        S.detect_layout(keys)


def test_unwrap_checkpoint_takes_model_and_strips_prefixes():
    ckpt = {"model": {"module._orig_mod.cls_token": 1, "module.blocks.0.norm1.weight": 2}, "epoch": 3}
    assert S.unwrap_checkpoint(ckpt) == {"cls_token": 1, "blocks.0.norm1.weight": 2}
    assert S.unwrap_checkpoint({"state_dict": {"module.a": 1}}) == {"a": 1}
    ms = {"cls_token": 1, "optim.exp_avg.cls_token": 2, "meta.step": 3, "scaler.scale": 4}
    assert S.unwrap_checkpoint(ms) == {"cls_token": 1}
    with pytest.raises(S.StateError, match="'a' appears twice"):
        S.unwrap_checkpoint({"a": 1, "module.a": 2})
    with pytest.raises(S.StateError, match="dict of tensors"):
        S.unwrap_checkpoint([1, 2])


# ---------------------------------------------------------------- key maps

def test_from_mae_maps_final_norm_to_last_branch_norm_and_lists_missing():
    src = rand_state(mae_shapes(TINY), seed=1)
    out, missing = S.from_mae(src, TINY)
    enc = S.vit_encoder_shapes(TINY)
    assert set(out) == (set(enc) - {f"norm.{k}.{w}" for k in range(3) for w in ("weight", "bias")})
    np.testing.assert_array_equal(out["norm.3.weight"], src["norm.weight"])
    np.testing.assert_array_equal(out["blocks.2.attn.qkv.weight"], src["blocks.2.attn.qkv.weight"])
    assert "norm.0.weight" in missing and "decoder.1.mask_token" in missing
    assert "hog_enc.0.conv.weight" in missing
    assert set(missing) | set(out) == set(S.vit_canonical_shapes(TINY))


def test_from_mae_pos_embed_grid_mismatch_names_shapes():
    src = rand_state(mae_shapes(TINY.with_(img_size=48), decoder=False))
    with pytest.raises(S.StateError, match=r"pos_embed has shape \(1, 37, 32\).*needs \(1, 17, 32\)"):
        S.from_mae(src, TINY)


def test_from_mae_rejects_foreign_keys():
    src = rand_state(mae_shapes(TINY, decoder=False))
    src["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(S.StateError, match="not MAE/timm ViT keys: extra.weight"):
        S.from_mae(src, TINY)


def test_mae_encoder_part_drops_decoder_and_head_only():
    src = dict(mae_shapes(TINY), **{"head.weight": (5, 32), "fc_norm.bias": (32,)})
    kept = S.mae_encoder_part(src)
    assert set(kept) == set(mae_shapes(TINY, decoder=False))


def test_to_timm_and_back():
    canon = rand_state(S.vit_canonical_shapes(TINY), seed=2)
    timm = S.to_timm(canon, TINY)
    expected = set(S.vit_encoder_shapes(TINY, branch_norms=False)) | {"norm.weight", "norm.bias"}
    assert set(timm) == expected
    np.testing.assert_array_equal(timm["norm.bias"], canon["norm.3.bias"])
    back, missing = S.from_timm(timm, TINY)
    for k, v in back.items():
        np.testing.assert_array_equal(v, canon[k])
    assert {k for k in missing if k.startswith("norm.")} == {f"norm.{k}.{w}" for k in range(3) for w in ("weight", "bias")}


def test_to_timm_requires_last_tap_on_last_block():
    spec = get_spec("vit_demo", taps=(1, 3, 5, 6))
    with pytest.raises(S.StateError, match="last branch to tap the last block"):
        S.to_timm(rand_state(S.vit_canonical_shapes(spec)), spec)


def test_convert_state_localmim_to_encoder_and_timm():
    canon = rand_state(S.vit_canonical_shapes(TINY), seed=3)
    enc, notes = S.convert_state(canon, "localmim", "localmim-encoder", TINY)
    assert set(enc) == set(S.vit_encoder_shapes(TINY))
    assert any("dropped" in n for n in notes)
    full, notes = S.convert_state(canon, "localmim", "localmim", TINY)
    assert full.keys() == canon.keys() and notes == ["HOG target: 9 bins, no Sobel bias"]
    timm, _ = S.convert_state(canon, "localmim", "timm-vit", TINY)
    np.testing.assert_array_equal(timm["norm.weight"], canon["norm.3.weight"])


def test_convert_state_mae_to_encoder_initialises_branch_norms():
    src = rand_state(mae_shapes(TINY), seed=4)
    enc, notes = S.convert_state(src, "mae", "localmim-encoder", TINY)
    np.testing.assert_array_equal(enc["norm.0.weight"], np.ones(32, np.float32))
    np.testing.assert_array_equal(enc["norm.2.bias"], np.zeros(32, np.float32))
    np.testing.assert_array_equal(enc["norm.3.weight"], src["norm.weight"])
    assert "newly initialised" in notes[0] and "norm.0.weight" in notes[0]
    with pytest.raises(S.StateError, match=r"cannot fill a full LocalMIM state.*missing key\(s\)"):
        S.convert_state(src, "mae", "localmim", TINY)


def test_convert_state_errors_for_wrong_model_and_unknown_layout():
    base = get_spec("vit_demo")
    with pytest.raises(S.StateError, match=r"wrong shape: .*blocks.0.attn.qkv.weight expected \(576, 192\) found \(96, 32\)"):
        S.convert_state(rand_state(S.vit_canonical_shapes(TINY)), "localmim", "localmim", base)
    with pytest.raises(S.StateError, match="unknown source layout 'caffe'"):
        S.convert_state({}, "caffe", "localmim", TINY)


def test_official_hog_bias_mismatch_is_reported():
    with_bias = TINY.with_(target=TargetSpec(kind="hog", nbins=9, hog_bias=True))
    state = rand_state(S.vit_canonical_shapes(with_bias))
    with pytest.raises(S.StateError, match=r"unexpected key\(s\): hog_enc.0.conv.bias"):
        S.convert_state(state, "localmim", "localmim", TINY)


# ---------------------------------------------------------------- spec inference

def test_infer_vit_spec_matches_registry_and_reports_overrides():
    spec, notes = S.infer_vit_spec(rand_state(S.vit_canonical_shapes(TINY)), "localmim")
    assert spec == TINY and notes == ["model vit_tiny_test"]
    other = TINY.with_(img_size=48, target=TargetSpec(kind="hog", nbins=18, hog_bias=True))
    spec, notes = S.infer_vit_spec(rand_state(S.vit_canonical_shapes(other)), "localmim")
    assert spec == other
    assert "img_size=48" in notes[0] and "nbins=18" in notes[0]
    pixel = TINY.with_(target=TargetSpec(kind="pixel"))
    spec, _ = S.infer_vit_spec(rand_state(S.vit_canonical_shapes(pixel)), "localmim")
    assert spec.target.kind == "pixel"
    spec, _ = S.infer_vit_spec(rand_state(mae_shapes(TINY)), "mae")
    assert spec.name == "vit_tiny_test"


def test_infer_vit_spec_names_shapes_when_nothing_fits():
    state = {"patch_embed.proj.weight": np.zeros((40, 3, 8, 8)), "pos_embed": np.zeros((1, 17, 40)),
             "blocks.0.norm1.weight": np.zeros(40)}
    with pytest.raises(S.StateError, match=r"fits no registered model: patch_embed.proj.weight \(40, 3, 8, 8\)"):
        S.infer_vit_spec(state, "mae-encoder")


def test_infer_vit_spec_with_a_given_name():
    state = rand_state(S.vit_canonical_shapes(TINY.with_(img_size=48)))
    spec, notes = S.infer_vit_spec(state, "localmim", name="vit_tiny_test")
    assert spec.img_size == 48 and notes == ["model vit_tiny_test with img_size=48"]
    with pytest.raises(S.StateError, match=r"holds a different model than vit_base_patch16: patch 8, width 32, 4 blocks"):
        S.infer_vit_spec(state, "localmim", name="vit_base_patch16")


def test_absent_hog_kernels_are_refilled_but_absent_bias_is_an_error():
    canon = rand_state(S.vit_canonical_shapes(TINY), seed=5)
    stripped = {k: v for k, v in canon.items() if not k.startswith("hog_enc.")}
    full, notes = S.convert_state(stripped, "localmim", "localmim", TINY)
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    np.testing.assert_array_equal(full["hog_enc.2.conv.weight"][0, 0], sobel)
    np.testing.assert_array_equal(full["hog_enc.2.conv.weight"][1, 0], sobel.T)
    assert "no hog_enc keys in the source" in notes and any("fixed Sobel" in n for n in notes)
    biased = TINY.with_(target=TargetSpec(kind="hog", nbins=9, hog_bias=True))
    state = {k: v for k, v in rand_state(S.vit_canonical_shapes(biased)).items() if not k.endswith("conv.bias")}
    with pytest.raises(S.StateError, match=r"4 missing key\(s\): hog_enc.0.conv.bias"):
        S.convert_state(state, "localmim", "localmim", biased)


# ---------------------------------------------------------------- Swin

from localmim.core.specs import SWIN_SPECS  # noqa: E402
from localmim.core.state import StateError  # noqa: E402

SWIN = get_spec("swin_tiny_test")  # C 16, depths (2,2,2,2), heads (1,2,2,4), window 4, patch 2, img 64


def swin_state(spec=SWIN, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in S.swin_canonical_shapes(spec).items()}


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


def test_merge_permutation_hand_example():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.float32)  # official blocks TL, TR, BL, BR = 0, 1, 2, 3
    weight = np.tile(labels, (3, 1))  # a (2C', 4C) reduction weight whose columns carry their block
    ours = S.merge_official_to_ours(weight)
    assert ours.tolist() == [[0, 0, 2, 2, 1, 1, 3, 3]] * 3  # TL, BL, TR, BR
    assert np.array_equal(S.merge_ours_to_official(ours), weight)
    assert S.merge_official_to_ours(labels).tolist() == [0, 0, 2, 2, 1, 1, 3, 3]
    assert S.is_merge_key("encoder.layers.0.downsample.reduction.weight")
    assert S.is_merge_key("layers.2.downsample.norm.bias") and not S.is_merge_key("encoder.norm.0.weight")
    with pytest.raises(StateError, match="4 blocks"):
        S.merge_official_to_ours(np.zeros(6, np.float32))


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def test_merge_permutation_against_dense_official_and_timm_merging():
    """Official merging (TL,TR,BL,BR with official weights) == ours (TL,BL,TR,BR with permuted ones),
    computed densely on a full 2x2-neighbourhood map; timm's PatchMerging agrees with ours."""
    rng = np.random.default_rng(3)
    c, h = 3, 4
    x = rng.standard_normal((2, h, h, c))
    w_off = rng.standard_normal((2 * c, 4 * c))
    g_off, b_off = rng.standard_normal(4 * c), rng.standard_normal(4 * c)
    tl, tr, bl, br = x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    official = _layer_norm(np.concatenate([tl, tr, bl, br], -1), g_off, b_off, 1e-5) @ w_off.T
    w, g, b = (S.merge_official_to_ours(a) for a in (w_off, g_off, b_off))
    ours = _layer_norm(np.concatenate([tl, bl, tr, br], -1), g, b, 1e-5) @ w.T
    np.testing.assert_allclose(ours, official, rtol=1e-10, atol=1e-10)
    wrong = _layer_norm(np.concatenate([tl, bl, tr, br], -1), g_off, b_off, 1e-5) @ w_off.T
    assert np.abs(wrong - official).max() > 1e-2
    torch = pytest.importorskip("torch")
    from timm.models.swin_transformer import PatchMerging
    merge = PatchMerging(c).double()
    merge.load_state_dict({"reduction.weight": torch.from_numpy(w), "norm.weight": torch.from_numpy(g),
                           "norm.bias": torch.from_numpy(b)})
    with torch.no_grad():
        np.testing.assert_allclose(merge(torch.from_numpy(x)).numpy(), official, rtol=1e-9, atol=1e-9)


def test_relative_position_index_hand_values_and_timm():
    idx = S.swin_relative_position_index(2)
    assert idx.dtype == np.int64
    assert idx.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    pytest.importorskip("timm")
    from timm.models.swin_transformer import get_relative_position_index
    for w in (3, 7):
        assert np.array_equal(S.swin_relative_position_index(w), get_relative_position_index(w, w).numpy())


def test_swin_official_layout_round_trip_and_detection():
    ours = swin_state()
    official = S.to_official_swin(ours, SWIN)
    rel = sorted(k for k in official if k.endswith("relative_position_index"))
    assert len(rel) == sum(SWIN.depths) and official[rel[0]].shape == (16, 16)
    assert S.detect_family(official) == "swin" and S.detect_family(tiny_state_keys()) == "vit"
    assert S.detect_layout(official) == "official-localmim-swin"
    assert S.detect_layout(ours) == "localmim-swin"
    key = "encoder.layers.1.downsample.reduction.weight"
    assert np.array_equal(official[key], S.merge_ours_to_official(ours[key]))
    assert np.array_equal(official["encoder.layers.0.blocks.0.attn.qkv.weight"],
                          ours["encoder.layers.0.blocks.0.attn.qkv.weight"])
    back, notes = S.convert_state(official, "official-localmim-swin", "localmim-swin", SWIN)
    assert set(back) == set(ours) and all(np.array_equal(back[k], ours[k]) for k in ours)
    assert any("permuted 9 merge" in n for n in notes)
    again, _ = S.convert_state(ours, "localmim-swin", "official-localmim-swin", SWIN)
    assert set(again) == set(official) and all(np.array_equal(again[k], official[k]) for k in official)


def tiny_state_keys():
    return S.vit_canonical_shapes(get_spec("vit_tiny_test"))


def test_swin_official_bad_index_and_stray_index_name_keys():
    official = S.to_official_swin(swin_state(), SWIN)
    key = "encoder.layers.2.blocks.1.attn.relative_position_index"
    official[key] = official[key][:4, :4]
    with pytest.raises(StateError, match=key.replace(".", r"\.")):
        S.convert_swin_state(official, "official-localmim-swin", "localmim-swin", SWIN)
    with pytest.raises(StateError, match="official-localmim-swin"):
        S.convert_swin_state(S.to_official_swin(swin_state(), SWIN), "localmim-swin", "localmim-swin", SWIN)


def test_swin_missing_and_misshaped_keys_are_named():
    state = swin_state()
    del state["decoder.2.norm.bias"]
    state["encoder.layers.1.downsample.norm.weight"] = np.zeros(5, np.float32)
    with pytest.raises(StateError) as err:
        S.convert_swin_state(state, "localmim-swin", "localmim-swin", SWIN)
    text = str(err.value)
    assert "encoder.layers.1.downsample.norm.weight expected (128,) found (5,)" in text
    state["encoder.layers.1.downsample.norm.weight"] = np.zeros(128, np.float32)
    with pytest.raises(StateError, match=r"1 missing key\(s\): decoder\.2\.norm\.bias"):
        S.convert_swin_state(state, "localmim-swin", "localmim-swin", SWIN)


def test_swin_encoder_and_timm_exports_and_back():
    ours = swin_state()
    enc, notes = S.convert_swin_state(ours, "localmim-swin", "swin-encoder", SWIN)
    assert S.detect_layout(enc) == "swin-encoder"
    assert np.array_equal(enc["norm.weight"], ours["encoder.norm.3.weight"])
    assert np.array_equal(enc["layers.0.downsample.reduction.weight"],
                          ours["encoder.layers.0.downsample.reduction.weight"])  # already Swin order
    assert not any(k.startswith(("decoder", "hog_enc", "norm.0", "encoder.")) for k in enc)
    timm_state, _ = S.convert_swin_state(ours, "localmim-swin", "timm-swin", SWIN)
    assert S.detect_layout(timm_state) == "timm-swin"
    assert np.array_equal(timm_state["layers.1.downsample.norm.bias"], ours["encoder.layers.0.downsample.norm.bias"])
    assert "layers.0.downsample.norm.bias" not in timm_state
    for layout, state in (("swin-encoder", enc), ("timm-swin", timm_state)):
        canon = S.swin_to_canonical(state, layout, SWIN)
        assert set(canon) == {k for k in S.swin_encoder_shapes(SWIN) if not k.startswith("encoder.norm.")} | {
            "encoder.norm.3.weight", "encoder.norm.3.bias"}
        assert all(np.array_equal(canon[k], ours[k]) for k in canon)
        with pytest.raises(StateError, match="missing"):
            S.convert_swin_state(state, layout, "localmim-swin", SWIN)


def test_infer_swin_spec_from_shapes_with_overrides():
    hog = TargetSpec(kind="hog", nbins=18, hog_bias=True)
    for name in SWIN_SPECS:
        spec = get_spec(name, target=hog)
        fake = {k: np.zeros(s, np.float32) for k, s in S.swin_canonical_shapes(spec).items()}
        found, _ = S.infer_swin_spec(fake)
        assert found == spec
    spec = SWIN.with_(img_size=96, decoder_dims=(16, 16, 16, 32), target=TargetSpec(kind="hog", nbins=9))
    official = S.to_official_swin({k: np.zeros(s, np.float32) for k, s in S.swin_canonical_shapes(spec).items()},
                                  spec)
    found, notes = S.infer_swin_spec(official, "official-localmim-swin")
    assert found == spec and "img_size=96" in notes[0] and "decoder_dims=(16, 16, 16, 32)" in notes[0]
    enc, _ = S.convert_swin_state(swin_state(), "localmim-swin", "timm-swin", SWIN)
    assert S.infer_swin_spec(enc, "timm-swin")[0] == SWIN


def test_infer_swin_spec_names_shapes_when_nothing_fits():
    state = swin_state(SWIN.with_(num_heads=(1, 2, 4, 4)))
    with pytest.raises(StateError, match=r"heads \(1, 2, 4, 4\)"):
        S.infer_swin_spec(state)
    with pytest.raises(StateError, match="unknown Swin model 'nope'"):
        S.infer_swin_spec(swin_state(), name="nope")
    with pytest.raises(StateError, match="no 'encoder.patch_embed.proj.weight'"):
        S.infer_swin_spec({"encoder.layers.0.blocks.0.norm1.weight": np.zeros(3)})


def test_detect_layout_swin_unknown_keys_are_named():
    state = swin_state()
    state["encoder.layers.0.blocks.0.attn.extra"] = np.zeros(1)
    state["foo.bar"] = np.zeros(1)
    with pytest.raises(StateError, match="foo.bar"):
        S.detect_layout(state)
