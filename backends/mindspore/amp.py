"""Mixed precision and loss scaling for the MindSpore backend, as MindSpore's own recipes train.

MindCV's MAE recipes train in graph mode with `amp_level: O2` and a fixed loss scale of 1024;
mindformers' MAE keeps LayerNorm and softmax in float32. Here (docs/ascend.md#precision):

- `train.precision` picks the low dtype: fp32 | fp16 | bf16 | auto (fp16 on Ascend, fp32 on CPU);
- `train.amp_level` which cells run in it, with MindSpore's level names:
  O0 none; O1 the projections only (Linear, the patch, k2s2 and 1x1 convolutions: every MatMul of
  the model but the two of attention); O2 the whole encoder and decoders except LayerNorm and
  softmax (`mindspore.amp.custom_mixed_precision` with MindSpore's black list plus this
  package's LayerNorm, LayerNorm2d and Softmax cells); O3 all of them, LayerNorm and softmax too
  (`mindspore.amp.auto_mixed_precision(..., "O3")`). Null: O2 for fp16 / bf16, O0 for fp32;
- `train.loss_scale`: a number (mindspore.amp.StaticLossScaler), `dynamic`
  (mindspore.amp.DynamicLossScaler: 2**16, halved on overflow, doubled after 2000 finite steps, as
  torch's GradScaler) or null (dynamic for fp16, none for fp32 / bf16).

The model itself is never cast: its targets (HOG / pixels of the float32 images) and its loss
stay float32 whatever the level, and every converted part hands float32 back (the _OutputTo32
wrapper of MindSpore's amp), so what runs between the parts (the branch LayerNorms, the
un-shuffling, the loss) is float32 too. Parts: ViT patch_embed, each encoder block and each
decoder; Swin the encoder and each decoder.

Every converted cell is marked with `Cell.to_float`, which graph mode (ms.jit) honours by casting
each input and parameter of the cell's operators, and PyNative by casting at each operator call:
one graph for CPU and Ascend. On CPU, MindSpore 2.10 has no bfloat16 MatMul kernel, so bf16 runs
on Ascend only; fp16 runs on CPU.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

import mindspore as ms
from mindspore import amp, nn, ops

from localmim.backends.mindspore.layers import (
    LayerNorm, LayerNorm2d, Linear, PatchEmbed, ConvTranspose2x2, Conv1x1, Softmax,
)

__all__ = [
    "PRECISIONS", "AMP_LEVELS", "DYNAMIC_SCALE_INIT", "DYNAMIC_SCALE_FACTOR", "DYNAMIC_SCALE_WINDOW",
    "resolve_precision", "resolve_amp_level", "fp32_cells", "low_precision_parts", "apply_mixed_precision",
    "cell_dtypes", "make_loss_scaler", "scaler_state", "load_scaler_state",
]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
AMP_LEVELS = ("O0", "O1", "O2", "O3")
DYNAMIC_SCALE_INIT = 2.0 ** 16   # torch GradScaler's defaults, so both backends scale alike
DYNAMIC_SCALE_FACTOR = 2
DYNAMIC_SCALE_WINDOW = 2000
_PROJECTIONS = (Linear, PatchEmbed, ConvTranspose2x2, Conv1x1)


def resolve_precision(precision: Optional[str], device_target: str) -> str:
    """auto -> fp16 on Ascend (MindSpore's recipes: O2, fp16), fp32 on CPU; fp32 | fp16 | bf16 pass.

    bf16 on CPU is an error: MindSpore's CPU MatMul has no bf16 kernel.
    """
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device_target == "Ascend" else "fp32"
    if precision == "bf16" and device_target == "CPU":
        raise ValueError("train.precision 'bf16' is not supported by MindSpore on CPU (no bf16 MatMul kernel); "
                         "use fp32 or fp16 on CPU, bf16 on Ascend")
    return precision


def resolve_amp_level(amp_level: Optional[str], precision: str) -> str:
    """null -> O2 for fp16 / bf16, O0 for fp32; a level other than O0 needs a low precision."""
    if amp_level is None:
        return "O0" if precision == "fp32" else "O2"
    level = str(amp_level).upper()
    if level not in AMP_LEVELS:
        raise ValueError(f"train.amp_level {amp_level!r} must be one of {', '.join(AMP_LEVELS)} or null")
    if precision == "fp32" and level != "O0":
        raise ValueError(f"train.amp_level {level} casts to a low precision, but train.precision is fp32; "
                         f"set train.precision to fp16 or bf16, or train.amp_level to O0")
    return level


def fp32_cells() -> list:
    """Cells O2 keeps in float32: MindSpore's amp black list (its BatchNorms and nn.LayerNorm) plus this
    package's LayerNorm, LayerNorm2d and Softmax."""
    extra = [LayerNorm, LayerNorm2d, Softmax]
    return amp.get_black_list() + [c for c in extra if c not in amp.get_black_list()]


def low_precision_parts(model: nn.Cell):
    """[(container, key)] of the parts an amp level converts: ViT patch_embed, blocks[i],
    decoder[k]; Swin encoder, decoder[k]. Targets, branch norms and the loss are not among them."""
    if getattr(model.spec, "family", "vit") == "swin":
        parts = [(model, "encoder")]
    else:
        parts = [(model, "patch_embed")] + [(model.blocks, i) for i in range(len(model.blocks))]
    return parts + [(model.decoder, k) for k in range(len(model.decoder))]


def _get(container, key):
    return container[key] if isinstance(key, int) else getattr(container, key)


def _set(container, key, cell) -> None:
    if isinstance(key, int):
        container[key] = cell
    else:
        setattr(container, key, cell)


def _wrap_projections(cell: nn.Cell, dtype) -> None:
    """O1: every projection below `cell` computes in `dtype` and returns float32 (MindSpore's O1
    semantics: white-listed operators low, their results back to full precision). Not
    auto_mixed_precision(..., "O1"): MindSpore 2.10 implements it by rewriting the network's source
    and the rewritten CellList fails (NameError '_valid_index')."""
    for name, child in list(cell.name_cells().items()):
        key = int(name) if isinstance(cell, (nn.CellList, nn.SequentialCell)) else name
        if isinstance(child, _PROJECTIONS):
            _set(cell, key, amp.auto_mixed_precision(child, "O3", dtype))
            for _, inner in child.cells_and_names():  # Swin's patch embedding holds its LayerNorm
                if isinstance(inner, tuple(fp32_cells())):
                    inner.to_float(ms.float32)
        else:
            _wrap_projections(child, dtype)


def apply_mixed_precision(model: nn.Cell, precision: str, amp_level: str) -> None:
    """Convert the model's parts (low_precision_parts) in place for `amp_level` in `precision`.

    Parameter names and values are unchanged (the containers' renaming on replacement is undone,
    so checkpoints keep their canonical names); fp32 or O0: nothing to do.
    """
    if precision == "fp32" or amp_level == "O0":
        return
    dtype = ms.bfloat16 if precision == "bf16" else ms.float16
    names = [(p, p.name) for p in model.get_parameters()]
    for container, key in low_precision_parts(model):
        part = _get(container, key)
        if amp_level == "O1":
            _wrap_projections(part, dtype)
        elif amp_level == "O2":
            _set(container, key, amp.custom_mixed_precision(part, black_list=fp32_cells(), dtype=dtype))
        else:
            _set(container, key, amp.auto_mixed_precision(part, "O3", dtype))
    for param, name in names:
        param.name = name
    model.amp_level, model.amp_dtype = amp_level, dtype


def cell_dtypes(model: nn.Cell) -> Dict[str, str]:
    """{cell path: "float16" | "bfloat16" | "float32"} of every cell a `to_float` marks (its own
    mark or its nearest marked ancestor's), in the canonical path of the parameters it holds
    (wrapper levels left out); what graph mode casts each cell's operators to."""
    out: Dict[str, str] = {}

    def walk(cell, path, inherited):
        mark = getattr(cell, "mixed_precision_type", None)
        own = {"FP16": "float16", "BF16": "bfloat16", "FP32": "float32"}.get(getattr(mark, "name", ""), None)
        dtype = own or inherited
        if dtype is not None and path:
            out[path] = dtype
        for name, child in cell.name_cells().items():
            wrapper = name == "_backbone"  # amp's _OutputTo32 / _OutputTo16 keep their child's path
            walk(child, path if wrapper else (f"{path}.{name}" if path else name), dtype)

    walk(model, "", None)
    return out


# ---------------------------------------------------------------------------------------- loss scaling
def make_loss_scaler(loss_scale, precision: str):
    """None | a number | "dynamic" (train.loss_scale) -> None, StaticLossScaler or DynamicLossScaler.

    None means dynamic for fp16 (fp16 gradients underflow without it) and no scaling for fp32 / bf16.
    """
    if loss_scale is None:
        loss_scale = "dynamic" if precision == "fp16" else None
    if loss_scale is None:
        return None
    if isinstance(loss_scale, str):
        if loss_scale.lower() != "dynamic":
            raise ValueError(f"train.loss_scale {loss_scale!r} must be a number >= 1, 'dynamic' or null")
        return amp.DynamicLossScaler(scale_value=DYNAMIC_SCALE_INIT, scale_factor=DYNAMIC_SCALE_FACTOR,
                                     scale_window=DYNAMIC_SCALE_WINDOW)
    if isinstance(loss_scale, bool) or not float(loss_scale) >= 1.0:
        raise ValueError(f"train.loss_scale {loss_scale!r} must be a number >= 1, 'dynamic' or null")
    return amp.StaticLossScaler(float(loss_scale))


def scaler_state(scaler, skipped_steps: int = 0) -> Optional[Dict[str, np.ndarray]]:
    """The scaler's checkpoint entries (`scaler.*`): scale_value, and for a dynamic scaler its
    good-step counter, factor and window; skipped_steps (steps skipped for overflow so far)."""
    if scaler is None:
        return None
    state = {"scale_value": scaler.scale_value.asnumpy().reshape(()).copy(),
             "skipped_steps": np.array(int(skipped_steps), np.int64)}
    if isinstance(scaler, amp.DynamicLossScaler):
        state.update(counter=scaler.counter.asnumpy().reshape(()).copy(),
                     scale_factor=np.array(scaler.scale_factor, np.int64),
                     scale_window=np.array(scaler.scale_window, np.int64))
    return state


def load_scaler_state(scaler, state: Optional[Dict[str, np.ndarray]], path: str = "checkpoint") -> int:
    """Restore scale_value (and the counter of a dynamic scaler); returns the saved skipped_steps.

    A checkpoint without scaler state (written in fp32 or bf16) leaves the scaler at its start."""
    if scaler is None or not state:
        return 0
    if "scale_value" not in state:
        raise ValueError(f"checkpoint {path} scaler state has no scale_value (keys: {sorted(state)})")
    ops.assign(scaler.scale_value, ms.Tensor(np.asarray(state["scale_value"], np.float32).reshape(())))
    if isinstance(scaler, amp.DynamicLossScaler) and "counter" in state:
        ops.assign(scaler.counter, ms.Tensor(np.asarray(state["counter"], np.int32).reshape(())))
    return int(np.asarray(state.get("skipped_steps", 0)))
