"""The classifiers' state contract (numpy only; docs/method.md#fine-tuning).

A fine-tuning classifier is the pretraining encoder without its decoders, HOG filters and branch
norms, plus a pooled head. `global_pool` names the head; one name means one computation in both
families (GLOBAL_POOLS lists each family's):

    "avg"      (the default, the reference's): mean of the tokens (a ViT's cls token excluded),
               a new `fc_norm` LayerNorm on the pooled vector, `head`.
    "token"    (ViT): the cls token after the final `norm`, `head`. The reference cannot load a
               LocalMIM checkpoint in this mode (it has no final `norm`); here `norm` is
               initialised from the last branch norm `norm.{K-1}`, the LayerNorm that
               pretraining put after the last tapped block.
    "norm_avg" (Swin): the final `norm` on every token, then their mean, `head`: the official
               Swin's and timm's head; `norm` is initialised from the last branch norm
               `encoder.norm.{last}`, which pretraining put after the last stage.

ViT keys are timm's `VisionTransformer` keys, so a fine-tuned ViT loads into timm unchanged.
Swin keys are the original Swin's (Microsoft's and SimMIM's code, the reference's fine-tuning
model): patch_embed.{proj,norm}, layers.{s}.blocks.{b}.*, layers.{s}.downsample.* (the merging at
the end of stage s), then the head's norm and `head`; `timm_classifier_state` renames a
"norm_avg" Swin for timm's SwinTransformer (there is no timm head for "avg").

Shapes: D the width, N = (img_size / patch)^2 patch tokens, C classes, C_last the last Swin
stage's width.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import numpy as np

from localmim.core import keymaps
from localmim.core.specs import SwinSpec, ViTSpec
from localmim.core.state import StateError, check_state, swin_encoder_shapes, vit_encoder_shapes

__all__ = ["GLOBAL_POOLS", "HEAD_INIT_STD", "check_pool", "drop_path_rates", "stage_drop_path_rates",
           "vit_classifier_shapes", "vit_classifier_state", "swin_classifier_shapes", "swin_classifier_state",
           "classifier_shapes", "classifier_state", "timm_classifier_state", "timm_classifier_kwargs"]

GLOBAL_POOLS = {"vit": ("avg", "token"), "swin": ("avg", "norm_avg")}
HEAD_INIT_STD = 2e-5  # trunc_normal std of the head weight (docs/method.md#fine-tuning)


def drop_path_rates(drop_path: float, depth: int) -> list:
    """Stochastic-depth probability of each block: linear from 0 to drop_path (timm's rule)."""
    return [float(x) for x in np.linspace(0.0, float(drop_path), int(depth))]


def stage_drop_path_rates(drop_path: float, depths) -> List[List[float]]:
    """`drop_path_rates` over all the blocks of a staged encoder (Swin), split into one list per
    stage of `depths` blocks: the rate rises across stages, not within each."""
    rates = drop_path_rates(drop_path, sum(depths))
    starts = np.cumsum((0,) + tuple(depths))
    return [rates[starts[i]:starts[i + 1]] for i in range(len(depths))]


def check_pool(family: str, global_pool: str) -> str:
    """global_pool, or a ValueError naming the pools of `family` ("vit" or "swin")."""
    pools = GLOBAL_POOLS[family]
    if global_pool not in pools:
        raise ValueError(f"global_pool {global_pool!r} is not a {family} head; use one of {', '.join(pools)}")
    return global_pool


def _head_norm(global_pool: str) -> str:
    """The head's LayerNorm: `fc_norm` on the pooled vector (avg) or the final `norm` on the tokens."""
    return "fc_norm" if global_pool == "avg" else "norm"


def _head_shapes(global_pool: str, width: int, num_classes: int) -> Dict[str, Tuple[int, ...]]:
    """The head norm of `global_pool` and the head Linear width -> num_classes."""
    norm = _head_norm(global_pool)
    return {f"{norm}.weight": (width,), f"{norm}.bias": (width,),
            "head.weight": (int(num_classes), width), "head.bias": (int(num_classes),)}


def vit_classifier_shapes(spec: ViTSpec, num_classes: int, global_pool: str = "avg") -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the classifier: cls_token (1,1,D), pos_embed (1,1+N,D), patch_embed.proj,
    blocks.*, then fc_norm (avg) or norm (token), head.weight (C, D), head.bias (C,)."""
    out = vit_encoder_shapes(spec, branch_norms=False)
    out.update(_head_shapes(check_pool("vit", global_pool), spec.embed_dim, num_classes))
    return out


def vit_classifier_state(encoder: Mapping[str, np.ndarray], spec: ViTSpec, global_pool: str = "avg",
                         what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """The part of a classifier state a pretrained encoder gives: patch_embed, cls_token,
    pos_embed and blocks from a canonical state (any layout, after core.keymaps.to_canonical and,
    for another input size, core.resample), plus `norm` from `norm.{K-1}` in token mode.

    Decoders, HOG filters and the other branch norms are dropped. Every encoder key must be there
    with the spec's shape: raises core.state.StateError (a ValueError) naming the missing and
    mis-shaped keys of `what`.
    """
    expected = vit_encoder_shapes(spec, branch_norms=False)
    last_norm = f"norm.{len(spec.taps) - 1}"
    if check_pool("vit", global_pool) == "token":
        expected.update({f"{last_norm}.weight": (spec.embed_dim,), f"{last_norm}.bias": (spec.embed_dim,)})
    picked = {k: encoder[k] for k in expected if k in encoder}
    check_state(expected, picked, what=f"encoder of {what}")
    out = {k: np.asarray(v, np.float32) for k, v in picked.items() if not k.startswith(last_norm + ".")}
    if global_pool == "token":
        out["norm.weight"] = np.asarray(picked[f"{last_norm}.weight"], np.float32)
        out["norm.bias"] = np.asarray(picked[f"{last_norm}.bias"], np.float32)
    return out


def _swin_encoder_name(canonical: str) -> str:
    return canonical[len("encoder."):]


def swin_classifier_shapes(spec: SwinSpec, num_classes: int, global_pool: str = "avg") -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the Swin classifier: patch_embed.*, layers.{s}.blocks.{b}.* (relative tables
    ((2w-1)^2, heads)), layers.{s}.downsample.* (s < last), fc_norm (avg) or norm (norm_avg) of
    width C_last, head.weight (C, C_last), head.bias (C,)."""
    width = spec.stage_dim(spec.num_stages - 1)
    out = {_swin_encoder_name(k): v for k, v in swin_encoder_shapes(spec, branch_norms=False).items()}
    out.update(_head_shapes(check_pool("swin", global_pool), width, num_classes))
    return out


def swin_classifier_state(encoder: Mapping[str, np.ndarray], spec: SwinSpec, global_pool: str = "avg",
                          what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """The part of a Swin classifier state a pretrained encoder gives: patch_embed, layers (blocks
    and merges) from a canonical state (core.keymaps.to_canonical), plus `norm` from the last
    branch norm in norm_avg mode. Decoders, HOG filters and the other branch norms are dropped;
    a missing or mis-shaped encoder key raises core.state.StateError naming `what`."""
    plain = keymaps.to_swin_encoder(encoder, spec, what=f"encoder of {what}")
    if check_pool("swin", global_pool) == "avg":
        plain = {k: v for k, v in plain.items() if not k.startswith("norm.")}
    return {k: np.asarray(v, np.float32) for k, v in plain.items()}


def classifier_shapes(spec, num_classes: int, global_pool: str = "avg") -> Dict[str, Tuple[int, ...]]:
    """vit_classifier_shapes or swin_classifier_shapes, by the spec's family."""
    if isinstance(spec, SwinSpec):
        return swin_classifier_shapes(spec, num_classes, global_pool)
    return vit_classifier_shapes(spec, num_classes, global_pool)


def classifier_state(encoder: Mapping[str, np.ndarray], spec, global_pool: str = "avg",
                     what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """vit_classifier_state or swin_classifier_state, by the spec's family."""
    if isinstance(spec, SwinSpec):
        return swin_classifier_state(encoder, spec, global_pool, what)
    return vit_classifier_state(encoder, spec, global_pool, what)


def timm_classifier_state(state: Mapping[str, np.ndarray], spec, global_pool: str,
                          what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """A classifier state (classifier_shapes' keys) -> the state dict of the timm model
    `timm_classifier_kwargs` builds, which gives the same logits. ViT keys are timm's already;
    a "norm_avg" Swin has its merges renamed `layers.{s+1}.downsample.*` (timm merges at a stage's
    start) and its head `head.fc.*`. An "avg" Swin (LayerNorm after pooling) has no timm
    counterpart: a StateError says so."""
    if "head.weight" not in state:
        raise StateError(f"{what} has no head.weight: it is not a fine-tuned classifier")
    check_state(classifier_shapes(spec, np.shape(state["head.weight"])[0], global_pool), state, what=what)
    if not isinstance(spec, SwinSpec):
        return {k: np.asarray(v, np.float32) for k, v in state.items()}
    if global_pool != "norm_avg":
        raise StateError(f"{what} is a Swin classifier with global_pool {global_pool!r} (LayerNorm after the "
                         f"pooling, the reference's head), which timm's SwinTransformer does not have; fine-tune "
                         f"with model.global_pool=norm_avg to export to timm")
    return {("head.fc." + name[len("head."):] if name.startswith("head.") else keymaps.timm_swin_name(name)):
            np.asarray(value, np.float32) for name, value in state.items()}


def timm_classifier_kwargs(spec, num_classes: int, global_pool: str) -> Dict[str, object]:
    """Arguments of `timm.create_model(**kwargs)` for the model of timm_classifier_state; pass
    `norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)` (our LayerNorms' eps; timm's Swin default
    is 1e-5) for identical logits."""
    if isinstance(spec, SwinSpec):
        check_pool("swin", global_pool)
        return dict(keymaps.timm_swin_kwargs(spec), num_classes=int(num_classes))
    check_pool("vit", global_pool)
    return {"model_name": "vit_base_patch16_224", "pretrained": False, "num_classes": int(num_classes),
            "img_size": spec.img_size, "patch_size": spec.patch_size, "embed_dim": spec.embed_dim,
            "depth": spec.depth, "num_heads": spec.num_heads, "mlp_ratio": spec.mlp_ratio, "qkv_bias": True,
            "global_pool": global_pool, "class_token": True}
