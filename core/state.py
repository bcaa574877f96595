"""Canonical model state: expected keys and shapes, strict checks, and key maps to other layouts.

A canonical state is `dict[str, numpy.ndarray]` with the PyTorch names and layouts of
docs/internals.md ("Canonical state"): Linear (out, in), fused qkv (3D, D), Conv (out, in, kh, kw),
ConvTranspose (in, out, kh, kw). Both backends export to and import from it; the converter goes
through it. Everything here is pure numpy and works on any mapping whose values have `.shape`.

Layouts understood (`detect_layout`):

- "localmim": this package or the official LocalMIM ViT `.pth` (§1.11): identical names, with the
  branch norms `norm.{k}` and the decoders `decoder.{k}.*` (and `hog_enc.{k}.*` for HOG targets).
- "localmim-encoder": our encoder only (patch embed, blocks, branch norms).
- "mae": a full MAE checkpoint (encoder + `decoder_*` + top-level `mask_token`).
- "mae-encoder": an MAE encoder (`norm.*` is the single final norm).
- "timm-vit": a timm VisionTransformer (MAE encoder names plus `head.*` / `fc_norm.*`).

Swin layouts (`SWIN_LAYOUTS`, described in the Swin section below): "localmim-swin" (ours),
"official-localmim-swin" (official LocalMIM Swin: relative_position_index buffers and the
TL, TR, BL, BR merge order, defect D2), "swin-encoder" (a standard Swin encoder for fine-tuning) and
"timm-swin". `detect_family` tells ViT from Swin keys; `convert_state` dispatches on the layouts.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from localmim.core.specs import SWIN_SPECS, SpecError, TargetSpec, ViTSpec, VIT_SPECS

__all__ = [
    "StateError", "LAYOUTS", "check_state", "vit_encoder_shapes", "vit_decoder_shapes",
    "vit_target_shapes", "vit_canonical_shapes", "detect_layout", "unwrap_checkpoint",
    "from_localmim", "from_mae", "from_timm", "to_timm", "mae_encoder_part", "timm_kwargs", "identity_branch_norms",
    "convert_state", "infer_vit_spec", "fixed_hog_kernels",
    "SWIN_LAYOUTS", "detect_family", "swin_encoder_shapes", "swin_decoder_shapes", "swin_target_shapes",
    "swin_canonical_shapes", "swin_relative_position_index", "merge_official_to_ours",
    "merge_ours_to_official", "is_merge_key", "from_official_swin", "to_official_swin",
    "to_swin_encoder", "from_swin_encoder", "to_timm_swin", "from_timm_swin", "timm_swin_kwargs",
    "swin_to_canonical", "convert_swin_state", "infer_swin_spec",
]

SWIN_LAYOUTS = ("localmim-swin", "official-localmim-swin", "swin-encoder", "timm-swin")
LAYOUTS = ("localmim", "localmim-encoder", "mae", "mae-encoder", "timm-vit") + SWIN_LAYOUTS
_LIST_LIMIT = 8


class StateError(ValueError):
    """A state dict that does not fit: missing, unexpected or mis-shaped keys, or an unknown layout."""


# ----------------------------------------------------------------------------------------------
# checks


def _shape(value) -> Tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def _fmt_list(items: Sequence[str], limit: int = _LIST_LIMIT) -> str:
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
    wrong = [f"{k} expected {tuple(expected[k])} found {_shape(state[k])}"
             for k in sorted(expected) if k in state and _shape(state[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_fmt_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_fmt_list(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} key(s) with the wrong shape: {_fmt_list(wrong)}")
    raise StateError(f"{what} does not fit the model: " + "; ".join(parts) + ".")


# ----------------------------------------------------------------------------------------------
# canonical key lists


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
# layout detection and unwrapping

_ENCODER_RE = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|blocks\.\d+\..+)$")
_BRANCH_NORM_RE = re.compile(r"^norm\.\d+\.(weight|bias)$")
_LOCALMIM_RE = re.compile(r"^(decoder\.\d+\..+|hog_enc\.\d+\.conv\.(weight|bias))$")
_FINAL_NORM_RE = re.compile(r"^norm\.(weight|bias)$")
_MAE_DECODER_RE = re.compile(r"^(mask_token|decoder_(embed|pos_embed|blocks|norm|pred)(\..+)?)$")
_TIMM_HEAD_RE = re.compile(r"^(head|fc_norm)\.(weight|bias)$")

_LAYOUT_PATTERNS = {
    "localmim": (_ENCODER_RE, _BRANCH_NORM_RE, _LOCALMIM_RE),
    "localmim-encoder": (_ENCODER_RE, _BRANCH_NORM_RE),
    "mae": (_ENCODER_RE, _FINAL_NORM_RE, _MAE_DECODER_RE),
    "mae-encoder": (_ENCODER_RE, _FINAL_NORM_RE),
    "timm-vit": (_ENCODER_RE, _FINAL_NORM_RE, _TIMM_HEAD_RE),
}


def _unmatched(keys: Iterable[str], layout: str) -> List[str]:
    pats = _LAYOUT_PATTERNS[layout]
    return sorted(k for k in keys if not any(p.match(k) for p in pats))


def detect_layout(keys: Iterable[str]) -> str:
    """Name the layout of a state dict from its keys (see the module docstring).

    MAE encoders and timm ViTs share names; "timm-vit" is returned when a `head.*` or `fc_norm.*`
    key is present, "mae-encoder" otherwise. Raises StateError naming the keys that fit no layout.
    """
    keys = list(keys)
    if detect_family(keys) == "swin":
        return _detect_swin_layout(keys)
    if not any(_ENCODER_RE.match(k) for k in keys):
        raise StateError(
            f"unknown checkpoint layout: none of its {len(keys)} key(s) is a ViT encoder key "
            f"(cls_token, pos_embed, patch_embed.proj.*, blocks.*); keys: {_fmt_list(sorted(keys))}.")
    if any(_BRANCH_NORM_RE.match(k) for k in keys):
        layout = "localmim" if any(_LOCALMIM_RE.match(k) for k in keys) else "localmim-encoder"
    elif any(_MAE_DECODER_RE.match(k) for k in keys):
        layout = "mae"
    elif any(_TIMM_HEAD_RE.match(k) for k in keys):
        layout = "timm-vit"
    else:
        layout = "mae-encoder"
    bad = _unmatched(keys, layout)
    if bad:
        raise StateError(
            f"unknown checkpoint layout: it looks like {layout!r} but {len(bad)} key(s) match no known "
            f"layout: {_fmt_list(bad)}.")
    return layout


_WRAPPER_KEYS = ("model", "state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
_TRAINING_PREFIXES = ("optim.", "scaler.", "meta.")


def unwrap_checkpoint(obj: Mapping) -> Dict[str, object]:
    """The model state inside a checkpoint object.

    Takes obj["model"] / ["state_dict"] / ["module"] when present (repeatedly), strips the
    DistributedDataParallel "module." and torch.compile "_orig_mod." prefixes, and drops the
    "optim." / "scaler." / "meta." entries of a MindSpore training checkpoint.
    """
    if not isinstance(obj, Mapping):
        raise StateError(f"a checkpoint must be a dict of tensors, got {type(obj).__name__}")
    inner = obj
    while True:
        found = next((w for w in _WRAPPER_KEYS if isinstance(inner.get(w), Mapping)), None)
        if found is None:
            break
        inner = inner[found]
    out = {}
    for name, value in inner.items():
        if not isinstance(name, str):
            raise StateError(f"a checkpoint key must be a string, got {name!r}")
        if name.startswith(_TRAINING_PREFIXES):
            continue
        stripped = True
        while stripped:
            stripped = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, stripped = name[len(p):], True
        if name in out:
            raise StateError(f"checkpoint key {name!r} appears twice after removing wrapper prefixes")
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------
# key maps


def _last_norm(spec: ViTSpec) -> str:
    return f"norm.{len(spec.taps) - 1}"


def _require_last_tap_is_last_block(spec: ViTSpec, what: str) -> None:
    if spec.taps[-1] != spec.depth - 1:
        raise StateError(
            f"{what} needs the last branch to tap the last block: {spec.name} taps {list(spec.taps)} "
            f"with depth {spec.depth}")


def _check_subset(expected: Mapping[str, Tuple[int, ...]], state: Mapping[str, object], what: str):
    """Raise on unexpected or mis-shaped keys (missing keys are the caller's business)."""
    check_state({k: expected[k] for k in state if k in expected}, state, what)


def from_localmim(state: Mapping[str, np.ndarray], spec: ViTSpec,
                  what: str = "checkpoint") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Official LocalMIM / this package: names are canonical already.

    Returns (state, missing) where missing lists the canonical keys of `spec` that are absent (for an
    encoder-only file: the decoders and HOG convs). Unexpected or mis-shaped keys raise StateError;
    a HOG bias present while the spec has none (or the other way round) shows up there.
    """
    expected = vit_canonical_shapes(spec)
    out = dict(state)
    _check_subset(expected, out, what)
    return out, sorted(k for k in expected if k not in out)


def from_mae(state: Mapping[str, np.ndarray], spec: ViTSpec,
             what: str = "checkpoint") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """MAE (full or encoder) or timm ViT -> canonical encoder part.

    MAE's single final `norm` follows the last block, which is the last tap, so it becomes
    `norm.{len(taps)-1}`. MAE decoder keys (`decoder_*`, `mask_token`) and timm `head.*` /
    `fc_norm.*` are dropped: their geometry differs from LocalMIM's. Returns (state, missing) with
    missing = the other branch norms, the decoders and the HOG convs, to be initialised by the caller.
    """
    _require_last_tap_is_last_block(spec, "mapping an MAE/timm final norm")
    enc = vit_encoder_shapes(spec, branch_norms=False)
    out: Dict[str, np.ndarray] = {}
    unknown = []
    for name, value in state.items():
        if _ENCODER_RE.match(name):
            out[name] = value
        elif _FINAL_NORM_RE.match(name):
            out[f"{_last_norm(spec)}.{name.split('.')[-1]}"] = value
        elif _MAE_DECODER_RE.match(name) or _TIMM_HEAD_RE.match(name):
            continue
        else:
            unknown.append(name)
    if unknown:
        raise StateError(f"{what} has {len(unknown)} key(s) that are not MAE/timm ViT keys: {_fmt_list(sorted(unknown))}.")
    if "pos_embed" in out and _shape(out["pos_embed"]) != enc["pos_embed"]:
        raise StateError(
            f"{what}: pos_embed has shape {_shape(out['pos_embed'])} but {spec.name} at img_size "
            f"{spec.img_size} needs {enc['pos_embed']} (a different patch grid); pick a matching model "
            f"or img_size.")
    expected = vit_canonical_shapes(spec)
    _check_subset(expected, out, what)
    missing_enc = sorted(k for k in enc if k not in out)
    if missing_enc:
        check_state(enc, {k: v for k, v in out.items() if k in enc}, what)
    return out, sorted(k for k in expected if k not in out)


def from_timm(state: Mapping[str, np.ndarray], spec: ViTSpec,
              what: str = "checkpoint") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """timm VisionTransformer -> canonical encoder part; the inverse of `to_timm` (see `from_mae`)."""
    return from_mae(state, spec, what)


def mae_encoder_part(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """An MAE / timm state without its decoder (`decoder_*`, `mask_token`) and head (`head`, `fc_norm`)
    keys: what `timm.create_model(..., num_classes=0)` loads as is (names unchanged)."""
    return {k: v for k, v in state.items() if not (_MAE_DECODER_RE.match(k) or _TIMM_HEAD_RE.match(k))}


def to_timm(state: Mapping[str, np.ndarray], spec: ViTSpec,
            what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Canonical state -> timm `vit_*` state dict for `timm.create_model(..., num_classes=0)`.

    Keeps cls_token, pos_embed, patch_embed.proj.*, blocks.*; `norm.*` is the last branch norm, so
    timm's forward_features (all blocks, then norm) equals our encoder's last tap on unmasked input.
    """
    _require_last_tap_is_last_block(spec, "timm export")
    enc = vit_encoder_shapes(spec)
    last = _last_norm(spec)
    needed = {k: enc[k] for k in enc if not _BRANCH_NORM_RE.match(k) or k.startswith(last + ".")}
    check_state(needed, {k: state[k] for k in needed if k in state}, what)
    out = {}
    for name in needed:
        out[f"norm.{name.split('.')[-1]}" if name.startswith(last + ".") else name] = state[name]
    return out


def timm_kwargs(spec: ViTSpec) -> Dict[str, object]:
    """Arguments for `timm.create_model(**timm_kwargs(spec))` building our encoder as a timm ViT."""
    return {"model_name": f"vit_base_patch{spec.patch_size}_224", "pretrained": False, "num_classes": 0,
            "img_size": spec.img_size, "patch_size": spec.patch_size, "embed_dim": spec.embed_dim,
            "depth": spec.depth, "num_heads": spec.num_heads, "mlp_ratio": spec.mlp_ratio}


def identity_branch_norms(spec: ViTSpec, missing: Iterable[str]) -> Dict[str, np.ndarray]:
    """Reference-init (weight 1, bias 0) arrays for the branch-norm keys among `missing`."""
    out = {}
    for name in missing:
        if _BRANCH_NORM_RE.match(name):
            fill = np.ones if name.endswith(".weight") else np.zeros
            out[name] = fill((spec.embed_dim,), dtype=np.float32)
    return out


def fixed_hog_kernels(spec: ViTSpec, missing: Iterable[str]) -> Dict[str, np.ndarray]:
    """The fixed Sobel weights (2,1,3,3) for the `hog_enc.{k}.conv.weight` keys among `missing`.

    Only the weights are deterministic; a missing HOG bias (random per run, §1.5) cannot be recreated.
    """
    from localmim.core.targets import sobel_kernel
    return {k: sobel_kernel() for k in missing if re.match(r"^hog_enc\.\d+\.conv\.weight$", k)}


def _hog_notes(state: Mapping[str, object], spec: ViTSpec) -> List[str]:
    convs = sorted(k for k in state if k.startswith("hog_enc."))
    if spec.target.kind != "hog":
        return [] if not convs else [f"{len(convs)} hog_enc key(s) present although the target is pixels"]
    if not convs:
        return ["no hog_enc keys in the source"]
    bias = sum(k.endswith(".bias") for k in convs)
    return [f"HOG target: {spec.target.nbins} bins, " + (f"{bias} frozen Sobel bias(es) kept" if bias else "no Sobel bias")]


def convert_state(state: Mapping[str, np.ndarray], src_layout: str, dst_layout: str, spec: ViTSpec,
                  what: str = "checkpoint") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Map `state` from `src_layout` to `dst_layout` for `spec`.

    dst_layout: "localmim" (full canonical; every key must come from the source), "localmim-encoder"
    (canonical encoder; branch norms the source lacks are initialised to weight 1 / bias 0) or
    "timm-vit"; Swin layouts (or a SwinSpec) go to `convert_swin_state`. Returns (new_state, notes):
    notes are one-line remarks such as the newly
    initialised keys. Raises StateError naming keys when the source cannot fill the destination.
    """
    for name, role in ((src_layout, "source"), (dst_layout, "destination")):
        if name not in LAYOUTS:
            raise StateError(f"unknown {role} layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
    if getattr(spec, "family", "vit") == "swin" or src_layout in SWIN_LAYOUTS or dst_layout in SWIN_LAYOUTS:
        return convert_swin_state(state, src_layout, dst_layout, spec, what)
    if dst_layout in ("mae", "mae-encoder"):
        raise StateError(f"writing the {dst_layout!r} layout is not supported; use 'timm-vit' (same encoder names)")
    if src_layout in ("localmim", "localmim-encoder"):
        canon, missing = from_localmim(state, spec, what)
    else:
        canon, missing = from_mae(state, spec, what)
    notes = _hog_notes(canon, spec) if src_layout == "localmim" else []
    enc_keys = vit_encoder_shapes(spec)
    if dst_layout == "localmim":
        sobel = fixed_hog_kernels(spec, missing)
        if sobel and src_layout == "localmim":
            canon.update(sobel)
            missing = [k for k in missing if k not in sobel]
            notes.append(f"filled {len(sobel)} absent HOG kernel(s) with the fixed Sobel filter")
        if missing and src_layout != "localmim":
            raise StateError(
                f"{what} ({src_layout}) cannot fill a full LocalMIM state for {spec.name}: "
                f"{len(missing)} missing key(s): {_fmt_list(missing)}; convert to the encoder only instead.")
        check_state(vit_canonical_shapes(spec), canon, what)
        return canon, notes
    fresh = identity_branch_norms(spec, [k for k in missing if k in enc_keys])
    if fresh:
        notes.append(f"newly initialised (weight 1, bias 0): {_fmt_list(sorted(fresh))}")
    dropped = sorted(k for k in canon if k not in enc_keys)
    if dropped:
        notes.append(f"dropped {len(dropped)} decoder/target key(s)")
    encoder = {k: canon[k] for k in canon if k in enc_keys}
    encoder.update(fresh)
    check_state(enc_keys, encoder, what)
    if dst_layout == "localmim-encoder":
        return encoder, notes
    return to_timm(encoder, spec, what), notes


# ----------------------------------------------------------------------------------------------
# spec inference


def _first_shape(state, name, what):
    if name not in state:
        raise StateError(f"{what} has no {name!r}; cannot infer the model size")
    return _shape(state[name])


def _infer_target(state: Mapping[str, object], spec: ViTSpec) -> Optional[TargetSpec]:
    """The target a full state implies (HOG nbins / bias, or pixels), None without decoders."""
    head = [k for k in state if re.match(r"^decoder\.\d+\.pred\.\d+\.weight$", k)]
    if not head:
        return None
    k_unit = min(range(len(spec.scales)), key=lambda i: abs(spec.scales[i] - 1.0))
    last = max((k for k in head if k.startswith(f"decoder.{k_unit}.")),
               key=lambda k: int(k.split(".")[3]), default=None)
    if last is None:
        return None
    out = _shape(state[last])[0]
    cell = int(spec.patch_size / spec.scales[k_unit])
    if any(k.startswith("hog_enc.") for k in state):
        if out % 3:
            raise StateError(f"decoder output width {out} in {last} is not 3 x nbins")
        return TargetSpec(kind="hog", nbins=out // 3, hog_bias=any(k.endswith("conv.bias") and k.startswith("hog_enc.")
                                                                 for k in state))
    if out == 3 * cell * cell:
        return TargetSpec(kind="pixel", norm_pix=spec.target.norm_pix if spec.target.kind == "pixel" else True)
    if out % 3 == 0:  # HOG without its (fixed, refillable) Sobel convs
        return TargetSpec(kind="hog", nbins=out // 3, hog_bias=spec.target.kind == "hog" and spec.target.hog_bias)
    return None


def _geometry(state: Mapping[str, object], what: str) -> Tuple[int, int, int, Tuple[int, ...], int]:
    """(patch, width, depth, pos_embed shape, img_size) read from a ViT state's shapes."""
    w = _first_shape(state, "patch_embed.proj.weight", what)
    if len(w) != 4 or w[1] != 3 or w[2] != w[3]:
        raise StateError(f"{what}: patch_embed.proj.weight has shape {w}; expected (D, 3, p, p)")
    dim, patch = w[0], w[2]
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    pos = _first_shape(state, "pos_embed", what)
    grid = int(round((pos[1] - 1) ** 0.5)) if len(pos) == 3 else 0
    if len(pos) != 3 or grid * grid != pos[1] - 1:
        raise StateError(f"{what}: pos_embed has shape {pos}; expected (1, 1 + g*g, D)")
    return patch, dim, depth, pos, grid * patch


def infer_vit_spec(state: Mapping[str, object], layout: str, what: str = "checkpoint",
                   name: Optional[str] = None) -> Tuple[ViTSpec, List[str]]:
    """Match a state's shapes against core.specs.VIT_SPECS (or only against `name` when given).

    Patch size, width and depth come from patch_embed.proj.weight and the block count and must equal
    a registered spec's; img_size (from pos_embed), decoder width and the target (HOG nbins and bias,
    or pixels) may differ and become overrides. Returns (spec, notes). Raises StateError naming the
    shapes when no registered spec fits (or when `name` has another geometry).
    """
    patch, dim, depth, pos, img_size = _geometry(state, what)
    w = _first_shape(state, "patch_embed.proj.weight", what)
    if name is not None:
        named = VIT_SPECS.get(name)
        if named is None:
            raise StateError(f"unknown ViT model {name!r}; known: {', '.join(sorted(VIT_SPECS))}")
        if (named.patch_size, named.embed_dim, named.depth) != (patch, dim, depth):
            raise StateError(
                f"{what} holds a different model than {name}: patch {patch}, width {dim}, {depth} blocks "
                f"(patch_embed.proj.weight {w}, pos_embed {pos}) but {name} has patch {named.patch_size}, "
                f"width {named.embed_dim}, {named.depth} blocks.")
    taps = len({k.split(".")[1] for k in state if _BRANCH_NORM_RE.match(k)})
    pool = [VIT_SPECS[name]] if name is not None else list(VIT_SPECS.values())
    candidates = [s for s in pool
                  if (s.patch_size, s.embed_dim, s.depth) == (patch, dim, depth)
                  and (layout not in ("localmim", "localmim-encoder") or len(s.taps) == taps)]
    if not candidates and name is not None:
        raise StateError(f"{what} has {taps} branch norms but {name} has {len(VIT_SPECS[name].taps)} taps.")
    if not candidates:
        known = ", ".join(f"{s.name} (p{s.patch_size}, D{s.embed_dim}, depth {s.depth})" for s in VIT_SPECS.values())
        raise StateError(
            f"{what} fits no registered model: patch_embed.proj.weight {w} (patch {patch}, width {dim}), "
            f"{depth} blocks, pos_embed {pos}; registered: {known}.")
    base = candidates[0]
    changes = {}
    if img_size != base.img_size:
        changes["img_size"] = img_size
    if "decoder.0.embed.weight" in state:
        dd = _shape(state["decoder.0.embed.weight"])[0]
        if dd != base.decoder_dim:
            changes["decoder_dim"] = dd
    spec = base.with_(**changes) if changes else base
    target = _infer_target(state, spec)
    if target is not None and target != spec.target:
        changes["target"] = target
        spec = spec.with_(target=target)
    notes = [f"model {base.name}" + (f" with {', '.join(f'{k}={v}' for k, v in changes.items())}" if changes else "")]
    return spec, notes


# ----------------------------------------------------------------------------------------------
# Swin (spec §2, docs/internals.md "Swin")
#
# Layouts:
# - "localmim-swin": this package (encoder.*, decoder.{k}.*, hog_enc.{k}.*); PatchMerging input
#   order TL, BL, TR, BR (Swin's, defect D2 fixed). An encoder-only file (no decoder.*) reads too.
# - "official-localmim-swin": the official LocalMIM Swin .pth: the same names plus the
#   `encoder.layers.{s}.blocks.{b}.attn.relative_position_index` buffers, merge order TL, TR, BL, BR.
#   Key names alone cannot tell it from ours once those buffers are gone, so a file is taken as
#   official only when it has relative_position_index keys or when the caller says so (--from).
# - "swin-encoder": a standard (official / SimMIM) Swin encoder for fine-tuning: the `encoder.`
#   prefix stripped, `layers.{s}.downsample.*` at the end of stage s, merge weights in the standard
#   order, `norm.*` = our last branch norm (the other branch norms are dropped); no
#   relative_position_index (standard Swins rebuild it; the official fine-tune loads strict=False).
# - "timm-swin": timm's SwinTransformer (timm >= 0.9): like "swin-encoder" but the merging of
#   stage s sits at the start of the next stage, `layers.{s+1}.downsample.*`; loads strictly into
#   `timm.create_model(**timm_swin_kwargs(spec))`.

_REL_INDEX_RE = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index$")
_MERGE_RE = re.compile(r"^(encoder\.)?layers\.\d+\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)$")
_SWIN_OURS_RE = re.compile(r"^(encoder\.(patch_embed|layers|norm)\..+|decoder\.\d+\..+|hog_enc\.\d+\.conv\.(weight|bias))$")
_SWIN_PLAIN_RE = re.compile(r"^(patch_embed\.(proj|norm)\.(weight|bias)|layers\.\d+\..+|norm\.(weight|bias))$")
_SWIN_HINT_RE = re.compile(r"^(encoder\.)?layers\.\d+\.(blocks|downsample)\.")


def detect_family(keys: Iterable[str]) -> str:
    """"swin" when any key is a Swin stage key (`[encoder.]layers.{s}.blocks|downsample.*`), else "vit"."""
    return "swin" if any(_SWIN_HINT_RE.match(k) for k in keys) else "vit"


def _detect_swin_layout(keys: List[str]) -> str:
    """One of SWIN_LAYOUTS from the key names (see the Swin layouts above)."""
    if any(k.startswith("encoder.") for k in keys):
        layout = "official-localmim-swin" if any(_REL_INDEX_RE.match(k) for k in keys) else "localmim-swin"
        bad = sorted(k for k in keys if not (_SWIN_OURS_RE.match(k) or _REL_INDEX_RE.match(k)))
    else:
        downs = {int(k.split(".")[1]) for k in keys if _TIMM_DOWN_RE.match(k)}
        layout = "swin-encoder" if 0 in downs or not downs else "timm-swin"
        extra = re.compile(r"^(head\..+|layers\.\d+\.blocks\.\d+\.attn(\.relative_position_index|_mask))$")
        bad = sorted(k for k in keys if not (_SWIN_PLAIN_RE.match(k) or (layout == "timm-swin" and extra.match(k))))
    if bad:
        raise StateError(f"unknown checkpoint layout: it looks like {layout!r} but {len(bad)} key(s) match no "
                         f"known Swin layout: {_fmt_list(bad)}.")
    return layout


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
    (encoder mlp_ratio), norm, pred Linear (out, d): no rescaling head (§2.7)."""
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


def swin_relative_position_index(window: int) -> np.ndarray:
    """Swin's (w^2, w^2) int64 buffer: for tokens i, j of a w x w window in raster order,
    (r_i - r_j + w - 1) * (2w - 1) + (c_i - c_j + w - 1)."""
    r, c = np.divmod(np.arange(window * window, dtype=np.int64), window)
    dr = r[:, None] - r[None, :] + window - 1
    dc = c[:, None] - c[None, :] + window - 1
    return dr * (2 * window - 1) + dc


def _swap_middle_blocks(a: np.ndarray, axis: int) -> np.ndarray:
    n = a.shape[axis]
    if n % 4:
        raise StateError(f"a patch-merging axis must hold 4 blocks, got length {n}")
    blocks = np.split(np.asarray(a), 4, axis=axis)
    return np.concatenate([blocks[0], blocks[2], blocks[1], blocks[3]], axis=axis)


def merge_official_to_ours(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Reorder a patch-merging 4C input axis from the official LocalMIM pretraining order
    TL, TR, BL, BR to Swin's TL, BL, TR, BR (defect D2): the middle two C-blocks swap places.
    a: e.g. reduction.weight (2C, 4C) with axis=-1, or norm.weight / norm.bias (4C,)."""
    return _swap_middle_blocks(a, axis)


def merge_ours_to_official(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """The inverse of `merge_official_to_ours` (the swap is its own inverse)."""
    return _swap_middle_blocks(a, axis)


def is_merge_key(name: str) -> bool:
    """Whether `name` is a PatchMerging weight whose last axis is the 4C input (any Swin layout)."""
    return bool(_MERGE_RE.match(name))


def _permute_merges(state: Mapping[str, np.ndarray], fn) -> Dict[str, np.ndarray]:
    return {k: (fn(np.asarray(v), -1) if is_merge_key(k) else v) for k, v in state.items()}


def from_official_swin(state: Mapping[str, np.ndarray], spec,
                       what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Official LocalMIM Swin -> our layout: drop the relative_position_index buffers (checked
    against the stage windows) and swap the middle C-blocks of every merge weight."""
    out = {}
    for name, value in state.items():
        m = _REL_INDEX_RE.match(name)
        if m is None:
            out[name] = value
            continue
        s = int(m.group(1))
        if s >= spec.num_stages:
            raise StateError(f"{what}: {name} belongs to stage {s} but {spec.name} has {spec.num_stages} stages")
        expected = swin_relative_position_index(spec.stage_window(s))
        if _shape(value) != expected.shape or not np.array_equal(np.asarray(value), expected):
            raise StateError(f"{what}: {name} (shape {_shape(value)}) is not Swin's relative position index "
                             f"for a {spec.stage_window(s)}x{spec.stage_window(s)} window {expected.shape}")
    return _permute_merges(out, merge_official_to_ours)


def to_official_swin(state: Mapping[str, np.ndarray], spec) -> Dict[str, np.ndarray]:
    """Our layout -> official LocalMIM Swin: merge weights to TL, TR, BL, BR and a
    relative_position_index buffer (int64) in every encoder block."""
    out = _permute_merges(state, merge_ours_to_official)
    for s in range(spec.num_stages):
        index = swin_relative_position_index(spec.stage_window(s))
        for b in range(spec.depths[s]):
            out[f"encoder.layers.{s}.blocks.{b}.attn.relative_position_index"] = index.copy()
    return out


def _last_swin_norm(spec) -> str:
    return f"encoder.norm.{spec.num_stages - 1}"


def to_swin_encoder(state: Mapping[str, np.ndarray], spec, what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Canonical Swin -> "swin-encoder": `encoder.` stripped, `norm.*` = the last branch norm (after
    the last stage, where a standard Swin has its final norm); other branch norms dropped."""
    enc = swin_encoder_shapes(spec)
    last = _last_swin_norm(spec) + "."
    needed = {k: v for k, v in enc.items() if not k.startswith("encoder.norm.") or k.startswith(last)}
    check_state(needed, {k: state[k] for k in needed if k in state}, what)
    out = {}
    for name in needed:
        short = name[len("encoder."):]
        out["norm." + name.split(".")[-1] if name.startswith(last) else short] = state[name]
    return out


def from_swin_encoder(state: Mapping[str, np.ndarray], spec, what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """"swin-encoder" -> canonical encoder keys (the inverse of `to_swin_encoder`)."""
    bad = sorted(k for k in state if not _SWIN_PLAIN_RE.match(k))
    if bad:
        raise StateError(f"{what} has {len(bad)} key(s) that are not Swin encoder keys: {_fmt_list(bad)}.")
    last = _last_swin_norm(spec)
    return {(f"{last}.{k.split('.')[-1]}" if k.startswith("norm.") else "encoder." + k): v
            for k, v in state.items()}


_TIMM_DOWN_RE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


def to_timm_swin(state: Mapping[str, np.ndarray], spec, what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Canonical Swin -> timm SwinTransformer keys: as "swin-encoder" with the merging of stage s
    renamed `layers.{s+1}.downsample.*` (timm merges at a stage's start, in the same TL, BL, TR, BR
    order). Load into `timm.create_model(**timm_swin_kwargs(spec))` (strict)."""
    out = {}
    for name, value in to_swin_encoder(state, spec, what).items():
        m = _TIMM_DOWN_RE.match(name)
        out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else name] = value
    return out


def from_timm_swin(state: Mapping[str, np.ndarray], spec, what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """timm SwinTransformer -> canonical encoder keys (the inverse of `to_timm_swin`); `head.*` and
    timm's non-persistent buffers are dropped."""
    plain = {}
    for name, value in state.items():
        if name.startswith("head.") or name.endswith((".relative_position_index", ".attn_mask")):
            continue
        m = _TIMM_DOWN_RE.match(name)
        if m and int(m.group(1)) == 0:
            raise StateError(f"{what}: {name} has no previous stage to belong to")
        plain[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else name] = value
    return from_swin_encoder(plain, spec, what)


def timm_swin_kwargs(spec) -> Dict[str, object]:
    """Arguments for `timm.create_model(**timm_swin_kwargs(spec))` building our encoder as a timm
    SwinTransformer (no head). Its LayerNorms use timm's eps 1e-5; ours use 1e-6, so features agree
    to about 1e-3 unless `norm_layer` is overridden with eps 1e-6."""
    return {"model_name": "swin_base_patch4_window7_224", "pretrained": False, "num_classes": 0,
            "img_size": spec.img_size, "patch_size": spec.patch_size, "embed_dim": spec.embed_dim,
            "depths": tuple(spec.depths), "num_heads": tuple(spec.num_heads),
            "window_size": spec.window_size, "mlp_ratio": spec.mlp_ratio}


def swin_to_canonical(state: Mapping[str, np.ndarray], layout: str, spec,
                      what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Any SWIN_LAYOUTS state -> canonical names and merge order (possibly only the encoder part);
    only renames, drops buffers and permutes merges: shapes are checked by the caller."""
    if layout == "official-localmim-swin":
        return from_official_swin(state, spec, what)
    if layout == "localmim-swin":
        stray = sorted(k for k in state if _REL_INDEX_RE.match(k))
        if stray:
            raise StateError(f"{what} has relative_position_index buffers ({_fmt_list(stray)}), which "
                             f"only the official layout has; use --from official-localmim-swin")
        return dict(state)
    if layout == "swin-encoder":
        return from_swin_encoder(state, spec, what)
    return from_timm_swin(state, spec, what)


def convert_swin_state(state: Mapping[str, np.ndarray], src_layout: str, dst_layout: str, spec,
                       what: str = "checkpoint") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Map a Swin `state` between SWIN_LAYOUTS for `spec` -> (new_state, notes).

    Full destinations ("localmim-swin", "official-localmim-swin") need every canonical key
    (absent HOG Sobel weights are refilled); a source without decoders can only go to
    "swin-encoder" or "timm-swin". Raises StateError naming the missing / unexpected /
    mis-shaped keys.
    """
    for name, role in ((src_layout, "source"), (dst_layout, "destination")):
        if name not in SWIN_LAYOUTS:
            raise StateError(f"unknown Swin {role} layout {name!r}; known: {', '.join(SWIN_LAYOUTS)}")
    canon = swin_to_canonical(state, src_layout, spec, what)
    expected = swin_canonical_shapes(spec)
    full = dst_layout in ("localmim-swin", "official-localmim-swin")
    if not full:
        _check_subset(expected, canon, what)
    notes = []
    if src_layout == "official-localmim-swin":
        merges = sum(1 for k in canon if is_merge_key(k))
        notes.append(f"merge order TL,TR,BL,BR -> TL,BL,TR,BR: permuted {merges} merge tensor(s); "
                     f"dropped relative_position_index buffers")
    missing = sorted(k for k in expected if k not in canon)
    if full:  # one message naming every missing, unexpected and mis-shaped key
        sobel = fixed_hog_kernels(spec, missing)
        if sobel and any(k.startswith("decoder.") for k in canon):
            canon.update(sobel)
            notes.append(f"filled {len(sobel)} absent HOG kernel(s) with the fixed Sobel filter")
        check_state(expected, canon, what)
        if dst_layout == "official-localmim-swin":
            notes.append("wrote merge order TL,TR,BL,BR and relative_position_index buffers (official layout)")
            return to_official_swin(canon, spec), notes
        return canon, notes
    dropped = sorted(k for k in canon if not k.startswith("encoder.") or
                     (k.startswith("encoder.norm.") and not k.startswith(_last_swin_norm(spec) + ".")))
    if dropped:
        notes.append(f"dropped {len(dropped)} decoder/target/branch-norm key(s)")
    if dst_layout == "swin-encoder":
        return to_swin_encoder(canon, spec, what), notes
    return to_timm_swin(canon, spec, what), notes


def infer_swin_spec(state: Mapping[str, object], layout: str = "localmim-swin", what: str = "checkpoint",
                    name: Optional[str] = None):
    """Match a Swin state's shapes against core.specs.SWIN_SPECS (or only `name`) -> (spec, notes).

    Read from the shapes: patch and embed dim (patch_embed.proj.weight), depths (block counts),
    heads per stage (relative tables' second dim), the stage-0 window (table rows (2w-1)^2); these
    must equal a registered spec's. img_size (branch 0's decoder grid g0: img = 2 * patch * g0),
    decoder widths and depth and the target (HOG nbins / bias, or pixels) become overrides.
    Accepts canonical, official, "swin-encoder" and "timm-swin" names.
    """
    state = {("encoder." + k if layout in ("swin-encoder", "timm-swin") else k): v for k, v in state.items()}
    w = _first_shape(state, "encoder.patch_embed.proj.weight", what)
    if len(w) != 4 or w[1] != 3 or w[2] != w[3]:
        raise StateError(f"{what}: encoder.patch_embed.proj.weight has shape {w}; expected (C, 3, p, p)")
    dim, patch = w[0], w[2]
    depths_d: Dict[int, int] = {}
    heads_d: Dict[int, int] = {}
    table0 = None
    for k, v in state.items():
        m = re.match(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depths_d[s] = max(depths_d.get(s, 0), b + 1)
            heads_d[s] = _shape(v)[1]
            if s == 0:
                table0 = _shape(v)
    if not depths_d or sorted(depths_d) != list(range(len(depths_d))):
        raise StateError(f"{what}: no consecutive encoder.layers.{{s}}.blocks.{{b}}.attn.relative_position_bias_table "
                         f"keys; cannot infer the Swin size")
    depths = tuple(depths_d[s] for s in range(len(depths_d)))
    heads = tuple(heads_d[s] for s in range(len(heads_d)))
    side = int(round(table0[0] ** 0.5))
    window = (side + 1) // 2
    geometry = f"patch {patch}, width {dim}, depths {depths}, heads {heads}, stage-0 window {window}"
    if name is not None and name not in SWIN_SPECS:
        raise StateError(f"unknown Swin model {name!r}; known: {', '.join(sorted(SWIN_SPECS))}")
    pool = {name: SWIN_SPECS[name]} if name is not None else SWIN_SPECS
    candidates = [s for s in pool.values() if (s.patch_size, s.embed_dim, s.depths, s.num_heads) ==
                  (patch, dim, depths, heads) and s.stage_window(0) == window]
    if not candidates:
        known = "; ".join(f"{s.name} (p{s.patch_size}, C{s.embed_dim}, {s.depths}, {s.num_heads}, w{s.window_size})"
                          for s in pool.values())
        raise StateError(f"{what} fits no registered Swin model: {geometry} (from encoder.patch_embed.proj.weight "
                         f"{w} and the relative_position_bias_table shapes); candidates: {known}.")
    base = candidates[0]
    changes: Dict[str, object] = {}
    if "decoder.0.pos_embed" in state:
        g0 = int(round(_shape(state["decoder.0.pos_embed"])[1] ** 0.5))
        img = g0 * base.patch_size * 2
        if img != base.img_size:
            changes["img_size"] = img
    dec_dims = []
    for k in range(base.num_stages):
        key = f"decoder.{k}.embed.weight"
        if key in state:
            dec_dims.append(_shape(state[key])[0])
    if len(dec_dims) == base.num_stages and tuple(dec_dims) != base.decoder_dims:
        changes["decoder_dims"] = tuple(dec_dims)
    dec_depth = 1 + max((int(k.split(".")[3]) for k in state if re.match(r"^decoder\.0\.blocks\.\d+\.", k)), default=-1)
    if dec_depth > 0 and dec_depth != base.decoder_depth:
        changes["decoder_depth"] = dec_depth
    try:
        spec = base.with_(**changes) if changes else base
    except SpecError as exc:
        raise StateError(f"{what}: its shapes give an invalid {base.name}: {exc}") from None
    if "decoder.0.pred.weight" in state:
        out = _shape(state["decoder.0.pred.weight"])[0]
        cell = spec.branches()[0].cell
        has_hog = any(k.startswith("hog_enc.") for k in state)
        if has_hog or out != 3 * cell * cell:
            if out % 3:
                raise StateError(f"{what}: decoder.0.pred.weight gives {out} outputs, not 3 x nbins")
            target = TargetSpec(kind="hog", nbins=out // 3,
                                hog_bias=any(k.startswith("hog_enc.") and k.endswith(".bias") for k in state))
        else:
            target = TargetSpec(kind="pixel", norm_pix=spec.target.norm_pix if spec.target.kind == "pixel" else True)
        if target != spec.target:
            changes["target"] = target
            spec = spec.with_(target=target)
    for s in range(spec.num_stages):
        key = f"encoder.layers.{s}.blocks.0.attn.relative_position_bias_table"
        want = (2 * spec.stage_window(s) - 1) ** 2
        if _shape(state[key])[0] != want:
            raise StateError(f"{what}: {key} has {_shape(state[key])[0]} rows but {spec.name} at img_size "
                             f"{spec.img_size} needs {want} (window {spec.stage_window(s)} at stage {s})")
    notes = [f"model {base.name}" + (f" with {', '.join(f'{k}={v}' for k, v in changes.items())}" if changes else "")]
    return spec, notes
