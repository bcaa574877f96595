"""core.mixup, core.metrics and core.classifier against hand-derived values."""
import numpy as np
import pytest

from localmim.core import classifier as C
from localmim.core import mixup as M
from localmim.core.metrics import EvalSums, cross_entropy_sum, topk_hits
from localmim.core.specs import get_spec
from localmim.core import param_groups
from localmim.core.state import StateError, swin_canonical_shapes, vit_canonical_shapes


class _Replay:
    """A generator that returns fixed draws in order (random(), beta(), integers())."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)

    def beta(self, a, b):
        return self.draws.pop(0)

    def integers(self, lo, hi):
        return self.draws.pop(0)


def test_smoothed_one_hot_and_mixed_targets_by_hand():
    y = M.smooth_one_hot(np.array([0, 2]), 4, 0.1)
    np.testing.assert_allclose(y, [[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
    t = M.mix_targets(np.array([0, 2]), 4, 0.7, 0.1)
    # row 0: 0.7 * smooth(0) + 0.3 * smooth(2)
    np.testing.assert_allclose(t[0], [0.7 * 0.925 + 0.3 * 0.025, 0.025, 0.7 * 0.025 + 0.3 * 0.925, 0.025], rtol=1e-6)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-6)


def test_mixup_and_cutmix_images_by_hand():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    cfg = M.MixupConfig()
    # mixed (0.5 < prob 1), mixup (0.9 >= switch 0.5), lam 0.75
    p = M.draw_mix_params(_Replay(0.5, 0.9, 0.75), cfg, 4, 4)
    assert p == M.MixParams(0.75)
    np.testing.assert_allclose(M.mix_images(x, p), 0.75 * x + 0.25 * x[::-1])
    # cutmix (0.1 < 0.5), lam 0.75 -> side sqrt(0.25) * 4 = 2, centre (1, 3): rows 0:2, cols 2:4
    p = M.draw_mix_params(_Replay(0.5, 0.1, 0.75, 1, 3), cfg, 4, 4)
    assert p.box == (0, 2, 2, 4) and p.lam == pytest.approx(1 - 4 / 16)
    mixed = M.mix_images(x, p)
    np.testing.assert_array_equal(mixed[0, :, 0:2, 2:4], x[1, :, 0:2, 2:4])
    np.testing.assert_array_equal(mixed[0, :, 2:, :], x[0, :, 2:, :])
    # not mixed at all: draw >= prob
    assert M.draw_mix_params(_Replay(1.0), M.MixupConfig(prob=0.5), 4, 4) == M.MixParams(1.0)
    with pytest.raises(ValueError, match="even batch"):
        M.mix_batch(x[:1], np.array([0]), 3, cfg, np.random.default_rng(0))


def test_topk_and_cross_entropy_by_hand():
    logits = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]])
    labels = np.array([2, 1, 0, 1])
    # ranks of the label: 1 (second), 0, 2, 1 (a tie with class 0 goes to class 0 first)
    np.testing.assert_array_equal(topk_hits(logits, labels, (1, 2, 5)), [1, 3, 4])
    z = logits[0] - logits[0].max()
    want = -(z[2] - np.log(np.exp(z).sum()))
    assert cross_entropy_sum(logits[:1], labels[:1]) == pytest.approx(want)
    whole, halves = EvalSums(), [EvalSums(), EvalSums()]
    whole.add(logits, labels)
    halves[0].add(logits[::2], labels[::2])
    halves[1].add(logits[1::2], labels[1::2])
    combined = EvalSums().load_array(halves[0].as_array() + halves[1].as_array())
    assert combined.metrics() == pytest.approx(whole.metrics())
    assert whole.metrics()["val_acc1"] == pytest.approx(25.0) and whole.metrics()["val_acc5"] == pytest.approx(100.0)


def test_classifier_state_keeps_the_encoder_and_maps_the_last_norm():
    spec = get_spec("vit_tiny_test")
    rng = np.random.default_rng(0)
    canon = {k: rng.standard_normal(s).astype(np.float32) for k, s in vit_canonical_shapes(spec).items()}
    avg = C.vit_classifier_state(canon, spec, "avg")
    assert not any(k.startswith(("decoder", "hog_enc", "norm")) for k in avg)
    assert set(avg) | {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} == set(
        C.vit_classifier_shapes(spec, 7, "avg"))
    token = C.vit_classifier_state(canon, spec, "token")
    np.testing.assert_array_equal(token["norm.weight"], canon[f"norm.{len(spec.taps) - 1}.weight"])
    del canon["blocks.1.attn.qkv.weight"]
    with pytest.raises(StateError, match="blocks.1.attn.qkv.weight"):
        C.vit_classifier_state(canon, spec, "avg", what="x.pth")


def _swin_canonical(spec):
    rng = np.random.default_rng(1)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in swin_canonical_shapes(spec).items()}


def test_swin_classifier_state_keeps_the_encoder_in_the_original_swin_keys():
    spec = get_spec("swin_tiny_test")  # 4 stages, 2 blocks each
    canon = _swin_canonical(spec)
    avg = C.swin_classifier_state(canon, spec, "avg")
    assert set(avg) | {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} == set(
        C.swin_classifier_shapes(spec, 7, "avg"))
    np.testing.assert_array_equal(avg["layers.2.downsample.reduction.weight"],
                                  canon["encoder.layers.2.downsample.reduction.weight"])
    assert "layers.3.downsample.norm.weight" not in avg and not any(k.startswith("norm") for k in avg)
    normed = C.swin_classifier_state(canon, spec, "norm_avg")
    np.testing.assert_array_equal(normed["norm.bias"], canon["encoder.norm.3.bias"])  # after the last stage
    assert set(normed) | {"head.weight", "head.bias"} == set(C.swin_classifier_shapes(spec, 7, "norm_avg"))
    with pytest.raises(ValueError, match="'token' is not a swin head"):
        C.swin_classifier_shapes(spec, 7, "token")
    del canon["encoder.layers.1.blocks.0.attn.relative_position_bias_table"]
    with pytest.raises(StateError, match="x.pth.*layers.1.blocks.0.attn.relative_position_bias_table"):
        C.swin_classifier_state(canon, spec, "avg", what="x.pth")


def test_swin_classifier_layer_decay_by_hand():
    """depths 2-2-2-2: L = 9; patch_embed id 0, layers.s.blocks.b id 2s + b + 1, the merge at the
    end of stage s id 2s + 2, fc_norm / head id 9 (docs/method.md#layer-decay)."""
    spec = get_spec("swin_tiny_test")
    groups = param_groups.finetune_param_groups(C.swin_classifier_shapes(spec, 3), 0.05, 0.5, "swin", spec.depths)
    scale = {n: g["lr_scale"] for g in groups for n in g["params"]}
    assert scale["patch_embed.proj.weight"] == 0.5 ** 9
    assert scale["layers.1.blocks.1.attn.qkv.weight"] == 0.5 ** (9 - 4)
    assert scale["layers.1.downsample.reduction.weight"] == 0.5 ** (9 - 4)
    assert scale["layers.3.blocks.0.mlp.fc1.weight"] == 0.5 ** (9 - 7)
    assert scale["fc_norm.weight"] == scale["head.bias"] == 1.0
    decay = {n: g["weight_decay"] for g in groups for n in g["params"]}
    assert decay["layers.0.blocks.0.attn.relative_position_bias_table"] == 0.05  # decayed, as the reference
    assert decay["layers.0.blocks.0.attn.qkv.bias"] == decay["fc_norm.weight"] == 0.0


def test_timm_export_renames_merges_and_head_and_refuses_the_reference_head():
    spec = get_spec("swin_tiny_test")
    rng = np.random.default_rng(2)
    state = {k: rng.standard_normal(s).astype(np.float32)
             for k, s in C.swin_classifier_shapes(spec, 4, "norm_avg").items()}
    out = C.timm_classifier_state(state, spec, "norm_avg")
    np.testing.assert_array_equal(out["layers.1.downsample.norm.weight"], state["layers.0.downsample.norm.weight"])
    np.testing.assert_array_equal(out["head.fc.weight"], state["head.weight"])
    assert "layers.0.downsample.norm.weight" not in out and len(out) == len(state)
    avg = {k: rng.standard_normal(s).astype(np.float32) for k, s in C.swin_classifier_shapes(spec, 4, "avg").items()}
    with pytest.raises(StateError, match="model.global_pool=norm_avg"):
        C.timm_classifier_state(avg, spec, "avg", what="best.pth")
    vit = get_spec("vit_tiny_test")
    vit_state = {k: np.zeros(s, np.float32) for k, s in C.vit_classifier_shapes(vit, 4, "avg").items()}
    assert set(C.timm_classifier_state(vit_state, vit, "avg")) == set(vit_state)


def test_stage_drop_path_rates_rise_across_stages():
    """Hand-derived: 8 blocks in stages of 2 at 0.7 -> linspace(0, 0.7, 8) = 0, 0.1, ..., 0.7, split in pairs."""
    got = C.stage_drop_path_rates(0.7, (2, 2, 2, 2))
    want = [[0.0, 0.1], [0.2, 0.3], [0.4, 0.5], [0.6, 0.7]]
    assert [len(s) for s in got] == [2, 2, 2, 2]
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=0, atol=1e-12)
    assert C.stage_drop_path_rates(0.3, (2, 2, 18, 2))[2][0] == pytest.approx(0.3 * 4 / 23)
