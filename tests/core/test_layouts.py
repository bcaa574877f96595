"""core.layouts: layout detection, checkpoint unwrapping and spec inference from shapes."""
import numpy as np
import pytest

from localmim.core import keymaps as K
from localmim.core import layouts as L
from localmim.core import state as S
from localmim.core.specs import SWIN_SPECS, TargetSpec, get_spec
from localmim.core.state import StateError

TINY = get_spec("vit_tiny_test")  # patch 8, D 32, depth 4, img 32 -> 16 patches, taps 0..3, dec 16
SWIN = get_spec("swin_tiny_test")  # C 16, depths (2,2,2,2), heads (1,2,2,4), window 4, patch 2, img 64


def rand_state(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def swin_state(spec=SWIN, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in S.swin_canonical_shapes(spec).items()}


# ---------------------------------------------------------------- ViT detection and unwrapping

def test_detect_layout_on_each_family(mae_shapes):
    assert L.detect_layout(S.vit_canonical_shapes(TINY)) == "localmim"
    assert L.detect_layout(S.vit_encoder_shapes(TINY)) == "localmim-encoder"
    assert L.detect_layout(mae_shapes(TINY)) == "mae"
    assert L.detect_layout(mae_shapes(TINY, decoder=False)) == "mae-encoder"
    timm = dict(mae_shapes(TINY, decoder=False), **{"head.weight": (10, 32), "head.bias": (10,)})
    assert L.detect_layout(timm) == "timm-vit"


def test_detect_layout_unknown_names_keys():
    with pytest.raises(StateError, match=r"unknown checkpoint layout.*conv1\.weight.*fc\.bias"):
        L.detect_layout(["conv1.weight", "fc.bias"])
    keys = list(S.vit_encoder_shapes(TINY)) + ["backbone.stem.weight"]
    with pytest.raises(StateError, match=r"1 key\(s\) match no known layout: backbone\.stem\.weight"):
        L.detect_layout(keys)


def test_unwrap_checkpoint_takes_model_and_strips_prefixes():
    ckpt = {"model": {"module._orig_mod.cls_token": 1, "module.blocks.0.norm1.weight": 2}, "epoch": 3}
    assert L.unwrap_checkpoint(ckpt) == {"cls_token": 1, "blocks.0.norm1.weight": 2}
    assert L.unwrap_checkpoint({"state_dict": {"module.a": 1}}) == {"a": 1}
    ms = {"cls_token": 1, "optim.exp_avg.cls_token": 2, "meta.step": 3, "scaler.scale": 4}
    assert L.unwrap_checkpoint(ms) == {"cls_token": 1}
    with pytest.raises(StateError, match="'a' appears twice"):
        L.unwrap_checkpoint({"a": 1, "module.a": 2})
    with pytest.raises(StateError, match="dict of tensors"):
        L.unwrap_checkpoint([1, 2])


# ---------------------------------------------------------------- ViT spec inference

def test_infer_vit_spec_matches_registry_and_reports_overrides(mae_shapes):
    spec, notes = L.infer_vit_spec(rand_state(S.vit_canonical_shapes(TINY)), "localmim")
    assert spec == TINY and notes == ["model vit_tiny_test"]
    other = TINY.with_(img_size=48, target=TargetSpec(kind="hog", nbins=18, hog_bias=True))
    spec, notes = L.infer_vit_spec(rand_state(S.vit_canonical_shapes(other)), "localmim")
    assert spec == other
    assert "img_size=48" in notes[0] and "nbins=18" in notes[0]
    pixel = TINY.with_(target=TargetSpec(kind="pixel"))
    spec, _ = L.infer_vit_spec(rand_state(S.vit_canonical_shapes(pixel)), "localmim")
    assert spec.target.kind == "pixel"
    spec, _ = L.infer_vit_spec(rand_state(mae_shapes(TINY)), "mae")
    assert spec.name == "vit_tiny_test"


def test_infer_vit_spec_names_shapes_when_nothing_fits():
    state = {"patch_embed.proj.weight": np.zeros((40, 3, 8, 8)), "pos_embed": np.zeros((1, 17, 40)),
             "blocks.0.norm1.weight": np.zeros(40)}
    with pytest.raises(StateError, match=r"fits no registered model: patch_embed.proj.weight \(40, 3, 8, 8\)"):
        L.infer_vit_spec(state, "mae-encoder")


def test_infer_vit_spec_with_a_given_name():
    state = rand_state(S.vit_canonical_shapes(TINY.with_(img_size=48)))
    spec, notes = L.infer_vit_spec(state, "localmim", name="vit_tiny_test")
    assert spec.img_size == 48 and notes == ["model vit_tiny_test with img_size=48"]
    with pytest.raises(StateError, match=r"holds a different model than vit_base_patch16: patch 8, width 32, 4 blocks"):
        L.infer_vit_spec(state, "localmim", name="vit_base_patch16")


# ---------------------------------------------------------------- Swin

def test_detect_layout_swin_unknown_keys_are_named():
    state = swin_state()
    state["encoder.layers.0.blocks.0.attn.extra"] = np.zeros(1)
    state["foo.bar"] = np.zeros(1)
    with pytest.raises(StateError, match="foo.bar"):
        L.detect_layout(state)


def test_infer_swin_spec_from_shapes_with_overrides():
    hog = TargetSpec(kind="hog", nbins=18, hog_bias=True)
    for name in SWIN_SPECS:
        spec = get_spec(name, target=hog)
        fake = {k: np.zeros(s, np.float32) for k, s in S.swin_canonical_shapes(spec).items()}
        found, _ = L.infer_swin_spec(fake)
        assert found == spec
    spec = SWIN.with_(img_size=96, decoder_dims=(16, 16, 16, 32), target=TargetSpec(kind="hog", nbins=9))
    official = K.to_official_swin({k: np.zeros(s, np.float32) for k, s in S.swin_canonical_shapes(spec).items()},
                                  spec)
    found, notes = L.infer_swin_spec(official, "official-localmim-swin")
    assert found == spec and "img_size=96" in notes[0] and "decoder_dims=(16, 16, 16, 32)" in notes[0]
    enc, _ = K.convert_swin_state(swin_state(), "localmim-swin", "timm-swin", SWIN)
    assert L.infer_swin_spec(enc, "timm-swin")[0] == SWIN


def test_infer_swin_spec_names_shapes_when_nothing_fits():
    state = swin_state(SWIN.with_(num_heads=(1, 2, 4, 4)))
    with pytest.raises(StateError, match=r"heads \(1, 2, 4, 4\)"):
        L.infer_swin_spec(state)
    with pytest.raises(StateError, match="unknown Swin model 'nope'"):
        L.infer_swin_spec(swin_state(), name="nope")
    with pytest.raises(StateError, match="no 'encoder.patch_embed.proj.weight'"):
        L.infer_swin_spec({"encoder.layers.0.blocks.0.norm1.weight": np.zeros(3)})
