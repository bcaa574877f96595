"""core.keymaps: maps between MAE / timm / official LocalMIM / Swin layouts and the canonical state."""
import numpy as np
import pytest

from localmim.core import keymaps as K
from localmim.core import layouts as L
from localmim.core import state as S
from localmim.core.specs import TargetSpec, get_spec
from localmim.core.state import StateError

TINY = get_spec("vit_tiny_test")  # patch 8, D 32, depth 4, img 32 -> 16 patches, taps 0..3, dec 16
SWIN = get_spec("swin_tiny_test")  # C 16, depths (2,2,2,2), heads (1,2,2,4), window 4, patch 2, img 64


def rand_state(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def swin_state(spec=SWIN, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in S.swin_canonical_shapes(spec).items()}


# ---------------------------------------------------------------- ViT

def test_from_mae_maps_final_norm_to_last_branch_norm_and_lists_missing(mae_shapes):
    src = rand_state(mae_shapes(TINY), seed=1)
    out, missing = K.from_mae(src, TINY)
    enc = S.vit_encoder_shapes(TINY)
    assert set(out) == (set(enc) - {f"norm.{k}.{w}" for k in range(3) for w in ("weight", "bias")})
    np.testing.assert_array_equal(out["norm.3.weight"], src["norm.weight"])
    np.testing.assert_array_equal(out["blocks.2.attn.qkv.weight"], src["blocks.2.attn.qkv.weight"])
    assert "norm.0.weight" in missing and "decoder.1.mask_token" in missing
    assert "hog_enc.0.conv.weight" in missing
    assert set(missing) | set(out) == set(S.vit_canonical_shapes(TINY))


def test_from_mae_pos_embed_grid_mismatch_names_shapes(mae_shapes):
    src = rand_state(mae_shapes(TINY.with_(img_size=48), decoder=False))
    with pytest.raises(StateError, match=r"pos_embed has shape \(1, 37, 32\).*needs \(1, 17, 32\)"):
        K.from_mae(src, TINY)


def test_from_mae_rejects_foreign_keys(mae_shapes):
    src = rand_state(mae_shapes(TINY, decoder=False))
    src["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(StateError, match="not MAE/timm ViT keys: extra.weight"):
        K.from_mae(src, TINY)


def test_mae_encoder_part_drops_decoder_and_head_only(mae_shapes):
    src = dict(mae_shapes(TINY), **{"head.weight": (5, 32), "fc_norm.bias": (32,)})
    kept = K.mae_encoder_part(src)
    assert set(kept) == set(mae_shapes(TINY, decoder=False))


def test_to_timm_and_back():
    canon = rand_state(S.vit_canonical_shapes(TINY), seed=2)
    timm = K.to_timm(canon, TINY)
    expected = set(S.vit_encoder_shapes(TINY, branch_norms=False)) | {"norm.weight", "norm.bias"}
    assert set(timm) == expected
    np.testing.assert_array_equal(timm["norm.bias"], canon["norm.3.bias"])
    back, missing = K.from_timm(timm, TINY)
    for k, v in back.items():
        np.testing.assert_array_equal(v, canon[k])
    assert {k for k in missing if k.startswith("norm.")} == {f"norm.{k}.{w}" for k in range(3) for w in ("weight", "bias")}


def test_to_timm_requires_last_tap_on_last_block():
    spec = get_spec("vit_demo", taps=(1, 3, 5, 6))
    with pytest.raises(StateError, match="last branch to tap the last block"):
        K.to_timm(rand_state(S.vit_canonical_shapes(spec)), spec)


def test_convert_state_localmim_to_encoder_and_timm():
    canon = rand_state(S.vit_canonical_shapes(TINY), seed=3)
    enc, notes = K.convert_state(canon, "localmim-vit", "localmim-vit-encoder", TINY)
    assert set(enc) == set(S.vit_encoder_shapes(TINY))
    assert any("dropped" in n for n in notes)
    full, notes = K.convert_state(canon, "localmim-vit", "localmim-vit", TINY)
    assert full.keys() == canon.keys() and notes == ["HOG target: 9 bins, no Sobel bias"]
    timm, _ = K.convert_state(canon, "localmim-vit", "timm-vit", TINY)
    np.testing.assert_array_equal(timm["norm.weight"], canon["norm.3.weight"])


def test_convert_state_mae_to_encoder_initialises_branch_norms(mae_shapes):
    src = rand_state(mae_shapes(TINY), seed=4)
    enc, notes = K.convert_state(src, "mae", "localmim-vit-encoder", TINY)
    np.testing.assert_array_equal(enc["norm.0.weight"], np.ones(32, np.float32))
    np.testing.assert_array_equal(enc["norm.2.bias"], np.zeros(32, np.float32))
    np.testing.assert_array_equal(enc["norm.3.weight"], src["norm.weight"])
    assert "newly initialised" in notes[0] and "norm.0.weight" in notes[0]
    with pytest.raises(StateError, match=r"cannot fill a full localmim-vit state.*missing key\(s\).*"
                                         r"write the encoder layout localmim-vit-encoder instead"):
        K.convert_state(src, "mae", "localmim-vit", TINY)


def test_convert_state_errors_for_wrong_model_and_unknown_layout():
    base = get_spec("vit_demo")
    with pytest.raises(StateError, match=r"wrong shape: .*blocks.0.attn.qkv.weight expected \(576, 192\) found \(96, 32\)"):
        K.convert_state(rand_state(S.vit_canonical_shapes(TINY)), "localmim-vit", "localmim-vit", base)
    with pytest.raises(StateError, match="unknown source layout 'caffe'"):
        K.convert_state({}, "caffe", "localmim-vit", TINY)


def test_official_hog_bias_mismatch_is_reported():
    with_bias = TINY.with_(target=TargetSpec(kind="hog", nbins=9, hog_bias=True))
    state = rand_state(S.vit_canonical_shapes(with_bias))
    with pytest.raises(StateError, match=r"unexpected key\(s\): hog_enc.0.conv.bias"):
        K.convert_state(state, "localmim-vit", "localmim-vit", TINY)


def test_absent_hog_kernels_are_refilled_but_absent_bias_is_an_error():
    canon = rand_state(S.vit_canonical_shapes(TINY), seed=5)
    stripped = {k: v for k, v in canon.items() if not k.startswith("hog_enc.")}
    full, notes = K.convert_state(stripped, "localmim-vit", "localmim-vit", TINY)
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    np.testing.assert_array_equal(full["hog_enc.2.conv.weight"][0, 0], sobel)
    np.testing.assert_array_equal(full["hog_enc.2.conv.weight"][1, 0], sobel.T)
    assert "no hog_enc keys in the source" in notes and any("fixed Sobel" in n for n in notes)
    biased = TINY.with_(target=TargetSpec(kind="hog", nbins=9, hog_bias=True))
    state = {k: v for k, v in rand_state(S.vit_canonical_shapes(biased)).items() if not k.endswith("conv.bias")}
    with pytest.raises(StateError, match=r"4 missing key\(s\): hog_enc.0.conv.bias"):
        K.convert_state(state, "localmim-vit", "localmim-vit", biased)


# ---------------------------------------------------------------- Swin

def test_merge_permutation_hand_example():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.float32)  # official blocks TL, TR, BL, BR = 0, 1, 2, 3
    weight = np.tile(labels, (3, 1))  # a (2C', 4C) reduction weight whose columns carry their block
    ours = K.merge_official_to_ours(weight)
    assert ours.tolist() == [[0, 0, 2, 2, 1, 1, 3, 3]] * 3  # TL, BL, TR, BR
    assert np.array_equal(K.merge_ours_to_official(ours), weight)
    assert K.merge_official_to_ours(labels).tolist() == [0, 0, 2, 2, 1, 1, 3, 3]
    assert K.is_merge_key("encoder.layers.0.downsample.reduction.weight")
    assert K.is_merge_key("layers.2.downsample.norm.bias") and not K.is_merge_key("encoder.norm.0.weight")
    with pytest.raises(StateError, match="4 blocks"):
        K.merge_official_to_ours(np.zeros(6, np.float32))


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
    w, g, b = (K.merge_official_to_ours(a) for a in (w_off, g_off, b_off))
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
    idx = K.swin_relative_position_index(2)
    assert idx.dtype == np.int64
    assert idx.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    pytest.importorskip("timm")
    from timm.models.swin_transformer import get_relative_position_index
    for w in (3, 7):
        assert np.array_equal(K.swin_relative_position_index(w), get_relative_position_index(w, w).numpy())


def test_swin_official_layout_round_trip_and_detection():
    ours = swin_state()
    official = K.to_official_swin(ours, SWIN)
    rel = sorted(k for k in official if k.endswith("relative_position_index"))
    assert len(rel) == sum(SWIN.depths) and official[rel[0]].shape == (16, 16)
    assert L.detect_family(official) == "swin" and L.detect_family(S.vit_canonical_shapes(TINY)) == "vit"
    assert L.detect_layout(official) == "official-localmim-swin"
    assert L.detect_layout(ours) == "localmim-swin"
    key = "encoder.layers.1.downsample.reduction.weight"
    assert np.array_equal(official[key], K.merge_ours_to_official(ours[key]))
    assert np.array_equal(official["encoder.layers.0.blocks.0.attn.qkv.weight"],
                          ours["encoder.layers.0.blocks.0.attn.qkv.weight"])
    back, notes = K.convert_state(official, "official-localmim-swin", "localmim-swin", SWIN)
    assert set(back) == set(ours) and all(np.array_equal(back[k], ours[k]) for k in ours)
    assert any("permuted 9 merge" in n for n in notes)
    again, _ = K.convert_state(ours, "localmim-swin", "official-localmim-swin", SWIN)
    assert set(again) == set(official) and all(np.array_equal(again[k], official[k]) for k in official)


def test_swin_official_bad_index_and_stray_index_name_keys():
    official = K.to_official_swin(swin_state(), SWIN)
    key = "encoder.layers.2.blocks.1.attn.relative_position_index"
    official[key] = official[key][:4, :4]
    with pytest.raises(StateError, match=key.replace(".", r"\.")):
        K.convert_swin_state(official, "official-localmim-swin", "localmim-swin", SWIN)


def test_swin_order_file_with_index_buffers_reads_as_ours_unpermuted():
    """A file in Swin merge order that still carries relative_position_index buffers (read as
    localmim-swin): the buffers are checked and dropped, the merges are left as they are."""
    ours = swin_state()
    with_buffers = dict(ours)
    for s in range(SWIN.num_stages):
        for b in range(SWIN.depths[s]):
            with_buffers[f"encoder.layers.{s}.blocks.{b}.attn.relative_position_index"] = \
                K.swin_relative_position_index(SWIN.stage_window(s))
    back, notes = K.convert_state(with_buffers, "localmim-swin", "localmim-swin", SWIN)
    assert set(back) == set(ours) and all(np.array_equal(back[k], ours[k]) for k in ours)
    assert not any("permuted" in n for n in notes)
    key = "encoder.layers.3.blocks.0.attn.relative_position_index"
    with_buffers[key] = with_buffers[key][::-1].copy()
    with pytest.raises(StateError, match=key.replace(".", r"\.") + r".*not Swin's relative position index"):
        K.convert_state(with_buffers, "localmim-swin", "localmim-swin", SWIN)


def test_swin_missing_and_misshaped_keys_are_named():
    state = swin_state()
    del state["decoder.2.norm.bias"]
    state["encoder.layers.1.downsample.norm.weight"] = np.zeros(5, np.float32)
    with pytest.raises(StateError) as err:
        K.convert_swin_state(state, "localmim-swin", "localmim-swin", SWIN)
    text = str(err.value)
    assert "encoder.layers.1.downsample.norm.weight expected (128,) found (5,)" in text
    state["encoder.layers.1.downsample.norm.weight"] = np.zeros(128, np.float32)
    with pytest.raises(StateError, match=r"1 missing key\(s\): decoder\.2\.norm\.bias"):
        K.convert_swin_state(state, "localmim-swin", "localmim-swin", SWIN)


def test_swin_encoder_and_timm_exports_and_back():
    ours = swin_state()
    enc, notes = K.convert_swin_state(ours, "localmim-swin", "swin-encoder", SWIN)
    assert L.detect_layout(enc) == "swin-encoder"
    assert np.array_equal(enc["norm.weight"], ours["encoder.norm.3.weight"])
    assert np.array_equal(enc["layers.0.downsample.reduction.weight"],
                          ours["encoder.layers.0.downsample.reduction.weight"])  # already Swin order
    assert not any(k.startswith(("decoder", "hog_enc", "norm.0", "encoder.")) for k in enc)
    timm_state, _ = K.convert_swin_state(ours, "localmim-swin", "timm-swin", SWIN)
    assert L.detect_layout(timm_state) == "timm-swin"
    assert np.array_equal(timm_state["layers.1.downsample.norm.bias"], ours["encoder.layers.0.downsample.norm.bias"])
    assert "layers.0.downsample.norm.bias" not in timm_state
    for layout, state in (("swin-encoder", enc), ("timm-swin", timm_state)):
        canon = K.swin_to_canonical(state, layout, SWIN)
        assert set(canon) == {k for k in S.swin_encoder_shapes(SWIN) if not k.startswith("encoder.norm.")} | {
            "encoder.norm.3.weight", "encoder.norm.3.bias"}
        assert all(np.array_equal(canon[k], ours[k]) for k in canon)
        with pytest.raises(StateError, match="missing"):
            K.convert_swin_state(state, layout, "localmim-swin", SWIN)


# ---------------------------------------------------------------- reading and writing any layout

def test_to_canonical_needs_a_whole_encoder_and_all_or_no_decoders():
    canon = rand_state(S.vit_canonical_shapes(TINY), seed=6)
    enc_only = {k: v for k, v in canon.items() if k in S.vit_encoder_shapes(TINY)}
    back, notes = K.to_canonical(enc_only, "localmim-vit-encoder", TINY)
    assert back.keys() == enc_only.keys() and notes == []
    partial = dict(canon)
    del partial["decoder.2.norm.bias"], partial["blocks.1.norm1.weight"]
    with pytest.raises(StateError, match=r"2 missing key\(s\): blocks.1.norm1.weight, decoder.2.norm.bias"):
        K.to_canonical(partial, "localmim-vit", TINY)
    no_norm = {k: v for k, v in enc_only.items() if k != "norm.1.bias"}
    with pytest.raises(StateError, match=r"missing key\(s\): norm.1.bias"):  # ours always has its branch norms
        K.to_canonical(no_norm, "localmim-vit-encoder", TINY)


def test_swin_encoder_layout_of_ours_initialises_missing_branch_norms():
    ours = swin_state(seed=7)
    std, _ = K.convert_state(ours, "localmim-swin", "swin-encoder", SWIN)
    enc, notes = K.convert_state(std, "swin-encoder", "localmim-swin-encoder", SWIN)
    assert set(enc) == set(S.swin_encoder_shapes(SWIN))
    np.testing.assert_array_equal(enc["encoder.norm.3.weight"], ours["encoder.norm.3.weight"])
    np.testing.assert_array_equal(enc["encoder.norm.0.weight"], np.ones(32, np.float32))  # stage-1 width
    assert "newly initialised (weight 1, bias 0): encoder.norm.0.bias" in notes[0]
    with pytest.raises(StateError, match="write the encoder layout localmim-swin-encoder instead"):
        K.convert_state(std, "swin-encoder", "official-localmim-swin", SWIN)


def mae_full_shapes(spec, dd=16, depth=2, hidden=64):
    """The whole MAE key list (models_mae.MaskedAutoencoderViT), written out independently."""
    d, p, n = spec.embed_dim, spec.patch_size, spec.num_patches
    out = dict(S.vit_encoder_shapes(spec, branch_norms=False))
    out.update({"norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, dd), "decoder_embed.weight": (dd, d),
                "decoder_embed.bias": (dd,), "decoder_pos_embed": (1, 1 + n, dd), "decoder_norm.weight": (dd,),
                "decoder_norm.bias": (dd,), "decoder_pred.weight": (p * p * 3, dd), "decoder_pred.bias": (p * p * 3,)})
    for j in range(depth):
        b = f"decoder_blocks.{j}"
        out.update({f"{b}.norm1.weight": (dd,), f"{b}.norm1.bias": (dd,), f"{b}.attn.qkv.weight": (3 * dd, dd),
                    f"{b}.attn.qkv.bias": (3 * dd,), f"{b}.attn.proj.weight": (dd, dd), f"{b}.attn.proj.bias": (dd,),
                    f"{b}.norm2.weight": (dd,), f"{b}.norm2.bias": (dd,), f"{b}.mlp.fc1.weight": (hidden, dd),
                    f"{b}.mlp.fc1.bias": (hidden,), f"{b}.mlp.fc2.weight": (dd, hidden), f"{b}.mlp.fc2.bias": (dd,)})
    return out


def test_mae_layout_carries_the_mae_decoder_and_checks_it():
    src = rand_state(mae_full_shapes(TINY), seed=8)
    out, _ = K.convert_state(src, "mae", "mae", TINY)
    assert out.keys() == src.keys() and all(np.array_equal(out[k], src[k]) for k in src)
    enc, _ = K.convert_state(src, "mae", "mae-encoder", TINY)
    assert set(enc) == set(mae_full_shapes(TINY)) - set(K.mae_decoder_part(src))
    broken = dict(src)
    del broken["decoder_blocks.1.mlp.fc2.bias"]
    with pytest.raises(StateError, match=r"MAE decoder\) does not fit the model: 1 missing key\(s\): "
                                         r"decoder_blocks.1.mlp.fc2.bias"):
        K.convert_state(broken, "mae", "mae", TINY)
    with pytest.raises(StateError, match="has no MAE decoder.*write 'mae-encoder' instead"):
        K.convert_state(rand_state(S.vit_canonical_shapes(TINY)), "localmim-vit", "mae", TINY)
    big = TINY.with_(img_size=48)
    out, notes = K.convert_state(src, "mae", "mae", TINY, dst_spec=big)
    assert out["decoder_pos_embed"].shape == (1, 37, 16) and out["pos_embed"].shape == (1, 37, 32)
    assert any(n.startswith("decoder_pos_embed: grid -> 6 (bicubic)") for n in notes)


def test_standard_swin_file_with_buffers_and_head_reads():
    """A Microsoft Swin checkpoint keeps relative_position_index / attn_mask buffers and a head."""
    ours = swin_state(seed=9)
    std, _ = K.convert_state(ours, "localmim-swin", "swin-encoder", SWIN)
    full = dict(std, **{"head.weight": np.zeros((10, 128), np.float32), "head.bias": np.zeros(10, np.float32),
                        "layers.0.blocks.1.attn_mask": np.zeros((64, 16, 16), np.float32)})
    for s in range(SWIN.num_stages):
        for b in range(SWIN.depths[s]):
            full[f"layers.{s}.blocks.{b}.attn.relative_position_index"] = \
                K.swin_relative_position_index(SWIN.stage_window(s))
    assert L.detect_layout(full) == "swin-encoder"
    canon, _ = K.to_canonical(full, "swin-encoder", SWIN)
    assert set(canon) == set(K.swin_to_canonical(std, "swin-encoder", SWIN))
    assert all(np.array_equal(canon[k], ours[k]) for k in canon)
