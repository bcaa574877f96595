"""Canonical model state: the expected keys and shapes, and the strict checks against them.

A canonical state is `dict[str, numpy.ndarray]` with the PyTorch names and layouts of
docs/internals.md ("Canonical state"): Linear (out, in), fused qkv (3D, D), Conv (out, in, kh, kw),
ConvTranspose (in, out, kh, kw). Both backends export to and import from it; the converter goes
through it. Everything here is pure numpy and works on any mapping whose values have `.shape`.

This is what the models need. The layouts of other codebases (detection, unwrapping, spec
inference) are in core.layouts, the key maps between them and the canonical state in core.keymaps.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from localmim.core.specs import SpecError, ViTSpec

__all__ = [
    "StateError", "check_state", "check_hog_kernels", "shape_tuple", "format_key_list",
    "vit_encoder_shapes", "vit_decoder_shapes", "vit_target_shapes", "vit_canonical_shapes",
    "swin_encoder_shapes", "swin_decoder_shapes", "swin_target_shapes", "swin_canonical_shapes",
]

_LIST_LIMIT = 8


class StateError(ValueError):
    """A state dict that does not fit: missing, unexpected or mis-shaped keys, or an unknown layout."""


# ----------------------------------------------------------------------------------------------
# checks


def shape_tuple(value) -> Tuple[int, ...]:
    """`value.shape` as a tuple of Python ints (any array-like with `.shape`)."""
    return tuple(int(d) for d in value.shape)


def format_key_list(items: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    """"a, b, c ... (+n more)": at most `limit` items, then a count of the rest (for error messages)."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


def check_state(expected: Mapping[str, Tuple[int, ...]], state: Mapping[str, object],
                what: str = "checkpoint") -> None:
    """Raise StateError unless `state` has exactly the keys of `expected` with the same shapes.

    expected: name -> shape tuple. state: name -> array-like with `.shape`.
    The message lists the missing, unexpected and mis-shaped keys (key, expected, found), at most
    8 of each followed by a count of the rest.
    """
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [f"{k} expected {tuple(expected[k])} found {shape_tuple(state[k])}"
             for k in sorted(expected) if k in state and shape_tuple(state[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {format_key_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {format_key_list(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} key(s) with the wrong shape: {format_key_list(wrong)}")
    raise StateError(f"{what} does not fit the model: " + "; ".join(parts) + ".")


def check_hog_kernels(state: Mapping[str, np.ndarray]) -> None:
    """Every `hog_enc.{k}.conv.weight` in `state` must be the fixed Sobel kernel.

    The backends compute HOG targets for all scales from one gradient pass with the first kernel,
    so a state whose kernels differ would silently change the targets. Raises StateError naming
    the key.
    """
    from localmim.core.targets import sobel_kernel
    sobel = sobel_kernel()
    for key in sorted(state):
        if key.startswith("hog_enc.") and key.endswith(".conv.weight") \
                and not np.array_equal(np.asarray(state[key], dtype=np.float32), sobel):
            raise StateError(f"state key {key} is not the fixed Sobel kernel of the HOG target")


# ----------------------------------------------------------------------------------------------
# canonical key lists: ViT


def _linear(prefix: str, out_dim: int, in_dim: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)}


def _norm(prefix: str, dim: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _block(prefix: str, dim: int, mlp_ratio: float) -> Dict[str, Tuple[int, ...]]:
    """One timm pre-norm Block: norm1, fused qkv (3D, D), proj, norm2, fc1 (hidden, D), fc2."""
    hidden = int(dim * mlp_ratio)
    out = {}
    out.update(_norm(f"{prefix}.norm1", dim))
    out.update(_linear(f"{prefix}.attn.qkv", 3 * dim, dim))
    out.update(_linear(f"{prefix}.attn.proj", dim, dim))
    out.update(_norm(f"{prefix}.norm2", dim))
    out.update(_linear(f"{prefix}.mlp.fc1", hidden, dim))
    out.update(_linear(f"{prefix}.mlp.fc2", dim, hidden))
    return out


def vit_encoder_shapes(spec: ViTSpec, branch_norms: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Encoder keys: cls_token (1,1,D), pos_embed (1,1+N,D), patch_embed.proj, blocks, norm.{k}."""
    d, p = spec.embed_dim, spec.patch_size
    out = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + spec.num_patches, d),
           "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)}
    for i in range(spec.depth):
        out.update(_block(f"blocks.{i}", d, spec.mlp_ratio))
    if branch_norms:
        for k in range(len(spec.taps)):
            out.update(_norm(f"norm.{k}", d))
    return out


def _conv(prefix: str, out_ch: int, in_ch: int, k: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (out_ch, in_ch, k, k), f"{prefix}.bias": (out_ch,)}


def _convt(prefix: str, in_ch: int, out_ch: int, k: int) -> Dict[str, Tuple[int, ...]]:
    # ConvTranspose weights are (in, out, kh, kw) in PyTorch.
    return {f"{prefix}.weight": (in_ch, out_ch, k, k), f"{prefix}.bias": (out_ch,)}


def _pred_head(prefix: str, scale: float, dim: int, out: int) -> Dict[str, Tuple[int, ...]]:
    """Parameter-bearing layers of the rescaling head, indexed as in the reference nn.Sequential."""
    if scale == 4.0:
        return {**_convt(f"{prefix}.0", dim, dim // 2, 2), **_norm(f"{prefix}.1", dim // 2),
                **_convt(f"{prefix}.3", dim // 2, dim // 4, 2), **_conv(f"{prefix}.4", out, dim // 4, 1)}
    if scale == 2.0:
        return {**_convt(f"{prefix}.0", dim, dim // 2, 2), **_conv(f"{prefix}.1", out, dim // 2, 1)}
    if scale == 1.0:
        return _conv(f"{prefix}.0", out, dim, 1)
    if scale == 0.5:
        return _conv(f"{prefix}.1", out, dim, 1)  # pred.0 is the parameter-free AvgPool
    raise SpecError(f"no rescaling head for scale {scale}")


def vit_decoder_shapes(spec: ViTSpec) -> Dict[str, Tuple[int, ...]]:
    """Decoder keys decoder.{k}.{embed, mask_token, pos_embed, blocks.j, norm, pred.idx}.

    The decoder blocks use the encoder's mlp_ratio, as the reference MAE_Decoder does.
    """
    out = {}
    n = spec.num_patches
    for k, (branch, out_dim) in enumerate(zip(spec.branches(), spec.out_dims())):
        dd = branch.decoder_dim
        pre = f"decoder.{k}"
        out.update(_linear(f"{pre}.embed", dd, branch.in_dim))
        out[f"{pre}.mask_token"] = (1, 1, dd)
        out[f"{pre}.pos_embed"] = (1, 1 + n, dd)
        for j in range(branch.decoder_depth):
            out.update(_block(f"{pre}.blocks.{j}", dd, spec.mlp_ratio))
        out.update(_norm(f"{pre}.norm", dd))
        out.update(_pred_head(f"{pre}.pred", branch.scale, dd, out_dim))
    return out


def vit_target_shapes(spec: ViTSpec) -> Dict[str, Tuple[int, ...]]:
    """HOG Sobel convs hog_enc.{k}.conv.weight (2,1,3,3) [+ bias (2,) with hog_bias]; empty for pixels."""
    out = {}
    if spec.target.kind != "hog":
        return out
    for k in range(len(spec.taps)):
        out[f"hog_enc.{k}.conv.weight"] = (2, 1, 3, 3)
        if spec.target.hog_bias:
            out[f"hog_enc.{k}.conv.bias"] = (2,)
    return out


def vit_canonical_shapes(spec: ViTSpec, include_decoder: bool = True,
                         include_targets: bool = True) -> Dict[str, Tuple[int, ...]]:
    """The full canonical key list of a LocalMIM ViT: name -> shape (PyTorch layouts)."""
    out = vit_encoder_shapes(spec)
    if include_decoder:
        out.update(vit_decoder_shapes(spec))
    if include_targets:
        out.update(vit_target_shapes(spec))
    return out


# ----------------------------------------------------------------------------------------------
# canonical key lists: Swin (no relative_position_index: it is derived from the window)


def _swin_block(prefix: str, dim: int, heads: int, window: int, mlp_ratio: float) -> Dict[str, Tuple[int, ...]]:
    out = _block(prefix, dim, mlp_ratio)
    out[f"{prefix}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
    return out


def swin_encoder_shapes(spec, branch_norms: bool = True) -> Dict[str, Tuple[int, ...]]:
    """`encoder.*` keys of a LocalMIM Swin: patch embed (conv + LN), stages (blocks with their
    ((2w-1)^2, heads) relative tables, w the stage window), merges (LN(4C), 4C -> 2C without bias)
    on every stage but the last, and the branch norms `encoder.norm.{k}` (width of branch k's input)."""
    c, p = spec.embed_dim, spec.patch_size
    out = {"encoder.patch_embed.proj.weight": (c, 3, p, p), "encoder.patch_embed.proj.bias": (c,)}
    out.update(_norm("encoder.patch_embed.norm", c))
    last = spec.num_stages - 1
    for s in range(spec.num_stages):
        dim = spec.stage_dim(s)
        for b in range(spec.depths[s]):
            out.update(_swin_block(f"encoder.layers.{s}.blocks.{b}", dim, spec.num_heads[s],
                                   spec.stage_window(s), spec.mlp_ratio))
        if s < last:
            out[f"encoder.layers.{s}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            out.update(_norm(f"encoder.layers.{s}.downsample.norm", 4 * dim))
    if branch_norms:
        for k, br in enumerate(spec.branches()):
            out.update(_norm(f"encoder.norm.{k}", br.in_dim))
    return out


def swin_decoder_shapes(spec) -> Dict[str, Tuple[int, ...]]:
    """decoder.{k}: embed (d, in), mask_token (1,1,d), pos_embed (1,g^2,d) (no cls row), ViT blocks
    (encoder mlp_ratio), norm, pred Linear (out, d): no rescaling head (docs/method.md#swin-decoders)."""
    out = {}
    for k, (br, out_dim) in enumerate(zip(spec.branches(), spec.out_dims())):
        d, pre = br.decoder_dim, f"decoder.{k}"
        out.update(_linear(f"{pre}.embed", d, br.in_dim))
        out[f"{pre}.mask_token"] = (1, 1, d)
        out[f"{pre}.pos_embed"] = (1, br.grid * br.grid, d)
        for j in range(br.decoder_depth):
            out.update(_block(f"{pre}.blocks.{j}", d, spec.mlp_ratio))
        out.update(_norm(f"{pre}.norm", d))
        out.update(_linear(f"{pre}.pred", out_dim, d))
    return out


def swin_target_shapes(spec) -> Dict[str, Tuple[int, ...]]:
    """hog_enc.{k}.conv.weight (2,1,3,3) [+ bias (2,)] per branch for HOG targets; empty for pixels."""
    out = {}
    if spec.target.kind == "hog":
        for k in range(spec.num_stages):
            out[f"hog_enc.{k}.conv.weight"] = (2, 1, 3, 3)
            if spec.target.hog_bias:
                out[f"hog_enc.{k}.conv.bias"] = (2,)
    return out


def swin_canonical_shapes(spec, include_decoder: bool = True,
                          include_targets: bool = True) -> Dict[str, Tuple[int, ...]]:
    """The full canonical key list of a LocalMIM Swin: name -> shape (PyTorch layouts); no
    relative_position_index (derived from the window)."""
    out = swin_encoder_shapes(spec)
    if include_decoder:
        out.update(swin_decoder_shapes(spec))
    if include_targets:
        out.update(swin_target_shapes(spec))
    return out
