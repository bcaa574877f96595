"""The ViT classifier's state contract (numpy only; docs/method.md#fine-tuning).

A fine-tuning classifier is the pretraining encoder without its decoders, HOG filters and branch
norms, plus a pooled head. Its state-dict keys are timm's `VisionTransformer` keys, so a
fine-tuned checkpoint loads into `timm.create_model(..., global_pool=...)` unchanged:

    global_pool "avg"   (the default, the reference's): mean of the patch tokens (cls excluded),
                        `fc_norm` LayerNorm, `head`.
    global_pool "token": the cls token after the final `norm`, `head`. The reference cannot load a
                        LocalMIM checkpoint in this mode (it has no final `norm`); here `norm` is
                        initialised from the last branch norm `norm.{K-1}`, the LayerNorm that
                        pretraining put after the last tapped block.

Shapes: D the width, N = (img_size / patch)^2 patch tokens, C classes.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np

from localmim.core.specs import ViTSpec
from localmim.core.state import check_state, vit_encoder_shapes

__all__ = ["GLOBAL_POOLS", "HEAD_INIT_STD", "drop_path_rates", "vit_classifier_shapes", "vit_classifier_state"]

GLOBAL_POOLS = ("avg", "token")
HEAD_INIT_STD = 2e-5  # trunc_normal std of the head weight (docs/method.md#fine-tuning)


def drop_path_rates(drop_path: float, depth: int) -> list:
    """Stochastic-depth probability of each block: linear from 0 to drop_path (timm's rule)."""
    return [float(x) for x in np.linspace(0.0, float(drop_path), int(depth))]


def _check_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool {global_pool!r} must be one of {', '.join(GLOBAL_POOLS)}")
    return global_pool


def vit_classifier_shapes(spec: ViTSpec, num_classes: int, global_pool: str = "avg") -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the classifier: cls_token (1,1,D), pos_embed (1,1+N,D), patch_embed.proj,
    blocks.*, then fc_norm (avg) or norm (token), head.weight (C, D), head.bias (C,)."""
    d = spec.embed_dim
    out = vit_encoder_shapes(spec, branch_norms=False)
    norm = "fc_norm" if _check_pool(global_pool) == "avg" else "norm"
    out.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,),
                "head.weight": (int(num_classes), d), "head.bias": (int(num_classes),)})
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
    if _check_pool(global_pool) == "token":
        expected.update({f"{last_norm}.weight": (spec.embed_dim,), f"{last_norm}.bias": (spec.embed_dim,)})
    picked = {k: encoder[k] for k in expected if k in encoder}
    check_state(expected, picked, what=f"encoder of {what}")
    out = {k: np.asarray(v, np.float32) for k, v in picked.items() if not k.startswith(last_norm + ".")}
    if global_pool == "token":
        out["norm.weight"] = np.asarray(picked[f"{last_norm}.weight"], np.float32)
        out["norm.bias"] = np.asarray(picked[f"{last_norm}.bias"], np.float32)
    return out
