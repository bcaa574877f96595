"""Optimizer parameter groups decided from parameter names and shapes only.

Both backends pass `{canonical name: shape}` in their parameter order and get back the same
groups: lists of dicts

    {"name": str, "params": [parameter names], "weight_decay": float, "lr_scale": float}

Each group's lr is the scheduled lr times `lr_scale`. Empty groups are left out.

Pretraining (docs/method.md#parameter-groups): frozen parameters are excluded; 1-D parameters and
names ending in ".bias" get no weight decay; everything else does, which in ViT includes
`cls_token` and the decoders' `mask_token`. Swin also skips names containing "position_bias" or
"token".

Fine-tuning (docs/method.md#layer-decay): BEiT-style layer-wise lr decay, groups named
"layer_{id}_{decay|no_decay}" with lr_scale = layer_decay ** (L - id).
"""
from __future__ import annotations

import numbers
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "is_frozen_name", "pretrain_param_groups", "layer_id_vit", "layer_id_swin",
    "num_layers", "finetune_param_groups",
]

Shapes = Mapping[str, Tuple[int, ...]]
Group = Dict[str, object]

_FAMILIES = ("vit", "swin")


def is_frozen_name(name: str) -> bool:
    """True for canonical names of fixed buffers-as-parameters in pretraining.

    The encoder's and decoders' sin-cos tables (`pos_embed`, `decoder.{k}.pos_embed`) and the
    HOG filters (`hog_enc.*`). Swin's learnable `absolute_pos_embed` is not frozen.
    """
    return name == "pos_embed" or name.endswith(".pos_embed") or name.startswith("hog_enc.")


def _check_common(named_shapes: Shapes, weight_decay: float, family: str) -> None:
    if family not in _FAMILIES:
        raise ValueError(f"model family must be one of {_FAMILIES}, got {family!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    for name, shape in named_shapes.items():
        if not isinstance(name, str):
            raise ValueError(f"parameter names must be strings, got {name!r}")
        try:
            tuple(int(d) for d in shape)
        except TypeError:
            raise ValueError(f"parameter {name!r} has shape {shape!r}, expected a tuple of ints") from None


def _no_decay_pretrain(name: str, shape: Tuple[int, ...], family: str) -> bool:
    if len(tuple(shape)) <= 1 or name.endswith(".bias"):
        return True
    return family == "swin" and ("position_bias" in name or "token" in name)


def pretrain_param_groups(named_shapes: Shapes, weight_decay: float, family: str,
                          frozen: Optional[Iterable[str]] = None) -> List[Group]:
    """Weight-decay groups for pretraining.

    Args:
        named_shapes: {canonical parameter name: shape}, in the model's parameter order.
        weight_decay: the decay of the "decay" group.
        family: "vit" or "swin".
        frozen: names to leave out (names absent from named_shapes are ignored); None means every
            name for which `is_frozen_name` is true.
    Returns:
        [{"name": "no_decay", weight_decay 0}, {"name": "decay", weight_decay}], each with
        lr_scale 1.0 and its parameter names in named_shapes order; empty groups omitted.
    """
    _check_common(named_shapes, weight_decay, family)
    skip = {n for n in named_shapes if is_frozen_name(n)} if frozen is None else set(frozen)
    no_decay, decay = [], []
    for name, shape in named_shapes.items():
        if name in skip:
            continue
        (no_decay if _no_decay_pretrain(name, shape, family) else decay).append(name)
    groups = [
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"name": "decay", "params": decay, "weight_decay": float(weight_decay), "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def layer_id_vit(name: str, depth: int) -> int:
    """Layer id for ViT layer-wise lr decay (docs/method.md#layer-decay).

    0 for cls_token, pos_embed and patch_embed.*; i + 1 for blocks.i.*; depth + 1 otherwise
    (fc_norm, head, ...).
    """
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        index = _int_part(name, 1)
        if index >= depth:
            raise ValueError(f"parameter {name!r} names block {index} but the model has depth {depth}")
        return index + 1
    return depth + 1


def layer_id_swin(name: str, depths: Sequence[int]) -> int:
    """Layer id for Swin layer-wise lr decay (docs/method.md#layer-decay, SimMIM `get_swin_layer`).

    0 for mask_token and patch_embed.*; sum(depths[:s]) + b + 1 for layers.s.blocks.b.*;
    sum(depths[:s+1]) for layers.s.downsample.*; sum(depths) + 1 otherwise (norm, head, ...).
    """
    depths = [int(d) for d in depths]
    if name == "mask_token" or name.startswith("patch_embed."):
        return 0
    if name.startswith("layers."):
        stage = _int_part(name, 1)
        if stage >= len(depths):
            raise ValueError(f"parameter {name!r} names stage {stage} but the model has {len(depths)} stages")
        kind = name.split(".")[2] if name.count(".") >= 2 else ""
        if kind == "downsample":
            return sum(depths[:stage + 1])
        if kind == "blocks":
            block = _int_part(name, 3)
            if block >= depths[stage]:
                raise ValueError(
                    f"parameter {name!r} names block {block} but stage {stage} has {depths[stage]} blocks")
            return sum(depths[:stage]) + block + 1
        raise ValueError(f"parameter {name!r}: expected layers.<stage>.blocks.* or layers.<stage>.downsample.*")
    return sum(depths) + 1


def _int_part(name: str, position: int) -> int:
    parts = name.split(".")
    if len(parts) <= position or not parts[position].isdigit():
        raise ValueError(f"parameter {name!r}: expected an integer index at dotted position {position}")
    return int(parts[position])


def num_layers(family: str, depth_or_depths: Union[int, Sequence[int]]) -> int:
    """L in lr_scale = decay ** (L - id): depth + 1 (ViT) or sum(depths) + 1 (Swin)."""
    if family == "vit":
        return int(depth_or_depths) + 1
    if family == "swin":
        return sum(int(d) for d in depth_or_depths) + 1
    raise ValueError(f"model family must be one of {_FAMILIES}, got {family!r}")


def _no_decay_finetune(name: str, shape: Tuple[int, ...], family: str) -> bool:
    if len(tuple(shape)) <= 1 or name.endswith(".bias"):
        return True
    if family == "vit":
        return name in ("pos_embed", "cls_token")
    # Swin: relative_position_bias_table does get weight decay here (defect D3).
    return name.split(".")[-1] == "absolute_pos_embed"


def finetune_param_groups(named_shapes: Shapes, weight_decay: float, layer_decay: float, family: str,
                          depth_or_depths: Union[int, Sequence[int]],
                          frozen: Iterable[str] = ()) -> List[Group]:
    """Layer-wise lr decay groups for fine-tuning.

    Args:
        named_shapes: {canonical classifier parameter name: shape}, in parameter order
            (ViT: cls_token, pos_embed, patch_embed.*, blocks.i.*, fc_norm.*, head.*;
            Swin: patch_embed.*, layers.s.blocks.b.*, layers.s.downsample.*, norm.*, head.*).
        weight_decay: the decay of "decay" groups.
        layer_decay: per-layer lr factor in (0, 1].
        family: "vit" or "swin".
        depth_or_depths: ViT depth, or the Swin stage depths.
        frozen: names to leave out.
    Returns:
        groups "layer_{id}_{decay|no_decay}" in order of first appearance, each with
        lr_scale = layer_decay ** (L - id) and weight_decay (0 for no_decay).
    """
    _check_common(named_shapes, weight_decay, family)
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, numbers.Real) or not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    total = num_layers(family, depth_or_depths)
    skip = set(frozen)
    groups: Dict[str, Group] = {}
    for name, shape in named_shapes.items():
        if name in skip:
            continue
        if family == "vit":
            layer = layer_id_vit(name, int(depth_or_depths))
        else:
            layer = layer_id_swin(name, depth_or_depths)
        no_decay = _no_decay_finetune(name, shape, family)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "weight_decay": 0.0 if no_decay else float(weight_decay),
                           "lr_scale": float(layer_decay) ** (total - layer)}
        groups[key]["params"].append(name)
    return list(groups.values())
