"""Key maps between the checkpoint layouts of core.layouts and the canonical state of core.state.

ViT: `from_localmim`, `from_mae` / `from_timm` (MAE's final norm becomes the last branch norm),
`to_timm`; Swin: `from_official_swin` / `to_official_swin` (defect D2: the middle two C-blocks of
every patch merge's 4C axis swap), `to_swin_encoder` / `from_swin_encoder`, `to_timm_swin` /
`from_timm_swin`. `convert_state` maps a state of any layout to one of the layouts this package
writes (all but the MAE ones), refilling absent fixed Sobel kernels and initialising absent branch
norms where that is exact, and says what it did. Pure numpy, like core.state.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np

from localmim.core.layouts import (
    BRANCH_NORM_KEY, FINAL_NORM_KEY, LAYOUTS, MAE_DECODER_KEY, REL_INDEX_KEY, SWIN_ENCODER_KEY,
    SWIN_LAYOUTS, TIMM_DOWNSAMPLE_KEY, TIMM_HEAD_KEY, VIT_ENCODER_KEY)
from localmim.core.specs import ViTSpec
from localmim.core.state import (
    StateError, check_state, format_key_list, shape_tuple, swin_canonical_shapes, swin_encoder_shapes,
    vit_canonical_shapes, vit_encoder_shapes)

__all__ = [
    "from_localmim", "from_mae", "from_timm", "to_timm", "mae_encoder_part", "timm_kwargs",
    "identity_branch_norms", "fixed_hog_kernels", "convert_state",
    "swin_relative_position_index", "merge_official_to_ours", "merge_ours_to_official", "is_merge_key",
    "from_official_swin", "to_official_swin", "to_swin_encoder", "from_swin_encoder", "to_timm_swin",
    "from_timm_swin", "timm_swin_kwargs", "swin_to_canonical", "convert_swin_state",
]


def _check_subset(expected: Mapping[str, Tuple[int, ...]], state: Mapping[str, object], what: str):
    """Raise on unexpected or mis-shaped keys (missing keys are the caller's business)."""
    check_state({k: expected[k] for k in state if k in expected}, state, what)


def fixed_hog_kernels(spec: ViTSpec, missing: Iterable[str]) -> Dict[str, np.ndarray]:
    """The fixed Sobel weights (2,1,3,3) for the `hog_enc.{k}.conv.weight` keys among `missing`.

    Only the weights are deterministic; a missing HOG bias (random per run, docs/method.md#hog-bias)
    cannot be recreated.
    """
    from localmim.core.targets import sobel_kernel
    return {k: sobel_kernel() for k in missing if re.match(r"^hog_enc\.\d+\.conv\.weight$", k)}


# ----------------------------------------------------------------------------------------------
# ViT


def _last_norm(spec: ViTSpec) -> str:
    return f"norm.{len(spec.taps) - 1}"


def _require_last_tap_is_last_block(spec: ViTSpec, what: str) -> None:
    if spec.taps[-1] != spec.depth - 1:
        raise StateError(
            f"{what} needs the last branch to tap the last block: {spec.name} taps {list(spec.taps)} "
            f"with depth {spec.depth}")


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
        if VIT_ENCODER_KEY.match(name):
            out[name] = value
        elif FINAL_NORM_KEY.match(name):
            out[f"{_last_norm(spec)}.{name.split('.')[-1]}"] = value
        elif MAE_DECODER_KEY.match(name) or TIMM_HEAD_KEY.match(name):
            continue
        else:
            unknown.append(name)
    if unknown:
        raise StateError(f"{what} has {len(unknown)} key(s) that are not MAE/timm ViT keys: {format_key_list(sorted(unknown))}.")
    if "pos_embed" in out and shape_tuple(out["pos_embed"]) != enc["pos_embed"]:
        raise StateError(
            f"{what}: pos_embed has shape {shape_tuple(out['pos_embed'])} but {spec.name} at img_size "
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
    return {k: v for k, v in state.items() if not (MAE_DECODER_KEY.match(k) or TIMM_HEAD_KEY.match(k))}


def to_timm(state: Mapping[str, np.ndarray], spec: ViTSpec,
            what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Canonical state -> timm `vit_*` state dict for `timm.create_model(..., num_classes=0)`.

    Keeps cls_token, pos_embed, patch_embed.proj.*, blocks.*; `norm.*` is the last branch norm, so
    timm's forward_features (all blocks, then norm) equals our encoder's last tap on unmasked input.
    """
    _require_last_tap_is_last_block(spec, "timm export")
    enc = vit_encoder_shapes(spec)
    last = _last_norm(spec)
    needed = {k: enc[k] for k in enc if not BRANCH_NORM_KEY.match(k) or k.startswith(last + ".")}
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
        if BRANCH_NORM_KEY.match(name):
            fill = np.ones if name.endswith(".weight") else np.zeros
            out[name] = fill((spec.embed_dim,), dtype=np.float32)
    return out


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
                f"{len(missing)} missing key(s): {format_key_list(missing)}; convert to the encoder only instead.")
        check_state(vit_canonical_shapes(spec), canon, what)
        return canon, notes
    fresh = identity_branch_norms(spec, [k for k in missing if k in enc_keys])
    if fresh:
        notes.append(f"newly initialised (weight 1, bias 0): {format_key_list(sorted(fresh))}")
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
# Swin

_MERGE_KEY = re.compile(r"^(encoder\.)?layers\.\d+\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)$")


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
    return bool(_MERGE_KEY.match(name))


def _permute_merges(state: Mapping[str, np.ndarray], fn) -> Dict[str, np.ndarray]:
    return {k: (fn(np.asarray(v), -1) if is_merge_key(k) else v) for k, v in state.items()}


def from_official_swin(state: Mapping[str, np.ndarray], spec,
                       what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Official LocalMIM Swin -> our layout: drop the relative_position_index buffers (checked
    against the stage windows) and swap the middle C-blocks of every merge weight."""
    out = {}
    for name, value in state.items():
        m = REL_INDEX_KEY.match(name)
        if m is None:
            out[name] = value
            continue
        s = int(m.group(1))
        if s >= spec.num_stages:
            raise StateError(f"{what}: {name} belongs to stage {s} but {spec.name} has {spec.num_stages} stages")
        expected = swin_relative_position_index(spec.stage_window(s))
        if shape_tuple(value) != expected.shape or not np.array_equal(np.asarray(value), expected):
            raise StateError(f"{what}: {name} (shape {shape_tuple(value)}) is not Swin's relative position index "
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
    bad = sorted(k for k in state if not SWIN_ENCODER_KEY.match(k))
    if bad:
        raise StateError(f"{what} has {len(bad)} key(s) that are not Swin encoder keys: {format_key_list(bad)}.")
    last = _last_swin_norm(spec)
    return {(f"{last}.{k.split('.')[-1]}" if k.startswith("norm.") else "encoder." + k): v
            for k, v in state.items()}


def to_timm_swin(state: Mapping[str, np.ndarray], spec, what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Canonical Swin -> timm SwinTransformer keys: as "swin-encoder" with the merging of stage s
    renamed `layers.{s+1}.downsample.*` (timm merges at a stage's start, in the same TL, BL, TR, BR
    order). Load into `timm.create_model(**timm_swin_kwargs(spec))` (strict)."""
    out = {}
    for name, value in to_swin_encoder(state, spec, what).items():
        m = TIMM_DOWNSAMPLE_KEY.match(name)
        out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else name] = value
    return out


def from_timm_swin(state: Mapping[str, np.ndarray], spec, what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """timm SwinTransformer -> canonical encoder keys (the inverse of `to_timm_swin`); `head.*` and
    timm's non-persistent buffers are dropped."""
    plain = {}
    for name, value in state.items():
        if name.startswith("head.") or name.endswith((".relative_position_index", ".attn_mask")):
            continue
        m = TIMM_DOWNSAMPLE_KEY.match(name)
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
        stray = sorted(k for k in state if REL_INDEX_KEY.match(k))
        if stray:
            raise StateError(f"{what} has relative_position_index buffers ({format_key_list(stray)}), which "
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
