"""Key maps between the checkpoint layouts of core.layouts and the canonical state of core.state.

Reading: `to_canonical(state, layout, spec)` maps any layout to canonical names (ViT:
`from_localmim`, `from_mae` / `from_timm`, MAE's final norm becoming the last branch norm; Swin:
`swin_to_canonical`: `from_official_swin` (defect D2: the middle two C-blocks of every patch
merge's 4C axis swap), `from_swin_encoder`, `from_timm_swin`) and checks it against the spec: the
encoder complete, the decoders all there or all absent, nothing unexpected or mis-shaped.

Writing: `from_canonical(canon, layout, spec)` maps back (`to_timm`, `to_mae`, `to_official_swin`,
`to_swin_encoder`, `to_timm_swin`); full layouts need the decoders, encoder layouts get absent
branch norms initialised to weight 1 / bias 0 (the reference init). `convert_state` chains the
two, with core.resample in between when the destination spec has another img_size / window.
Absent fixed Sobel kernels are refilled (they are deterministic); a HOG bias is not (random per
run). Pure numpy, like core.state.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from localmim.core.layouts import (
    BRANCH_NORM_KEY, FINAL_NORM_KEY, LAYOUT_INFO, MAE_DECODER_KEY, REL_INDEX_KEY, SWIN_ENCODER_KEY,
    SWIN_LAYOUTS, TIMM_DOWNSAMPLE_KEY, TIMM_HEAD_KEY, VIT_ENCODER_KEY, check_layout_name)
from localmim.core.resample import resample_state, resize_pos_table
from localmim.core.specs import ViTSpec
from localmim.core.state import (
    StateError, check_state, format_key_list, shape_tuple, swin_canonical_shapes, swin_encoder_shapes,
    vit_canonical_shapes, vit_encoder_shapes)

__all__ = [
    "from_localmim", "from_mae", "from_timm", "to_timm", "to_mae", "mae_encoder_part", "mae_decoder_part",
    "mae_decoder_shapes", "timm_kwargs", "identity_branch_norms", "fixed_hog_kernels",
    "to_canonical", "from_canonical", "convert_state",
    "swin_relative_position_index", "merge_official_to_ours", "merge_ours_to_official", "is_merge_key",
    "from_official_swin", "to_official_swin", "to_swin_encoder", "from_swin_encoder", "timm_swin_name", "to_timm_swin",
    "from_timm_swin", "timm_swin_kwargs", "swin_to_canonical", "convert_swin_state",
]

# Layouts without the branch norms but one final norm (mapped to the last branch norm).
_FINAL_NORM_LAYOUTS = ("mae", "mae-encoder", "timm-vit", "swin-encoder", "timm-swin")


def _check_subset(expected: Mapping[str, Tuple[int, ...]], state: Mapping[str, object], what: str):
    """Raise on unexpected or mis-shaped keys (missing keys are the caller's business)."""
    check_state({k: expected[k] for k in state if k in expected}, state, what)


def fixed_hog_kernels(spec, missing: Iterable[str]) -> Dict[str, np.ndarray]:
    """The fixed Sobel weights (2,1,3,3) for the `hog_enc.{k}.conv.weight` keys among `missing`.

    Only the weights are deterministic; a missing HOG bias (random per run, docs/method.md#hog-bias)
    cannot be recreated.
    """
    from localmim.core.targets import sobel_kernel
    return {k: sobel_kernel() for k in missing if re.match(r"^hog_enc\.\d+\.conv\.weight$", k)}


def _family(spec) -> str:
    return getattr(spec, "family", "vit")


def _canonical_shapes(spec) -> Dict[str, Tuple[int, ...]]:
    return swin_canonical_shapes(spec) if _family(spec) == "swin" else vit_canonical_shapes(spec)


def _encoder_shapes(spec) -> Dict[str, Tuple[int, ...]]:
    return swin_encoder_shapes(spec) if _family(spec) == "swin" else vit_encoder_shapes(spec)


def _is_branch_norm(name: str) -> bool:
    return bool(BRANCH_NORM_KEY.match(name) or re.match(r"^encoder\.norm\.\d+\.(weight|bias)$", name))


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
    return out, sorted(k for k in expected if k not in out)


def from_timm(state: Mapping[str, np.ndarray], spec: ViTSpec,
              what: str = "checkpoint") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """timm VisionTransformer -> canonical encoder part; the inverse of `to_timm` (see `from_mae`)."""
    return from_mae(state, spec, what)


def mae_encoder_part(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """An MAE / timm state without its decoder (`decoder_*`, `mask_token`) and head (`head`, `fc_norm`)
    keys: what `timm.create_model(..., num_classes=0)` loads as is (names unchanged)."""
    return {k: v for k, v in state.items() if not (MAE_DECODER_KEY.match(k) or TIMM_HEAD_KEY.match(k))}


def mae_decoder_part(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The MAE decoder keys of a state (`decoder_*` and the top-level `mask_token`)."""
    return {k: v for k, v in state.items() if MAE_DECODER_KEY.match(k)}


def _linear(prefix: str, out_dim: int, in_dim: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)}


def mae_decoder_shapes(spec: ViTSpec, decoder_dim: int, decoder_depth: int,
                       decoder_hidden: int) -> Dict[str, Tuple[int, ...]]:
    """The MAE decoder (facebookresearch/mae models_mae.py) of a ViT `spec`: mask_token (1,1,d),
    decoder_embed (d, D), decoder_pos_embed (1, 1+N, d), decoder_blocks.{j} (timm Blocks of
    width d, MLP hidden width `decoder_hidden`), decoder_norm (d), decoder_pred (p*p*3, d)."""
    d, p = decoder_dim, spec.patch_size
    out: Dict[str, Tuple[int, ...]] = {"mask_token": (1, 1, d), "decoder_pos_embed": (1, 1 + spec.num_patches, d)}
    out.update(_linear("decoder_embed", d, spec.embed_dim))
    for j in range(decoder_depth):
        pre = f"decoder_blocks.{j}"
        out.update({f"{pre}.norm1.weight": (d,), f"{pre}.norm1.bias": (d,), f"{pre}.norm2.weight": (d,),
                    f"{pre}.norm2.bias": (d,)})
        out.update(_linear(f"{pre}.attn.qkv", 3 * d, d))
        out.update(_linear(f"{pre}.attn.proj", d, d))
        out.update(_linear(f"{pre}.mlp.fc1", decoder_hidden, d))
        out.update(_linear(f"{pre}.mlp.fc2", d, decoder_hidden))
    out.update({"decoder_norm.weight": (d,), "decoder_norm.bias": (d,)})
    out.update(_linear("decoder_pred", p * p * 3, d))
    return out


def _checked_mae_decoder(state: Mapping[str, np.ndarray], spec: ViTSpec, what: str) -> Dict[str, np.ndarray]:
    """The MAE decoder keys of `state`, checked complete for `spec` (its width, depth and MLP
    width read from decoder_embed, decoder_blocks and decoder_blocks.0.mlp.fc1)."""
    dec = mae_decoder_part(state)
    if "decoder_embed.weight" not in dec:
        raise StateError(f"{what} has no MAE decoder (decoder_embed, decoder_blocks, ..., mask_token): "
                         f"a LocalMIM model's decoders have another geometry; write 'mae-encoder' instead")
    d = shape_tuple(dec["decoder_embed.weight"])[0]
    depth = len({k.split(".")[1] for k in dec if k.startswith("decoder_blocks.")})
    fc1 = dec.get("decoder_blocks.0.mlp.fc1.weight")
    hidden = shape_tuple(fc1)[0] if fc1 is not None else int(d * spec.mlp_ratio)
    expected = mae_decoder_shapes(spec.with_(img_size=_mae_img_size(dec, spec)), d, depth, hidden)
    check_state(expected, dec, f"{what} (MAE decoder)")
    return dec


def _mae_img_size(dec: Mapping[str, np.ndarray], spec: ViTSpec) -> int:
    """The image size the MAE decoder's decoder_pos_embed was made for (its grid x patch)."""
    if "decoder_pos_embed" not in dec:
        return spec.img_size
    g = int(round((shape_tuple(dec["decoder_pos_embed"])[1] - 1) ** 0.5))
    return g * spec.patch_size if g > 0 else spec.img_size


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


def to_mae(state: Mapping[str, np.ndarray], spec: ViTSpec, decoder: Optional[Mapping[str, np.ndarray]] = None,
           what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Canonical state -> MAE names: the timm encoder names (`to_timm`), plus the MAE `decoder`
    keys when given (the "mae" layout; without them "mae-encoder")."""
    out = to_timm(state, spec, what)
    if decoder is not None:
        out.update(decoder)
    return out


def timm_kwargs(spec: ViTSpec) -> Dict[str, object]:
    """Arguments for `timm.create_model(**timm_kwargs(spec))` building our encoder as a timm ViT."""
    return {"model_name": f"vit_base_patch{spec.patch_size}_224", "pretrained": False, "num_classes": 0,
            "img_size": spec.img_size, "patch_size": spec.patch_size, "embed_dim": spec.embed_dim,
            "depth": spec.depth, "num_heads": spec.num_heads, "mlp_ratio": spec.mlp_ratio}


def identity_branch_norms(spec, missing: Iterable[str]) -> Dict[str, np.ndarray]:
    """Reference-init (weight 1, bias 0) arrays for the branch-norm keys among `missing` (ViT
    `norm.{k}.*`, Swin `encoder.norm.{k}.*`, width from the spec's canonical shapes)."""
    shapes = _encoder_shapes(spec)
    out = {}
    for name in missing:
        if _is_branch_norm(name) and name in shapes:
            fill = np.ones if name.endswith(".weight") else np.zeros
            out[name] = fill(shapes[name], dtype=np.float32)
    return out


def _hog_notes(state: Mapping[str, object], spec) -> List[str]:
    convs = sorted(k for k in state if k.startswith("hog_enc."))
    if spec.target.kind != "hog":
        return [] if not convs else [f"{len(convs)} hog_enc key(s) present although the target is pixels"]
    if not convs:
        return ["no hog_enc keys in the source"]
    bias = sum(k.endswith(".bias") for k in convs)
    return [f"HOG target: {spec.target.nbins} bins, " + (f"{bias} frozen Sobel bias(es) kept" if bias else "no Sobel bias")]


# ----------------------------------------------------------------------------------------------
# reading and writing any layout


def _renamed_to_canonical(state, layout: str, spec, what: str) -> Dict[str, np.ndarray]:
    """Canonical names (and merge order) only; `to_canonical` checks the result."""
    if LAYOUT_INFO[layout].family == "swin":
        return swin_to_canonical(state, layout, spec, what)
    if layout in ("localmim-vit", "localmim-vit-encoder", "official-localmim-vit"):
        return from_localmim(state, spec, what)[0]
    return from_mae(state, spec, what)[0]


def to_canonical(state: Mapping[str, np.ndarray], layout: str, spec,
                 what: str = "checkpoint") -> Tuple[Dict[str, np.ndarray], List[str]]:
    """A state of `layout` -> (canonical state, notes), checked against `spec`.

    The encoder must be complete; the decoders and target convs must all be there or all be
    absent (an encoder file); absent fixed Sobel kernels beside present decoders are refilled.
    Branch norms may be absent only in layouts that have one final norm instead (MAE, timm,
    Swin encoders). One StateError names every missing, unexpected and mis-shaped key. The result
    may lack the decoders, targets and (final-norm layouts) all but the last branch norm.
    """
    check_layout_name(layout, "source layout")
    canon = _renamed_to_canonical(state, layout, spec, what)
    expected = _canonical_shapes(spec)
    encoder = _encoder_shapes(spec)
    has_heads = any(k in expected and k not in encoder and not k.startswith("hog_enc.") for k in canon)
    notes = _hog_notes(canon, spec) if has_heads else []
    if has_heads:
        sobel = fixed_hog_kernels(spec, [k for k in expected if k not in canon])
        if sobel:
            canon.update(sobel)
            notes.append(f"filled {len(sobel)} absent HOG kernel(s) with the fixed Sobel filter")
    optional = {k for k in expected if k not in encoder} if not has_heads else set()
    if layout in _FINAL_NORM_LAYOUTS:
        optional |= {k for k in encoder if _is_branch_norm(k)}
    check_state({k: v for k, v in expected.items() if k not in optional or k in canon}, canon, what)
    return canon, notes


def _complete_encoder(canon: Dict[str, np.ndarray], spec, notes: List[str]) -> Dict[str, np.ndarray]:
    """The canonical encoder part of `canon`, absent branch norms initialised (weight 1, bias 0)."""
    encoder = _encoder_shapes(spec)
    out = {k: v for k, v in canon.items() if k in encoder}
    fresh = identity_branch_norms(spec, [k for k in encoder if k not in out])
    if fresh:
        notes.append(f"newly initialised (weight 1, bias 0): {format_key_list(sorted(fresh))}")
        out.update(fresh)
    dropped = sorted(k for k in canon if k not in encoder)
    if dropped:
        notes.append(f"dropped {len(dropped)} decoder/target key(s)")
    return out


def from_canonical(canon: Mapping[str, np.ndarray], layout: str, spec, what: str = "checkpoint",
                   mae_decoder: Optional[Mapping[str, np.ndarray]] = None) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """A canonical state (from `to_canonical`) -> (state in `layout`, notes).

    Full layouts need every canonical key (a source without decoders can only go to an encoder
    layout); "mae" needs `mae_decoder` (the MAE decoder keys of an MAE source). Encoder layouts
    keep the encoder (absent branch norms initialised to weight 1 / bias 0; the final-norm layouts
    keep only the last branch norm, as their `norm.*`).
    """
    info = LAYOUT_INFO[check_layout_name(layout, "destination layout")]
    if info.family != _family(spec):
        raise StateError(f"layout {layout} is a {info.family} layout but the model is a {_family(spec)} one")
    notes: List[str] = []
    if info.parts == "full" and layout != "mae":
        expected = _canonical_shapes(spec)
        missing = sorted(k for k in expected if k not in canon)
        if missing:
            encoder_layout = layout.replace("official-", "") + "-encoder"
            raise StateError(
                f"{what} cannot fill a full {layout} state for {spec.name}: {len(missing)} missing key(s): "
                f"{format_key_list(missing)}; write the encoder layout {encoder_layout} instead.")
        check_state(expected, canon, what)
        if layout == "official-localmim-swin":
            notes.append("wrote merge order TL,TR,BL,BR and relative_position_index buffers (official layout)")
            return to_official_swin(canon, spec), notes
        return dict(canon), notes
    encoder = _complete_encoder(dict(canon), spec, notes)
    check_state(_encoder_shapes(spec), encoder, what)
    if layout in ("localmim-vit-encoder", "localmim-swin-encoder"):
        return encoder, notes
    if layout == "timm-vit":
        return to_timm(encoder, spec, what), notes
    if layout in ("mae", "mae-encoder"):
        if layout == "mae" and mae_decoder is None:
            raise StateError(f"{what} has no MAE decoder (decoder_embed, decoder_blocks, ..., mask_token): "
                             f"a LocalMIM model's decoders have another geometry; write 'mae-encoder' instead")
        return to_mae(encoder, spec, mae_decoder if layout == "mae" else None, what), notes
    if layout == "swin-encoder":
        return to_swin_encoder(encoder, spec, what), notes
    return to_timm_swin(encoder, spec, what), notes


def _resampled_mae_decoder(dec: Dict[str, np.ndarray], dst: ViTSpec, notes: List[str]) -> Dict[str, np.ndarray]:
    out = dict(dec)
    out["decoder_pos_embed"], how = resize_pos_table(dec["decoder_pos_embed"], dst.grid, cls_token=True)
    if how != "unchanged":
        notes.append(f"decoder_pos_embed: grid -> {dst.grid} ({how})")
    return out


def convert_state(state: Mapping[str, np.ndarray], src_layout: str, dst_layout: str, spec,
                  what: str = "checkpoint", dst_spec=None) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Map `state` from `src_layout` to `dst_layout` for `spec` -> (new_state, notes).

    `to_canonical`, then core.resample.resample_state when `dst_spec` (the same model at another
    img_size / window) is given, then `from_canonical`. "mae" as the destination carries the MAE
    decoder of an "mae" source over (its decoder_pos_embed resampled too). Notes are one-line
    remarks (permuted merges, initialised keys, resampled tables). Raises StateError naming keys.
    """
    for name, role in ((src_layout, "source layout"), (dst_layout, "destination layout")):
        check_layout_name(name, role)
    canon, notes = to_canonical(state, src_layout, spec, what)
    if src_layout == "official-localmim-swin":
        merges = sum(1 for k in canon if is_merge_key(k))
        notes.append(f"merge order TL,TR,BL,BR -> TL,BL,TR,BR: permuted {merges} merge tensor(s); "
                     f"dropped relative_position_index buffers")
    target = dst_spec or spec
    if dst_spec is not None and dst_spec != spec:
        canon, more = resample_state(canon, spec, dst_spec)
        notes += more
    decoder = None
    if dst_layout == "mae":
        if src_layout != "mae":
            raise StateError(f"{what} ({src_layout}) has no MAE decoder (decoder_embed, decoder_blocks, ..., "
                             f"mask_token): a LocalMIM model's decoders have another geometry; write "
                             f"'mae-encoder' instead")
        decoder = _resampled_mae_decoder(_checked_mae_decoder(state, spec, what), target, notes)
    out, more = from_canonical(canon, dst_layout, target, what, mae_decoder=decoder)
    return out, notes + more


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


def _drop_index_buffers(state: Mapping[str, np.ndarray], spec, what: str, pattern=REL_INDEX_KEY) -> Dict[str, np.ndarray]:
    """`state` without its relative_position_index buffers, each checked to be Swin's index for
    its stage's window (a buffer for another window means another model)."""
    out = {}
    for name, value in state.items():
        m = pattern.match(name)
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
    return out


def from_official_swin(state: Mapping[str, np.ndarray], spec,
                       what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Official LocalMIM Swin -> our layout: drop the relative_position_index buffers (checked
    against the stage windows) and swap the middle C-blocks of every merge weight."""
    return _permute_merges(_drop_index_buffers(state, spec, what), merge_official_to_ours)


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


_PLAIN_INDEX_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index$")


def from_swin_encoder(state: Mapping[str, np.ndarray], spec, what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """"swin-encoder" -> canonical encoder keys (the inverse of `to_swin_encoder`). A standard
    Swin's `head.*` and `attn_mask` buffers are dropped, its relative_position_index buffers
    checked against the windows and dropped."""
    bad = sorted(k for k in state if not SWIN_ENCODER_KEY.match(k))
    if bad:
        raise StateError(f"{what} has {len(bad)} key(s) that are not Swin encoder keys: {format_key_list(bad)}.")
    plain = {k: v for k, v in state.items() if not (k.startswith("head.") or k.endswith(".attn_mask"))}
    plain = _drop_index_buffers(plain, spec, what, _PLAIN_INDEX_KEY)
    last = _last_swin_norm(spec)
    return {(f"{last}.{k.split('.')[-1]}" if k.startswith("norm.") else "encoder." + k): v
            for k, v in plain.items()}


def timm_swin_name(name: str) -> str:
    """A "swin-encoder" key as timm's SwinTransformer names it: the merging at the end of stage s
    is timm's `layers.{s+1}.downsample.*` (timm merges at a stage's start, in the same TL, BL, TR,
    BR order); every other key is the same."""
    m = TIMM_DOWNSAMPLE_KEY.match(name)
    return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else name


def to_timm_swin(state: Mapping[str, np.ndarray], spec, what: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Canonical Swin -> timm SwinTransformer keys: "swin-encoder" renamed by `timm_swin_name`.
    Load into `timm.create_model(**timm_swin_kwargs(spec))` (strict)."""
    return {timm_swin_name(name): value for name, value in to_swin_encoder(state, spec, what).items()}


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
    only renames, drops buffers and permutes merges: shapes are checked by the caller.

    "localmim-swin" / "localmim-swin-encoder": Swin merge order whatever the buffers: present
    relative_position_index buffers are checked against the windows and dropped."""
    if layout not in SWIN_LAYOUTS:
        raise StateError(f"unknown Swin layout {layout!r}; known: {', '.join(SWIN_LAYOUTS)}")
    if layout == "official-localmim-swin":
        return from_official_swin(state, spec, what)
    if layout in ("localmim-swin", "localmim-swin-encoder"):
        return _drop_index_buffers(state, spec, what)
    if layout == "swin-encoder":
        return from_swin_encoder(state, spec, what)
    return from_timm_swin(state, spec, what)


def convert_swin_state(state: Mapping[str, np.ndarray], src_layout: str, dst_layout: str, spec,
                       what: str = "checkpoint", dst_spec=None) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """`convert_state` for two SWIN_LAYOUTS (kept for callers that name the family)."""
    for name, role in ((src_layout, "source"), (dst_layout, "destination")):
        if name not in SWIN_LAYOUTS:
            raise StateError(f"unknown Swin {role} layout {name!r}; known: {', '.join(SWIN_LAYOUTS)}")
    return convert_state(state, src_layout, dst_layout, spec, what, dst_spec)
