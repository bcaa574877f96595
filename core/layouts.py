"""Checkpoint layouts: the key names of each codebase, detection, unwrapping and spec inference.

ViT layouts (`detect_layout`):

- "localmim": this package or the official LocalMIM ViT `.pth` (docs/method.md#checkpoint-layouts):
  identical names, with the branch norms `norm.{k}` and the decoders `decoder.{k}.*` (and
  `hog_enc.{k}.*` for HOG targets).
- "localmim-encoder": our encoder only (patch embed, blocks, branch norms).
- "mae": a full MAE checkpoint (encoder + `decoder_*` + top-level `mask_token`).
- "mae-encoder": an MAE encoder (`norm.*` is the single final norm).
- "timm-vit": a timm VisionTransformer (MAE encoder names plus `head.*` / `fc_norm.*`).

Swin layouts (`SWIN_LAYOUTS`, docs/method.md#swin-variant):

- "localmim-swin": this package (encoder.*, decoder.{k}.*, hog_enc.{k}.*); PatchMerging input
  order TL, BL, TR, BR (Swin's, defect D2 fixed). An encoder-only file (no decoder.*) reads too.
- "official-localmim-swin": the official LocalMIM Swin .pth: the same names plus the
  `encoder.layers.{s}.blocks.{b}.attn.relative_position_index` buffers, merge order TL, TR, BL, BR.
  Key names alone cannot tell it from ours once those buffers are gone, so a file is taken as
  official only when it has relative_position_index keys or when the caller says so (--from).
- "swin-encoder": a standard (official / SimMIM) Swin encoder for fine-tuning: the `encoder.`
  prefix stripped, `layers.{s}.downsample.*` at the end of stage s, merge weights in the standard
  order, `norm.*` = our last branch norm (the other branch norms are dropped); no
  relative_position_index (standard Swins rebuild it; the official fine-tune loads strict=False).
- "timm-swin": timm's SwinTransformer (timm >= 0.9): like "swin-encoder" but the merging of
  stage s sits at the start of the next stage, `layers.{s+1}.downsample.*`; loads strictly into
  `timm.create_model(**core.keymaps.timm_swin_kwargs(spec))`.

`detect_family` tells ViT from Swin keys. The `*_KEY` patterns (compiled regexes on key names)
define the layouts and are shared with core.keymaps, which maps states between them.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from localmim.core.specs import SWIN_SPECS, SpecError, TargetSpec, ViTSpec, VIT_SPECS
from localmim.core.state import StateError, format_key_list, shape_tuple

__all__ = [
    "LAYOUTS", "SWIN_LAYOUTS", "detect_family", "detect_layout", "unwrap_checkpoint",
    "infer_vit_spec", "infer_swin_spec",
    "VIT_ENCODER_KEY", "BRANCH_NORM_KEY", "FINAL_NORM_KEY", "MAE_DECODER_KEY", "TIMM_HEAD_KEY",
    "REL_INDEX_KEY", "SWIN_ENCODER_KEY", "TIMM_DOWNSAMPLE_KEY",
]

SWIN_LAYOUTS = ("localmim-swin", "official-localmim-swin", "swin-encoder", "timm-swin")
LAYOUTS = ("localmim", "localmim-encoder", "mae", "mae-encoder", "timm-vit") + SWIN_LAYOUTS


# ----------------------------------------------------------------------------------------------
# key-name patterns (the public ones are shared with core.keymaps)

VIT_ENCODER_KEY = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|blocks\.\d+\..+)$")
BRANCH_NORM_KEY = re.compile(r"^norm\.\d+\.(weight|bias)$")
_LOCALMIM_HEAD_KEY = re.compile(r"^(decoder\.\d+\..+|hog_enc\.\d+\.conv\.(weight|bias))$")
FINAL_NORM_KEY = re.compile(r"^norm\.(weight|bias)$")
MAE_DECODER_KEY = re.compile(r"^(mask_token|decoder_(embed|pos_embed|blocks|norm|pred)(\..+)?)$")
TIMM_HEAD_KEY = re.compile(r"^(head|fc_norm)\.(weight|bias)$")
REL_INDEX_KEY = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index$")
_SWIN_CANONICAL_KEY = re.compile(r"^(encoder\.(patch_embed|layers|norm)\..+|decoder\.\d+\..+|hog_enc\.\d+\.conv\.(weight|bias))$")
SWIN_ENCODER_KEY = re.compile(r"^(patch_embed\.(proj|norm)\.(weight|bias)|layers\.\d+\..+|norm\.(weight|bias))$")
_SWIN_STAGE_KEY = re.compile(r"^(encoder\.)?layers\.\d+\.(blocks|downsample)\.")
TIMM_DOWNSAMPLE_KEY = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")

_LAYOUT_PATTERNS = {
    "localmim": (VIT_ENCODER_KEY, BRANCH_NORM_KEY, _LOCALMIM_HEAD_KEY),
    "localmim-encoder": (VIT_ENCODER_KEY, BRANCH_NORM_KEY),
    "mae": (VIT_ENCODER_KEY, FINAL_NORM_KEY, MAE_DECODER_KEY),
    "mae-encoder": (VIT_ENCODER_KEY, FINAL_NORM_KEY),
    "timm-vit": (VIT_ENCODER_KEY, FINAL_NORM_KEY, TIMM_HEAD_KEY),
}


# ----------------------------------------------------------------------------------------------
# detection and unwrapping


def detect_family(keys: Iterable[str]) -> str:
    """"swin" when any key is a Swin stage key (`[encoder.]layers.{s}.blocks|downsample.*`), else "vit"."""
    return "swin" if any(_SWIN_STAGE_KEY.match(k) for k in keys) else "vit"


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
    if not any(VIT_ENCODER_KEY.match(k) for k in keys):
        raise StateError(
            f"unknown checkpoint layout: none of its {len(keys)} key(s) is a ViT encoder key "
            f"(cls_token, pos_embed, patch_embed.proj.*, blocks.*); keys: {format_key_list(sorted(keys))}.")
    if any(BRANCH_NORM_KEY.match(k) for k in keys):
        layout = "localmim" if any(_LOCALMIM_HEAD_KEY.match(k) for k in keys) else "localmim-encoder"
    elif any(MAE_DECODER_KEY.match(k) for k in keys):
        layout = "mae"
    elif any(TIMM_HEAD_KEY.match(k) for k in keys):
        layout = "timm-vit"
    else:
        layout = "mae-encoder"
    bad = _unmatched(keys, layout)
    if bad:
        raise StateError(
            f"unknown checkpoint layout: it looks like {layout!r} but {len(bad)} key(s) match no known "
            f"layout: {format_key_list(bad)}.")
    return layout


def _detect_swin_layout(keys: List[str]) -> str:
    """One of SWIN_LAYOUTS from the key names (see the module docstring)."""
    if any(k.startswith("encoder.") for k in keys):
        layout = "official-localmim-swin" if any(REL_INDEX_KEY.match(k) for k in keys) else "localmim-swin"
        bad = sorted(k for k in keys if not (_SWIN_CANONICAL_KEY.match(k) or REL_INDEX_KEY.match(k)))
    else:
        downs = {int(k.split(".")[1]) for k in keys if TIMM_DOWNSAMPLE_KEY.match(k)}
        layout = "swin-encoder" if 0 in downs or not downs else "timm-swin"
        extra = re.compile(r"^(head\..+|layers\.\d+\.blocks\.\d+\.attn(\.relative_position_index|_mask))$")
        bad = sorted(k for k in keys if not (SWIN_ENCODER_KEY.match(k) or (layout == "timm-swin" and extra.match(k))))
    if bad:
        raise StateError(f"unknown checkpoint layout: it looks like {layout!r} but {len(bad)} key(s) match no "
                         f"known Swin layout: {format_key_list(bad)}.")
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
# spec inference


def _first_shape(state, name, what):
    if name not in state:
        raise StateError(f"{what} has no {name!r}; cannot infer the model size")
    return shape_tuple(state[name])


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
    out = shape_tuple(state[last])[0]
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
    taps = len({k.split(".")[1] for k in state if BRANCH_NORM_KEY.match(k)})
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
        dd = shape_tuple(state["decoder.0.embed.weight"])[0]
        if dd != base.decoder_dim:
            changes["decoder_dim"] = dd
    spec = base.with_(**changes) if changes else base
    target = _infer_target(state, spec)
    if target is not None and target != spec.target:
        changes["target"] = target
        spec = spec.with_(target=target)
    notes = [f"model {base.name}" + (f" with {', '.join(f'{k}={v}' for k, v in changes.items())}" if changes else "")]
    return spec, notes


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
            heads_d[s] = shape_tuple(v)[1]
            if s == 0:
                table0 = shape_tuple(v)
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
        g0 = int(round(shape_tuple(state["decoder.0.pos_embed"])[1] ** 0.5))
        img = g0 * base.patch_size * 2
        if img != base.img_size:
            changes["img_size"] = img
    dec_dims = []
    for k in range(base.num_stages):
        key = f"decoder.{k}.embed.weight"
        if key in state:
            dec_dims.append(shape_tuple(state[key])[0])
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
        out = shape_tuple(state["decoder.0.pred.weight"])[0]
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
        if shape_tuple(state[key])[0] != want:
            raise StateError(f"{what}: {key} has {shape_tuple(state[key])[0]} rows but {spec.name} at img_size "
                             f"{spec.img_size} needs {want} (window {spec.stage_window(s)} at stage {s})")
    notes = [f"model {base.name}" + (f" with {', '.join(f'{k}={v}' for k, v in changes.items())}" if changes else "")]
    return spec, notes
