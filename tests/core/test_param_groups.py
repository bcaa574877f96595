"""Parameter groups from names and shapes: weight decay (docs/method.md#parameter-groups) and
layer-wise lr decay (#layer-decay)."""
import pytest

from localmim.core.param_groups import (
    finetune_param_groups, is_frozen_name, layer_id_swin, layer_id_vit, pretrain_param_groups)

VIT_PRETRAIN = {
    "cls_token": (1, 1, 8),
    "pos_embed": (1, 5, 8),
    "patch_embed.proj.weight": (8, 3, 2, 2),
    "patch_embed.proj.bias": (8,),
    "blocks.0.norm1.weight": (8,),
    "blocks.0.attn.qkv.weight": (24, 8),
    "blocks.0.attn.qkv.bias": (24,),
    "norm.0.weight": (8,),
    "decoder.0.embed.weight": (4, 8),
    "decoder.0.mask_token": (1, 1, 4),
    "decoder.0.pos_embed": (1, 5, 4),
    "decoder.0.pred.0.weight": (4, 2, 2, 2),
    "decoder.0.pred.1.weight": (2,),
    "hog_enc.0.conv.weight": (2, 1, 3, 3),
    "hog_enc.0.conv.bias": (2,),
}


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_frozen_names():
    frozen = [n for n in VIT_PRETRAIN if is_frozen_name(n)]
    assert frozen == ["pos_embed", "decoder.0.pos_embed", "hog_enc.0.conv.weight", "hog_enc.0.conv.bias"]
    assert not is_frozen_name("absolute_pos_embed")


def test_vit_pretrain_groups():
    groups = pretrain_param_groups(VIT_PRETRAIN, 0.05, "vit")
    assert [g["name"] for g in groups] == ["no_decay", "decay"]
    g = _by_name(groups)
    assert g["no_decay"]["params"] == ["patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
                                       "norm.0.weight", "decoder.0.pred.1.weight"]
    assert g["decay"]["params"] == ["cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                                    "decoder.0.embed.weight", "decoder.0.mask_token", "decoder.0.pred.0.weight"]
    assert g["no_decay"]["weight_decay"] == 0.0 and g["decay"]["weight_decay"] == 0.05
    assert all(x["lr_scale"] == 1.0 for x in groups)


def test_explicit_frozen_list_replaces_the_default():
    groups = _by_name(pretrain_param_groups(VIT_PRETRAIN, 0.05, "vit", frozen=["cls_token", "not_a_param"]))
    assert "cls_token" not in groups["decay"]["params"]
    assert "pos_embed" in groups["decay"]["params"] and "hog_enc.0.conv.bias" in groups["no_decay"]["params"]


def test_swin_pretrain_skips_tokens_and_position_bias():
    named = {
        "encoder.patch_embed.proj.weight": (8, 3, 2, 2),
        "encoder.layers.0.blocks.0.attn.relative_position_bias_table": (49, 2),
        "encoder.layers.0.blocks.0.attn.qkv.weight": (24, 8),
        "encoder.layers.0.downsample.reduction.weight": (16, 32),
        "decoder.0.mask_token": (1, 1, 4),
        "decoder.0.pos_embed": (1, 16, 4),
        "decoder.0.head.bias": (12,),
    }
    g = _by_name(pretrain_param_groups(named, 0.05, "swin"))
    assert g["no_decay"]["params"] == ["encoder.layers.0.blocks.0.attn.relative_position_bias_table",
                                       "decoder.0.mask_token", "decoder.0.head.bias"]
    assert g["decay"]["params"] == ["encoder.patch_embed.proj.weight", "encoder.layers.0.blocks.0.attn.qkv.weight",
                                    "encoder.layers.0.downsample.reduction.weight"]
    # the same tensors in a ViT get decay: the skip list is Swin-only
    vit = _by_name(pretrain_param_groups({"decoder.0.mask_token": (1, 1, 4)}, 0.05, "vit"))
    assert vit == {"decay": {"name": "decay", "params": ["decoder.0.mask_token"], "weight_decay": 0.05,
                             "lr_scale": 1.0}}


def test_layer_id_vit():
    assert [layer_id_vit(n, 12) for n in ["cls_token", "pos_embed", "patch_embed.proj.weight",
                                           "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias",
                                           "fc_norm.weight", "head.bias"]] == [0, 0, 0, 1, 12, 13, 13]
    with pytest.raises(ValueError, match="names block 12 but the model has depth 12"):
        layer_id_vit("blocks.12.norm1.weight", 12)
    with pytest.raises(ValueError, match="expected an integer index at dotted position 1"):
        layer_id_vit("blocks.x.norm1.weight", 12)


def test_layer_id_swin_base():
    depths = (2, 2, 18, 2)
    cases = {
        "patch_embed.proj.weight": 0,
        "mask_token": 0,
        "layers.0.blocks.0.attn.qkv.weight": 1,
        "layers.0.blocks.1.norm1.weight": 2,
        "layers.0.downsample.reduction.weight": 2,
        "layers.1.blocks.0.mlp.fc1.weight": 3,
        "layers.1.downsample.norm.bias": 4,
        "layers.2.blocks.5.attn.relative_position_bias_table": 10,
        "layers.2.downsample.norm.weight": 22,
        "layers.3.blocks.1.mlp.fc2.bias": 24,
        "norm.weight": 25,
        "head.weight": 25,
    }
    assert {n: layer_id_swin(n, depths) for n in cases} == cases
    with pytest.raises(ValueError, match="stage 2 has 18 blocks"):
        layer_id_swin("layers.2.blocks.18.norm1.weight", depths)
    with pytest.raises(ValueError, match="names stage 4 but the model has 4 stages"):
        layer_id_swin("layers.4.blocks.0.norm1.weight", depths)


def test_vit_finetune_groups():
    named = {
        "cls_token": (1, 1, 8), "pos_embed": (1, 5, 8),
        "patch_embed.proj.weight": (8, 3, 2, 2), "patch_embed.proj.bias": (8,),
        "blocks.0.norm1.weight": (8,), "blocks.0.attn.qkv.weight": (24, 8),
        "blocks.1.mlp.fc1.weight": (32, 8),
        "fc_norm.weight": (8,), "head.weight": (10, 8), "head.bias": (10,),
    }
    groups = finetune_param_groups(named, 0.05, 0.5, "vit", 2)
    summary = [(g["name"], g["params"], g["weight_decay"], g["lr_scale"]) for g in groups]
    assert summary == [
        ("layer_0_no_decay", ["cls_token", "pos_embed", "patch_embed.proj.bias"], 0.0, 0.125),
        ("layer_0_decay", ["patch_embed.proj.weight"], 0.05, 0.125),
        ("layer_1_no_decay", ["blocks.0.norm1.weight"], 0.0, 0.25),
        ("layer_1_decay", ["blocks.0.attn.qkv.weight"], 0.05, 0.25),
        ("layer_2_decay", ["blocks.1.mlp.fc1.weight"], 0.05, 0.5),
        ("layer_3_no_decay", ["fc_norm.weight", "head.bias"], 0.0, 1.0),
        ("layer_3_decay", ["head.weight"], 0.05, 1.0),
    ]


def test_swin_finetune_groups():
    named = {
        "patch_embed.proj.weight": (16, 3, 4, 4),
        "absolute_pos_embed": (1, 16, 16),
        "layers.0.blocks.0.attn.relative_position_bias_table": (9, 1),
        "layers.0.blocks.0.attn.qkv.bias": (48,),
        "layers.0.downsample.reduction.weight": (32, 64),
        "layers.1.blocks.0.mlp.fc1.weight": (128, 32),
        "norm.weight": (32,),
        "head.weight": (10, 32),
    }
    groups = finetune_param_groups(named, 0.05, 0.9, "swin", (1, 1))
    summary = [(g["name"], g["params"], g["weight_decay"], g["lr_scale"]) for g in groups]
    assert summary == [
        ("layer_0_decay", ["patch_embed.proj.weight"], 0.05, pytest.approx(0.9 ** 3)),
        ("layer_3_no_decay", ["absolute_pos_embed", "norm.weight"], 0.0, 1.0),
        ("layer_1_decay", ["layers.0.blocks.0.attn.relative_position_bias_table",
                           "layers.0.downsample.reduction.weight"], 0.05, pytest.approx(0.9 ** 2)),
        ("layer_1_no_decay", ["layers.0.blocks.0.attn.qkv.bias"], 0.0, pytest.approx(0.9 ** 2)),
        ("layer_2_decay", ["layers.1.blocks.0.mlp.fc1.weight"], 0.05, pytest.approx(0.9)),
        ("layer_3_decay", ["head.weight"], 0.05, 1.0),
    ]


@pytest.mark.parametrize("call, message", [
    (lambda: pretrain_param_groups({}, 0.05, "convnext"), "family must be one of"),
    (lambda: pretrain_param_groups({}, -1.0, "vit"), "weight_decay must be a non-negative number"),
    (lambda: pretrain_param_groups({"w": None}, 0.05, "vit"), "parameter 'w' has shape None"),
    (lambda: finetune_param_groups({}, 0.05, 0.0, "vit", 12), r"layer_decay must be in \(0, 1\]"),
])
def test_param_group_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
