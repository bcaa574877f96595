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
