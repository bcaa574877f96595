"""core.layouts: layout detection, checkpoint unwrapping and spec inference from shapes."""
import json

import numpy as np
import pytest

from localmim.core import keymaps as K
from localmim.core import layouts as L
from localmim.core import state as S
from localmim.core.specs import (
    SWIN_SPECS, SpecError, SwinSpec, TargetSpec, ViTSpec, get_spec, list_specs, spec_from_arch, spec_to_arch)
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
    assert L.detect_layout(S.vit_canonical_shapes(TINY)) == "localmim-vit"
    assert L.detect_layout(S.vit_encoder_shapes(TINY)) == "localmim-vit-encoder"
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
    spec, notes = L.infer_vit_spec(rand_state(S.vit_canonical_shapes(TINY)), "localmim-vit")
    assert spec == TINY and notes == ["model vit_tiny_test"]
    other = TINY.with_(img_size=48, target=TargetSpec(kind="hog", nbins=18, hog_bias=True))
    spec, notes = L.infer_vit_spec(rand_state(S.vit_canonical_shapes(other)), "localmim-vit")
    assert spec == other
    assert "img_size=48" in notes[0] and "nbins=18" in notes[0]
    pixel = TINY.with_(target=TargetSpec(kind="pixel"))
    spec, _ = L.infer_vit_spec(rand_state(S.vit_canonical_shapes(pixel)), "localmim-vit")
    assert spec.target.kind == "pixel"
    spec, _ = L.infer_vit_spec(rand_state(mae_shapes(TINY)), "mae")
    assert spec.name == "vit_tiny_test"


def test_infer_vit_spec_names_shapes_when_nothing_fits():
    state = {"patch_embed.proj.weight": np.zeros((40, 3, 8, 8)), "pos_embed": np.zeros((1, 17, 40)),
             "blocks.0.norm1.weight": np.zeros(40)}
    with pytest.raises(StateError, match=r"fits no registered model \(patch_embed.proj.weight \(40, 3, 8, 8\).*"
                                         r"cannot tell num_heads, taps: pass --arch num_heads=N"):
        L.infer_vit_spec(state, "mae-encoder")


def test_infer_vit_spec_with_a_given_name():
    state = rand_state(S.vit_canonical_shapes(TINY.with_(img_size=48)))
    spec, notes = L.infer_vit_spec(state, "localmim-vit", name="vit_tiny_test")
    assert spec.img_size == 48 and notes == ["model vit_tiny_test with img_size=48"]
    with pytest.raises(StateError, match=r"holds a different model than vit_base_patch16: patch 8, width 32, 4 blocks"):
        L.infer_vit_spec(state, "localmim-vit", name="vit_base_patch16")


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


# ---------------------------------------------------------------- layout names and resolution

def test_layout_list_is_symmetric_and_each_names_its_formats():
    assert L.VIT_LAYOUTS == ("localmim-vit", "localmim-vit-encoder", "official-localmim-vit", "mae",
                             "mae-encoder", "timm-vit")
    assert L.SWIN_LAYOUTS == ("localmim-swin", "localmim-swin-encoder", "official-localmim-swin", "swin-encoder",
                              "timm-swin")
    for name, info in L.LAYOUT_INFO.items():
        assert info.writes == (("pth", "ckpt", "safetensors") if name.startswith("localmim-")
                               else ("pth", "safetensors")), name
    table = L.layout_table().splitlines()
    assert len(table) == 1 + len(L.LAYOUTS) and table[0].split()[:4] == ["layout", "family", "reads", "writes"]
    with pytest.raises(StateError, match=r"unknown layout 'localmim' \('localmim' is now 'localmim-vit'\)"):
        L.check_layout_name("localmim")


def test_resolve_layout_given_then_recorded_then_detected():
    keys = list(S.swin_canonical_shapes(SWIN))
    assert L.resolve_layout(keys) == ("localmim-swin", "detected")
    assert L.resolve_layout(keys, recorded="official-localmim-swin") == ("official-localmim-swin", "recorded")
    assert L.resolve_layout(keys, recorded="localmim") == ("localmim-swin", "detected")  # unknown: ignored
    assert L.resolve_layout(keys, recorded="timm-swin") == ("localmim-swin", "detected")  # names do not fit
    assert L.resolve_layout(keys, given="official-localmim-swin") == ("official-localmim-swin", "given")
    with pytest.raises(StateError, match="layout mae does not fit its keys, which are Swin keys"):
        L.resolve_layout(keys, given="mae")
    vit = list(S.vit_canonical_shapes(TINY))
    assert L.resolve_layout(vit, official=True) == ("official-localmim-vit", "detected")
    assert L.detect_layout(S.swin_encoder_shapes(SWIN)) == "localmim-swin-encoder"


# ---------------------------------------------------------------- architectures the registry does not know

ODD_VIT = ViTSpec("odd", patch_size=16, embed_dim=48, depth=8, num_heads=4, img_size=64, decoder_dim=24,
                  decoder_heads=3, target=TargetSpec(kind="hog", nbins=6, hog_bias=True))


def test_arch_dicts_round_trip_every_registered_spec():
    for name in list_specs():
        spec = get_spec(name)
        arch = spec_to_arch(spec)
        assert json.loads(json.dumps(arch)) == arch and spec_from_arch(arch) == spec
    with pytest.raises(SpecError, match="unknown vit architecture key.*windw"):
        spec_from_arch({"family": "vit", "windw": 7})


def test_unregistered_vit_needs_heads_and_takes_the_rest_from_shapes():
    state = rand_state(S.vit_canonical_shapes(ODD_VIT))
    with pytest.raises(StateError, match=r"fits no registered model \(patch_embed.proj.weight \(48, 3, 16, 16\) "
                                         r"\(patch 16, width 48\), 8 blocks, pos_embed \(1, 17, 48\)\) and its shapes "
                                         r"cannot tell num_heads, decoder_heads: pass --arch num_heads=N"):
        L.infer_vit_spec(state, "localmim-vit")
    spec, notes = L.infer_vit_spec(state, "localmim-vit", arch={"num_heads": 4, "decoder_heads": 3})
    assert spec == ODD_VIT.with_(name="vit_p16_d48_depth8")  # taps: the reference rule (1, 3, 5, 7)
    assert notes == ["model vit_p16_d48_depth8 (not registered; from the shapes and the arch options: "
                     "num_heads=4, decoder_heads=3)"]
    with pytest.raises(StateError, match=r"contradict its shapes: depth=12 \(the shapes say 8\)"):
        L.infer_vit_spec(state, "localmim-vit", arch={"num_heads": 4, "decoder_heads": 3, "depth": 12})
    with pytest.raises(StateError, match=r"img_size=32 \(the shapes say 64\); resample with --img-size"):
        L.infer_vit_spec(state, "localmim-vit", arch={"num_heads": 4, "decoder_heads": 3, "img_size": 32})
    # an encoder file needs only the encoder heads; its decoders are the reference ones
    enc = {k: v for k, v in state.items() if k in S.vit_encoder_shapes(ODD_VIT)}
    spec, _ = L.infer_vit_spec(enc, "localmim-vit-encoder", arch={"num_heads": 4})
    assert (spec.decoder_dim, spec.decoder_depth, spec.decoder_heads) == (256, 1, 8)


def test_vit_scales_depth_and_mlp_ratio_come_from_the_shapes():
    odd = ODD_VIT.with_(taps=(3, 7), scales=(2.0, 0.5), decoder_depth=2, mlp_ratio=2.0,
                        target=TargetSpec(kind="pixel"))
    state = rand_state(S.vit_canonical_shapes(odd))
    with pytest.raises(StateError, match="cannot tell num_heads, decoder_heads, taps"):
        L.infer_vit_spec(state, "localmim-vit")
    spec, _ = L.infer_vit_spec(state, "localmim-vit", arch={"num_heads": 4, "decoder_heads": 3, "taps": [3, 7],
                                                            "name": "odd"})
    assert spec == odd


def test_unregistered_swin_needs_decoder_heads_and_reads_windows():
    odd = SwinSpec("odd_swin", embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 3), window_size=4,
                   patch_size=2, img_size=64, decoder_dims=(8, 8, 8, 16), decoder_heads=2, mlp_ratio=2.0,
                   target=TargetSpec(kind="hog", nbins=4))
    state = rand_state(S.swin_canonical_shapes(odd))
    with pytest.raises(StateError, match=r"fits no registered model \(patch 2, width 12, depths \(1, 1, 2, 1\), "
                                         r"heads \(1, 2, 2, 3\), stage-0 window 4\) and its shapes cannot tell "
                                         r"decoder_heads"):
        L.infer_swin_spec(state)
    spec, _ = L.infer_swin_spec(state, arch={"decoder_heads": 2, "name": "odd_swin"})
    assert spec == odd
    # an encoder file: img_size read from the stage whose window its resolution cuts (stage 3: 4 -> 2)
    small = odd.with_(img_size=32)
    enc = {k: v for k, v in rand_state(S.swin_canonical_shapes(small)).items() if k.startswith("encoder.")}
    spec, _ = L.infer_swin_spec(enc, "localmim-swin-encoder", arch={"name": "odd_swin"})
    assert spec.img_size == 32 and spec.num_heads == (1, 2, 2, 3) and spec.mlp_ratio == 2.0
