"""Checkpoint layouts: the key names of each codebase, detection, unwrapping and spec inference.

The layouts (`LAYOUTS`, described one by one in `LAYOUT_INFO`, docs/method.md#checkpoint-layouts),
symmetric for the two families:

| ViT | Swin | what |
|---|---|---|
| localmim-vit | localmim-swin | this package: canonical names (core.state), full model |
| localmim-vit-encoder | localmim-swin-encoder | this package, encoder and branch norms only |
| official-localmim-vit | official-localmim-swin | the official LocalMIM pretraining release |
| mae, mae-encoder | swin-encoder | the family's own codebase (MAE; Microsoft Swin / SimMIM) |
| timm-vit | timm-swin | timm's VisionTransformer / SwinTransformer |

- The official LocalMIM ViT names are exactly ours; a PyTorch file with an `args`
  argparse.Namespace beside them (the official release has one, ours never) is reported as
  "official-localmim-vit".
- "localmim-swin" has Swin's PatchMerging input order TL, BL, TR, BR (defect D2 fixed);
  `relative_position_index` buffers are accepted (checked against the window, then dropped)
  whatever their presence. "official-localmim-swin" has those buffers and the pretraining merge
  order TL, TR, BL, BR. Key names alone cannot tell the merge order: a file with the buffers is
  detected as official; a file in Swin order with buffers is read with `--from localmim-swin`.
- "mae": encoder + MAE decoder (`decoder_*`, top-level `mask_token`); "mae-encoder" and
  "timm-vit" have one final `norm.*` after the last block (timm adds `head.*` / `fc_norm.*`).
- "swin-encoder": a standard Swin encoder (`encoder.` stripped, `layers.{s}.downsample.*` at the
  end of stage s, `norm.*` = our last branch norm); "timm-swin": the same with the merging of stage
  s at the start of the next stage (`layers.{s+1}.downsample.*`, timm >= 0.9).

`detect_family` tells ViT from Swin keys, `detect_layout` / `resolve_layout` name the layout,
`infer_spec` (`infer_vit_spec`, `infer_swin_spec`) the architecture: from the shapes, with
what they cannot tell (attention heads, taps, ...) taken from arch options. The `*_KEY` patterns
(compiled regexes on key names) define the layouts and are shared with core.keymaps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from localmim.core.specs import (
    SWIN_SPECS, VIT_SCALES, VIT_SPECS, SpecError, SwinSpec, ViTSpec, default_taps, spec_from_arch,
    spec_to_arch)
from localmim.core.state import StateError, format_key_list, shape_tuple

__all__ = [
    "LayoutInfo", "LAYOUT_INFO", "LAYOUTS", "VIT_LAYOUTS", "SWIN_LAYOUTS", "FULL_LAYOUTS", "FORMATS",
    "RENAMED_LAYOUTS", "check_layout_name", "layout_table",
    "detect_family", "detect_layout", "resolve_layout", "unwrap_checkpoint",
    "infer_spec", "infer_vit_spec", "infer_swin_spec", "arch_option_hint",
    "VIT_ENCODER_KEY", "BRANCH_NORM_KEY", "FINAL_NORM_KEY", "MAE_DECODER_KEY", "TIMM_HEAD_KEY",
    "REL_INDEX_KEY", "SWIN_ENCODER_KEY", "TIMM_DOWNSAMPLE_KEY",
]

FORMATS = ("pth", "ckpt", "safetensors")  # PyTorch, MindSpore, safetensors files


@dataclass(frozen=True)
class LayoutInfo:
    """One checkpoint layout: its family ("vit" / "swin"), whether it holds the full pretraining
    model ("full") or an encoder ("encoder"), the formats it is written in and a description."""
    name: str
    family: str
    parts: str
    writes: Tuple[str, ...]
    description: str


_OURS = FORMATS
_TORCH_WORLD = ("pth", "safetensors")  # the other codebases are PyTorch ones
LAYOUT_INFO: Dict[str, LayoutInfo] = {i.name: i for i in (
    LayoutInfo("localmim-vit", "vit", "full", _OURS,
               "this package's ViT: canonical names, encoder + 4 decoders + HOG convs"),
    LayoutInfo("localmim-vit-encoder", "vit", "encoder", _OURS,
               "this package's ViT encoder with its branch norms norm.{k}"),
    LayoutInfo("official-localmim-vit", "vit", "full", _TORCH_WORLD,
               "the official LocalMIM ViT release: our names, under 'model' beside an args Namespace"),
    LayoutInfo("mae", "vit", "full", _TORCH_WORLD,
               "MAE pretraining: encoder, final norm, decoder_* and mask_token"),
    LayoutInfo("mae-encoder", "vit", "encoder", _TORCH_WORLD,
               "MAE / fine-tuning ViT encoder: one final norm after the last block"),
    LayoutInfo("timm-vit", "vit", "encoder", _TORCH_WORLD,
               "timm VisionTransformer (num_classes=0); reads head.* / fc_norm.* and drops them"),
    LayoutInfo("localmim-swin", "swin", "full", _OURS,
               "this package's Swin: encoder.*, decoder.{k}.*, merges TL,BL,TR,BR; reads "
               "relative_position_index buffers or none"),
    LayoutInfo("localmim-swin-encoder", "swin", "encoder", _OURS,
               "this package's Swin encoder.* with its branch norms encoder.norm.{k}"),
    LayoutInfo("official-localmim-swin", "swin", "full", _TORCH_WORLD,
               "the official LocalMIM Swin release: merges TL,TR,BL,BR, relative_position_index buffers"),
    LayoutInfo("swin-encoder", "swin", "encoder", _TORCH_WORLD,
               "a standard Swin encoder (Microsoft Swin / SimMIM names), final norm.*"),
    LayoutInfo("timm-swin", "swin", "encoder", _TORCH_WORLD,
               "timm SwinTransformer (num_classes=0): merging at the start of the next stage"),
)}
LAYOUTS = tuple(LAYOUT_INFO)
VIT_LAYOUTS = tuple(n for n, i in LAYOUT_INFO.items() if i.family == "vit")
SWIN_LAYOUTS = tuple(n for n, i in LAYOUT_INFO.items() if i.family == "swin")
FULL_LAYOUTS = tuple(n for n, i in LAYOUT_INFO.items() if i.parts == "full")
# Names of earlier versions; not read (files are detected from their keys), only named in errors.
RENAMED_LAYOUTS = {"localmim": "localmim-vit", "localmim-encoder": "localmim-vit-encoder"}


def check_layout_name(name: str, role: str = "layout") -> str:
    """`name` when it is one of LAYOUTS, else StateError listing them (and the new name of a renamed one)."""
    if name in LAYOUT_INFO:
        return name
    renamed = f" ({name!r} is now {RENAMED_LAYOUTS[name]!r})" if name in RENAMED_LAYOUTS else ""
    raise StateError(f"unknown {role} {name!r}{renamed}; known layouts: {', '.join(LAYOUTS)}")


def layout_table() -> str:
    """The layouts as a text table: name, family, read formats, write formats, description."""
    rows = [("layout", "family", "reads", "writes", "what")]
    for info in LAYOUT_INFO.values():
        rows.append((info.name, info.family, ",".join(FORMATS), ",".join(info.writes), info.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows)


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
SWIN_ENCODER_KEY = re.compile(r"^(patch_embed\.(proj|norm)\.(weight|bias)|layers\.\d+\..+|norm\.(weight|bias)|head\.(weight|bias))$")
_SWIN_STAGE_KEY = re.compile(r"^(encoder\.)?layers\.\d+\.(blocks|downsample)\.")
TIMM_DOWNSAMPLE_KEY = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")

_LOCALMIM_VIT = (VIT_ENCODER_KEY, BRANCH_NORM_KEY, _LOCALMIM_HEAD_KEY)
_MAE_VIT = (VIT_ENCODER_KEY, FINAL_NORM_KEY, MAE_DECODER_KEY, TIMM_HEAD_KEY)
_LOCALMIM_SWIN = (_SWIN_CANONICAL_KEY, REL_INDEX_KEY)
_LAYOUT_PATTERNS = {
    "localmim-vit": _LOCALMIM_VIT, "localmim-vit-encoder": _LOCALMIM_VIT, "official-localmim-vit": _LOCALMIM_VIT,
    "mae": _MAE_VIT, "mae-encoder": _MAE_VIT, "timm-vit": _MAE_VIT,
    "localmim-swin": _LOCALMIM_SWIN, "localmim-swin-encoder": _LOCALMIM_SWIN, "official-localmim-swin": _LOCALMIM_SWIN,
    "swin-encoder": (SWIN_ENCODER_KEY,), "timm-swin": (SWIN_ENCODER_KEY,),
}


# ----------------------------------------------------------------------------------------------
# detection and unwrapping


def detect_family(keys: Iterable[str]) -> str:
    """"swin" when any key is a Swin stage key (`[encoder.]layers.{s}.blocks|downsample.*`), else "vit"."""
    return "swin" if any(_SWIN_STAGE_KEY.match(k) for k in keys) else "vit"


def _unmatched(keys: Iterable[str], layout: str) -> List[str]:
    pats = _LAYOUT_PATTERNS[layout]
    return sorted(k for k in keys if not any(p.match(k) for p in pats))


def detect_layout(keys: Iterable[str], official: bool = False) -> str:
    """Name the layout of a state dict from its keys (see the module docstring).

    official: the file had an `args` argparse.Namespace (official LocalMIM / MAE releases), which
    turns "localmim-vit" into "official-localmim-vit". MAE encoders and timm ViTs share names;
    "timm-vit" is returned when a `head.*` or `fc_norm.*` key is present, "mae-encoder" otherwise.
    Raises StateError naming the keys that fit no layout.
    """
    keys = list(keys)
    if detect_family(keys) == "swin":
        return _detect_swin_layout(keys)
    if not any(VIT_ENCODER_KEY.match(k) for k in keys):
        raise StateError(
            f"unknown checkpoint layout: none of its {len(keys)} key(s) is a ViT encoder key "
            f"(cls_token, pos_embed, patch_embed.proj.*, blocks.*); keys: {format_key_list(sorted(keys))}.")
    if any(BRANCH_NORM_KEY.match(k) for k in keys):
        full = any(_LOCALMIM_HEAD_KEY.match(k) for k in keys)
        layout = ("official-localmim-vit" if official else "localmim-vit") if full else "localmim-vit-encoder"
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
        if any(REL_INDEX_KEY.match(k) for k in keys):
            layout = "official-localmim-swin"
        else:
            layout = "localmim-swin" if any(k.startswith("decoder.") for k in keys) else "localmim-swin-encoder"
    else:
        downs = {int(k.split(".")[1]) for k in keys if TIMM_DOWNSAMPLE_KEY.match(k)}
        layout = "swin-encoder" if 0 in downs or not downs else "timm-swin"
    bad = _unmatched(keys, layout)
    if bad:
        raise StateError(f"unknown checkpoint layout: it looks like {layout!r} but {len(bad)} key(s) match no "
                         f"known Swin layout: {format_key_list(bad)}.")
    return layout


def resolve_layout(keys: Iterable[str], given: Optional[str] = None, recorded: Optional[str] = None,
                   official: bool = False, what: str = "checkpoint") -> Tuple[str, str]:
    """The layout to read a state as -> (layout, how): `given` (the caller's --from / layout=)
    first, then `recorded` (the layout this package wrote into the file) when it is a known name
    whose family and key names fit, else detection from the keys ("given", "recorded" or
    "detected"). Raises StateError when `given` is unknown or does not fit the keys' family."""
    keys = list(keys)
    family = detect_family(keys)
    if given is not None:
        info = LAYOUT_INFO[check_layout_name(given, "source layout")]
        if info.family != family:
            raise StateError(f"{what}: layout {given} does not fit its keys, which are "
                             f"{'Swin' if family == 'swin' else 'ViT'} keys")
        return given, "given"
    if recorded in LAYOUT_INFO and LAYOUT_INFO[recorded].family == family and not _unmatched(keys, recorded):
        return recorded, "recorded"
    return detect_layout(keys, official=official), "detected"


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
# architecture inference: the shapes tell most of it, arch options the rest
#
# `arch` (a dict of core.specs.ARCH_KEYS values) merges the architecture recorded in the file with
# the caller's options (--arch key=value, load_pretrained(**arch)), the caller's taking precedence.
# What the shapes tell is taken from them, and an arch value that contradicts it is an error; the
# rest comes from `arch`, else from the registered model whose shapes match, else from a default
# where one is safe (the reference taps rule, the reference decoders of an encoder-only file).


def arch_option_hint(key: str, example: str = "N") -> str:
    """How to pass arch value `key`: "--arch key=N (load_pretrained(..., key=N))"."""
    return f"--arch {key}={example} (load_pretrained(..., {key}={example}))"


def _first_shape(state, name, what):
    if name not in state:
        raise StateError(f"{what} has no {name!r}; cannot infer the model size")
    return shape_tuple(state[name])


def _same(a, b) -> bool:
    """Equality of arch values across JSON / YAML / tuple spellings (lists and tuples, 4 and 4.0)."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _indices(state, pattern: str) -> List[int]:
    """Sorted distinct integers captured by `pattern`'s first group over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def _mlp_ratio(state, key: str, dim: int) -> Optional[float]:
    return shape_tuple(state[key])[0] / dim if key in state else None


def _target_facts(outs: List[int], cells: List[int], has_hog: bool, has_bias: bool, where: str) -> Dict[str, object]:
    """Target kind / nbins / hog_bias from the decoders' output widths `outs` for target cells
    `cells`: pixels when every width is 3 * cell^2 and no HOG conv is present, else HOG with
    nbins = width / 3 (the same for every branch)."""
    if not has_hog and all(o == 3 * c * c for o, c in zip(outs, cells)):
        return {"target": "pixel"}
    if len(set(outs)) != 1 or outs[0] % 3:
        raise StateError(f"{where}: decoder output widths {outs} are neither 3 x cell^2 pixels (cells {cells}) "
                         f"nor one 3 x nbins HOG width")
    return {"target": "hog", "nbins": outs[0] // 3, "hog_bias": has_bias}


_VIT_PRED_SCALES = {(0, 1, 3, 4): 4.0, (0, 1): 2.0, (0,): 1.0, (1,): 0.5}  # pred indices with weights -> scale
_VIT_PRED_OUT = {4.0: 4, 2.0: 1, 1.0: 0, 0.5: 1}  # the index of the last (output) conv


def _vit_facts(state: Mapping[str, object], what: str) -> Tuple[Dict[str, object], Optional[int], bool]:
    """What a ViT state's shapes tell -> (facts {arch key: value}, branch count or None, has decoders).

    patch_size / embed_dim (patch_embed.proj.weight (D, 3, p, p)), depth (block count), img_size
    (pos_embed (1, 1+g^2, D): g * p), mlp_ratio (blocks.0.mlp.fc1 (hidden, D)); with decoders:
    decoder_dim / decoder_depth (decoder.0), scales (which pred.{i} carry weights), target (output
    widths, hog_enc convs and their biases). The branch count comes from norm.{k} or decoder.{k}.
    """
    w = _first_shape(state, "patch_embed.proj.weight", what)
    if len(w) != 4 or w[1] != 3 or w[2] != w[3]:
        raise StateError(f"{what}: patch_embed.proj.weight has shape {w}; expected (D, 3, p, p)")
    dim, patch = w[0], w[2]
    pos = _first_shape(state, "pos_embed", what)
    grid = int(round(max(pos[1] - 1, 0) ** 0.5)) if len(pos) == 3 else 0
    if len(pos) != 3 or grid * grid != pos[1] - 1 or grid == 0 or pos[2] != dim:
        raise StateError(f"{what}: pos_embed has shape {pos}; expected (1, 1 + g*g, {dim})")
    blocks = _indices(state, r"^blocks\.(\d+)\.")
    facts: Dict[str, object] = {"patch_size": patch, "embed_dim": dim, "depth": (blocks[-1] + 1) if blocks else 0,
                                "img_size": grid * patch}
    ratio = _mlp_ratio(state, "blocks.0.mlp.fc1.weight", dim)
    if ratio is not None:
        facts["mlp_ratio"] = ratio
    decoders = _indices(state, r"^decoder\.(\d+)\.")
    norms = _indices(state, r"^norm\.(\d+)\.")
    count = len(decoders) or len(norms) or None
    if not decoders:
        return facts, count, False
    if decoders != list(range(len(decoders))):
        raise StateError(f"{what}: decoder indices {decoders} are not 0..{len(decoders) - 1}")
    facts["decoder_dim"] = _first_shape(state, "decoder.0.embed.weight", what)[0]
    facts["decoder_depth"] = len(_indices(state, r"^decoder\.0\.blocks\.(\d+)\."))
    scales, outs = [], []
    for k in decoders:
        heads = tuple(_indices(state, rf"^decoder\.{k}\.pred\.(\d+)\.weight$"))
        if heads not in _VIT_PRED_SCALES:
            raise StateError(f"{what}: decoder.{k}.pred has weights at indices {list(heads)}, which is no "
                             f"rescaling head (scale 4: 0,1,3,4; 2: 0,1; 1: 0; 0.5: 1)")
        scale = _VIT_PRED_SCALES[heads]
        scales.append(scale)
        outs.append(_first_shape(state, f"decoder.{k}.pred.{_VIT_PRED_OUT[scale]}.weight", what)[0])
    facts["scales"] = tuple(scales)
    cells = [patch / s for s in scales]
    if any(c != int(c) for c in cells):
        raise StateError(f"{what}: scales {scales} with patch {patch} give non-integer target cells")
    has_hog = any(k.startswith("hog_enc.") for k in state)
    has_bias = any(k.startswith("hog_enc.") and k.endswith(".conv.bias") for k in state)
    facts.update(_target_facts(outs, [int(c) for c in cells], has_hog, has_bias, what))
    ratio = _mlp_ratio(state, "decoder.0.blocks.0.mlp.fc1.weight", facts["decoder_dim"])
    if ratio is not None and ratio != facts.get("mlp_ratio", ratio):
        raise StateError(f"{what}: decoder mlp ratio {ratio} differs from the encoder's {facts['mlp_ratio']}; "
                         f"LocalMIM decoders use the encoder's")
    return facts, count, True


def _contradictions(facts: Mapping[str, object], arch: Mapping[str, object], what: str) -> None:
    bad = [f"{k}={arch[k]!r} (the shapes say {facts[k]!r})" for k in facts if k in arch and not _same(arch[k], facts[k])]
    if bad:
        hint = ("; resample with --img-size (load_pretrained(..., img_size=N) resamples by itself)"
                if any(b.startswith("img_size=") for b in bad) else "")
        raise StateError(f"{what}: the architecture options contradict its shapes: {', '.join(bad)}{hint}")


def _describe(base, arch: Mapping[str, object], fields: Mapping[str, object], from_file: bool) -> str:
    """The one-line note: registered base and what differs from it, or the unregistered origin."""
    if base is not None:
        ref = spec_to_arch(base)
        changed = [f"{k}={_short(fields[k])}" for k in ref if k in fields and not _same(fields[k], ref[k])]
        return f"model {base.name}" + (f" with {', '.join(changed)}" if changed else "")
    origin = "the architecture recorded in the file" if from_file else "the shapes and the arch options"
    given = [k for k in arch if k not in ("family", "name")]
    return (f"model {fields['name']} (not registered; from {origin}"
            + (f": {', '.join(f'{k}={_short(arch[k])}' for k in given)}" if given and not from_file else "") + ")")


def _short(v) -> str:
    return str(tuple(v)) if isinstance(v, list) else str(v)


def _missing(keys: List[str], what: str, geometry: str) -> StateError:
    examples = {"taps": "[1,3,5,7]", "scales": "[4,2,1,0.5]", "decoder_dims": "[64,128,128,128]"}
    opts = " and ".join(arch_option_hint(k, examples.get(k, "N")) for k in keys)
    return StateError(f"{what} fits no registered model ({geometry}) and its shapes cannot tell "
                      f"{', '.join(keys)}: pass {opts}")


def _build(fields: Dict[str, object], what: str):
    try:
        return spec_from_arch(fields)
    except SpecError as exc:
        raise StateError(f"{what}: its architecture does not build: {exc}") from None


def infer_vit_spec(state: Mapping[str, object], layout: str = "localmim-vit", what: str = "checkpoint",
                   name: Optional[str] = None, arch: Optional[Mapping[str, object]] = None,
                   from_file: bool = False) -> Tuple[ViTSpec, List[str]]:
    """The ViTSpec of a ViT state (any ViT layout: the encoder names are shared) -> (spec, notes).

    Read from the shapes (see `_vit_facts`): patch_size, embed_dim, depth, img_size, mlp_ratio and,
    with decoders, decoder_dim, decoder_depth, scales and the target (HOG nbins and bias, or
    pixels). Not in the shapes: num_heads and decoder_heads (required unless a registered model of
    the same patch, width, depth, mlp ratio and branch count supplies them; decoder_heads only with
    decoders), taps (default: the reference rule [1, 3, depth-3, depth-1]), norm_pix. `name` (the
    --model option) picks the registered model; `arch` (core.specs.ARCH_KEYS values; `from_file`:
    they were recorded in the file) fills and overrides what the shapes do not tell. Raises
    StateError naming the shapes and the missing arch option.
    """
    arch = dict(arch or {})
    facts, count, has_dec = _vit_facts(state, what)
    _contradictions(facts, arch, what)
    patch, dim, depth = facts["patch_size"], facts["embed_dim"], facts["depth"]
    geometry = (f"patch_embed.proj.weight {_first_shape(state, 'patch_embed.proj.weight', what)} (patch {patch}, "
                f"width {dim}), {depth} blocks, pos_embed {_first_shape(state, 'pos_embed', what)}")
    name = name or (arch.get("name") if arch.get("name") in VIT_SPECS else None)
    if name is not None:
        named = VIT_SPECS.get(name)
        if named is None:
            raise StateError(f"unknown ViT model {name!r}; known: {', '.join(sorted(VIT_SPECS))}")
        if (named.patch_size, named.embed_dim, named.depth) != (patch, dim, depth):
            raise StateError(
                f"{what} holds a different model than {name}: patch {patch}, width {dim}, {depth} blocks "
                f"({geometry}) but {name} has patch {named.patch_size}, width {named.embed_dim}, {named.depth} blocks.")
        if count is not None and len(named.taps) != count:
            raise StateError(f"{what} has {count} branches but {name} has {len(named.taps)} taps.")
        base = named
    else:
        pool = [s for s in VIT_SPECS.values() if (s.patch_size, s.embed_dim, s.depth) == (patch, dim, depth)
                and _same(s.mlp_ratio, facts.get("mlp_ratio", s.mlp_ratio)) and count in (None, len(s.taps))]
        base = pool[0] if pool and not from_file else None
    fields: Dict[str, object] = spec_to_arch(base) if base is not None else {"family": "vit"}
    if not has_dec and base is None:  # an encoder file: the reference decoders, unless arch says otherwise
        fields.update({"decoder_dim": 256, "decoder_depth": 1, "decoder_heads": 8})
    fields.update(arch)
    fields.update(facts)
    fields["family"] = "vit"
    missing = [k for k in ("num_heads", "decoder_heads") if k not in fields]
    branches = count or len(fields.get("scales", VIT_SCALES))
    if "scales" not in fields:
        if branches == len(VIT_SCALES):
            fields["scales"] = VIT_SCALES
        else:
            missing.append("scales")
    needs_taps = "taps" not in arch and ("taps" not in fields or len(fields["taps"]) != branches)
    if needs_taps:
        if branches == 4 and depth >= 4 and len(set(default_taps(depth))) == 4:
            fields["taps"] = default_taps(depth)  # the reference rule
        else:
            missing.append("taps")
    if missing:
        raise _missing(missing, what, geometry)
    fields.setdefault("name", f"vit_p{patch}_d{dim}_depth{depth}")
    spec = _build(fields, what)
    return spec, [_describe(base, arch, spec_to_arch(spec), from_file)]


def _swin_facts(state: Mapping[str, object], what: str) -> Tuple[Dict[str, object], Tuple[int, ...], bool]:
    """What a canonical-named Swin state's shapes tell -> (facts, stage windows, has decoders).

    patch_size / embed_dim (encoder.patch_embed.proj.weight), depths (block counts), num_heads
    (relative tables' second dim), the stage windows (table rows (2w-1)^2; window_size = the
    largest), mlp_ratio; img_size from decoder.0.pos_embed (branch 0's grid g0: 2 * patch * g0) or
    from the first stage whose window is smaller than window_size (its resolution); with decoders
    also decoder_dims, decoder_depth and the target.
    """
    w = _first_shape(state, "encoder.patch_embed.proj.weight", what)
    if len(w) != 4 or w[1] != 3 or w[2] != w[3]:
        raise StateError(f"{what}: encoder.patch_embed.proj.weight has shape {w}; expected (C, 3, p, p)")
    dim, patch = w[0], w[2]
    depths_d: Dict[int, int] = {}
    heads_d: Dict[int, int] = {}
    windows_d: Dict[int, int] = {}
    for k, v in state.items():
        m = re.match(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depths_d[s] = max(depths_d.get(s, 0), b + 1)
            rows, heads_d[s] = shape_tuple(v)
            side = int(round(rows ** 0.5))
            if side * side != rows or side % 2 == 0:
                raise StateError(f"{what}: {k} has {rows} rows, not (2w-1)^2 for a window w")
            windows_d[s] = (side + 1) // 2
    if not depths_d or sorted(depths_d) != list(range(len(depths_d))):
        raise StateError(f"{what}: no consecutive encoder.layers.{{s}}.blocks.{{b}}.attn.relative_position_bias_table "
                         f"keys; cannot infer the Swin size")
    stages = range(len(depths_d))
    windows = tuple(windows_d[s] for s in stages)
    facts: Dict[str, object] = {"patch_size": patch, "embed_dim": dim, "depths": tuple(depths_d[s] for s in stages),
                                "num_heads": tuple(heads_d[s] for s in stages), "window_size": max(windows)}
    ratio = _mlp_ratio(state, "encoder.layers.0.blocks.0.mlp.fc1.weight", dim)
    if ratio is not None:
        facts["mlp_ratio"] = ratio
    smaller = [s for s in stages if windows[s] < max(windows)]
    if smaller:
        facts["img_size"] = windows[smaller[0]] * patch * 2 ** smaller[0]
    decoders = _indices(state, r"^decoder\.(\d+)\.")
    if not decoders:
        return facts, windows, False
    g0 = int(round(_first_shape(state, "decoder.0.pos_embed", what)[1] ** 0.5))
    img = g0 * patch * 2
    if facts.get("img_size", img) != img:
        raise StateError(f"{what}: decoder.0.pos_embed gives img_size {img} but the stage windows {windows} "
                         f"give {facts['img_size']}")
    facts["img_size"] = img
    facts["decoder_dims"] = tuple(_first_shape(state, f"decoder.{k}.embed.weight", what)[0] for k in decoders)
    facts["decoder_depth"] = len(_indices(state, r"^decoder\.0\.blocks\.(\d+)\."))
    outs, cells = [], []
    for k in decoders:
        outs.append(_first_shape(state, f"decoder.{k}.pred.weight", what)[0])
        g = int(round(_first_shape(state, f"decoder.{k}.pos_embed", what)[1] ** 0.5))
        cells.append(img // g)
    has_hog = any(k.startswith("hog_enc.") for k in state)
    has_bias = any(k.startswith("hog_enc.") and k.endswith(".conv.bias") for k in state)
    facts.update(_target_facts(outs, cells, has_hog, has_bias, what))
    return facts, windows, True


def infer_swin_spec(state: Mapping[str, object], layout: str = "localmim-swin", what: str = "checkpoint",
                    name: Optional[str] = None, arch: Optional[Mapping[str, object]] = None,
                    from_file: bool = False) -> Tuple[SwinSpec, List[str]]:
    """The SwinSpec of a Swin state -> (spec, notes); canonical, official, "swin-encoder" and
    "timm-swin" names.

    Read from the shapes (see `_swin_facts`): patch_size, embed_dim, depths, num_heads,
    window_size, mlp_ratio, img_size (with decoders, or when a stage's window is cut by its
    resolution) and, with decoders, decoder_dims, decoder_depth and the target. Not in the
    shapes: decoder_heads (required with decoders unless a registered model of the same encoder
    supplies it), img_size of an encoder file (else the registered model's, else 224), norm_pix.
    Every stage's table must fit the resulting spec's stage window. `name` / `arch` / `from_file`
    as for `infer_vit_spec`.
    """
    arch = dict(arch or {})
    if layout in ("swin-encoder", "timm-swin"):
        state = {"encoder." + k: v for k, v in state.items()}
    facts, windows, has_dec = _swin_facts(state, what)
    _contradictions(facts, arch, what)
    geometry = (f"patch {facts['patch_size']}, width {facts['embed_dim']}, depths {facts['depths']}, "
                f"heads {facts['num_heads']}, stage-0 window {windows[0]}")
    key = lambda s: (s.patch_size, s.embed_dim, s.depths, s.num_heads)  # noqa: E731
    mine = (facts["patch_size"], facts["embed_dim"], facts["depths"], facts["num_heads"])
    name = name or (arch.get("name") if arch.get("name") in SWIN_SPECS else None)
    if name is not None and name not in SWIN_SPECS:
        raise StateError(f"unknown Swin model {name!r}; known: {', '.join(sorted(SWIN_SPECS))}")
    pool = [SWIN_SPECS[name]] if name is not None else list(SWIN_SPECS.values())
    fits = [s for s in pool if key(s) == mine and s.stage_window(0) == windows[0]
            and _same(s.mlp_ratio, facts.get("mlp_ratio", s.mlp_ratio))]
    if name is not None and not fits:
        known = "; ".join(f"{s.name} (p{s.patch_size}, C{s.embed_dim}, {s.depths}, {s.num_heads}, w{s.window_size})"
                          for s in pool)
        raise StateError(f"{what} fits no registered Swin model: {geometry} (from encoder.patch_embed.proj.weight "
                         f"and the relative_position_bias_table shapes); candidates: {known}.")
    base = fits[0] if fits and not (from_file and name is None) else None
    fields: Dict[str, object] = spec_to_arch(base) if base is not None else {"family": "swin"}
    fields.update(arch)
    fields.update(facts)
    fields["family"] = "swin"
    n = len(facts["depths"])
    if "decoder_dims" not in fields and not has_dec:
        fields["decoder_dims"] = (64,) + (128,) * (n - 1)  # the reference decoder widths
    if "decoder_heads" not in fields:
        if has_dec:
            raise _missing(["decoder_heads"], what, geometry)
        fields["decoder_heads"] = 4
    img_given = "img_size" in fields
    fields.setdefault("img_size", 224)
    fields.setdefault("name", f"swin_p{facts['patch_size']}_c{facts['embed_dim']}_w{facts['window_size']}")
    spec = _build(fields, what)
    have = tuple(spec.stage_window(s) for s in range(spec.num_stages))
    if have != windows:
        hint = "" if img_given else f"; its img_size is not in the shapes: pass {arch_option_hint('img_size')}"
        raise StateError(f"{what}: its relative_position_bias_table shapes give stage windows {windows} but "
                         f"{spec.name} at img_size {spec.img_size} has {have}{hint}")
    return spec, [_describe(base, arch, spec_to_arch(spec), from_file)]


def infer_spec(state: Mapping[str, object], layout: str, what: str = "checkpoint", name: Optional[str] = None,
               arch: Optional[Mapping[str, object]] = None, from_file: bool = False):
    """`infer_vit_spec` or `infer_swin_spec` by the layout's family -> (spec, notes)."""
    family = LAYOUT_INFO[check_layout_name(layout, "source layout")].family
    fn = infer_swin_spec if family == "swin" else infer_vit_spec
    if arch and arch.get("family", family) != family:
        raise StateError(f"{what}: a {arch['family']} architecture was given for {family} weights")
    return fn(state, layout, what=what, name=name,
              arch={k: v for k, v in (arch or {}).items() if k != "family"}, from_file=from_file)
