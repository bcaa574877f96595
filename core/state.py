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
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from localmim.core.specs import SpecError, TargetSpec, ViTSpec, VIT_SPECS

__all__ = [
    "StateError", "LAYOUTS", "check_state", "vit_encoder_shapes", "vit_decoder_shapes",
    "vit_target_shapes", "vit_canonical_shapes", "detect_layout", "unwrap_checkpoint",
    "from_localmim", "from_mae", "from_timm", "to_timm", "mae_encoder_part", "timm_kwargs", "identity_branch_norms",
    "convert_state", "infer_vit_spec", "fixed_hog_kernels",
]

LAYOUTS = ("localmim", "localmim-encoder", "mae", "mae-encoder", "timm-vit")
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
    "timm-vit". Returns (new_state, notes): notes are one-line remarks such as the newly
    initialised keys. Raises StateError naming keys when the source cannot fill the destination.
    """
    for name, role in ((src_layout, "source"), (dst_layout, "destination")):
        if name not in LAYOUTS:
            raise StateError(f"unknown {role} layout {name!r}; known layouts: {', '.join(LAYOUTS)}")
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
