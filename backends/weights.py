"""Reading weights files safely, for every layout: what `localmim convert` and both backends'
`inference.load_pretrained` read through (framework-free; torch is imported only for `.pth`
files and MindSpore only for `.ckpt` files, inside the readers).

Loading never runs code from the file: PyTorch files are read with `weights_only=True`, allowing
exactly `argparse.Namespace` (the `args` entry of official LocalMIM and MAE checkpoints); every
tensor must be floating point (integer buffers only as relative_position_index).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import warnings
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from localmim.core import keymaps, layouts
from localmim.core.specs import ARCH_KEYS, SpecError, SwinSpec, spec_to_arch
from localmim.core.state import StateError

__all__ = ["TORCH_EXTS", "ConvertError", "first_sentence", "read_torch", "read_mindspore", "read_safetensors",
           "read_state", "resolve_source", "target_spec", "read_pretrained"]

TORCH_EXTS = (".pth", ".pt", ".bin")
_INTEGER_OK = (".relative_position_index",)  # the only integer tensors a weights file may hold


class ConvertError(ValueError):
    """A file that cannot be read, written or trusted; the message names the file."""


def first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's message (frameworks append advice in more)."""
    text = str(exc).strip()
    if not text:
        return exc.__class__.__name__
    line = text.splitlines()[0]
    return line.split(". ")[0].rstrip(".")


# ----------------------------------------------------------------------------------------------
# readers: path -> (object with the state inside, metadata dict)
#
# metadata keys: "layout" (the layout this package recorded), "arch" (a recorded architecture
# dict), "config" (a training checkpoint's config dict), "official" (an args Namespace was there),
# plus any other safetensors metadata strings.


def _to_numpy(name: str, value, path: str) -> np.ndarray:
    """A tensor/array as numpy; floating tensors become float32 (lossless for fp16/bf16)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        value = value.numpy()
    elif hasattr(value, "asnumpy"):  # mindspore Tensor / Parameter
        value = value.asnumpy()
    if not isinstance(value, np.ndarray):
        raise ConvertError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    if np.issubdtype(value.dtype, np.floating):
        return value if value.dtype == np.float32 else value.astype(np.float32)
    if np.issubdtype(value.dtype, np.integer) and name.endswith(_INTEGER_OK):
        return value
    raise ConvertError(f"{path}: entry {name!r} has dtype {value.dtype}; model weights must be floating point "
                       f"(float16, bfloat16, float32 or float64)")


def _json_meta(path: str, text, what: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise ConvertError(f"{path}: its {what} entry is not valid JSON") from None


def _torch_meta(obj) -> Dict[str, object]:
    meta: Dict[str, object] = {}
    if isinstance(obj, Mapping):
        if isinstance(obj.get("arch"), Mapping):
            meta["arch"] = dict(obj["arch"])
        if isinstance(obj.get("layout"), str):
            meta["layout"] = obj["layout"]
        if isinstance(obj.get("config"), Mapping):
            meta["config"] = dict(obj["config"])
        meta["official"] = isinstance(obj.get("args"), argparse.Namespace)
    return meta


def read_torch(path: str) -> Tuple[Dict[str, object], Dict[str, object]]:
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path}: reading PyTorch files needs torch, which is not installed "
                           f"(pip install 'localmim[torch]')") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pickle-protocol chatter from torch
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln or "global" in ln.lower()),
                      first_sentence(exc))
        raise ConvertError(
            f"{path}: refusing to load it: its pickle asks for objects other than tensors and "
            f"argparse.Namespace, and untrusted code is never run ({reason})") from None
    except Exception as exc:  # truncated zips, junk bytes: torch raises many types
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({first_sentence(exc)})") from None
    return obj, _torch_meta(obj)


def read_mindspore(path: str) -> Tuple[Dict[str, object], Dict[str, object]]:
    try:
        import mindspore
    except ImportError:
        raise ConvertError(f"{path}: reading .ckpt files needs MindSpore, which is not installed "
                           f"(pip install 'localmim[mindspore]')") from None
    try:
        params = dict(mindspore.load_checkpoint(path))
    except (RuntimeError, ValueError, OSError, TypeError) as exc:
        raise ConvertError(f"{path}: not a readable MindSpore checkpoint ({first_sentence(exc)})") from None
    meta: Dict[str, object] = {}
    if isinstance(params.get("meta.arch"), str):
        meta["arch"] = _json_meta(path, params["meta.arch"], "meta.arch")
    if isinstance(params.get("meta.layout"), str):
        meta["layout"] = params["meta.layout"]
    if isinstance(params.get("meta.config"), str):
        meta["config"] = _json_meta(path, params["meta.config"], "meta.config")
    return params, meta


def read_safetensors(path: str) -> Tuple[Dict[str, object], Dict[str, object]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file
    try:
        with safe_open(path, framework="np") as f:
            meta: Dict[str, object] = dict(f.metadata() or {})
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, TypeError (bf16)
        raise ConvertError(f"{path}: not a readable safetensors file ({first_sentence(exc)})") from None
    if "arch" in meta:
        meta["arch"] = _json_meta(path, meta["arch"], "arch metadata")
    return state, meta


def _reader_for(path: str) -> Callable[[str], Tuple[Dict[str, object], Dict[str, object]]]:
    ext = os.path.splitext(path)[1].lower()
    if ext in TORCH_EXTS:
        return read_torch
    if ext == ".ckpt":
        return read_mindspore
    if ext == ".safetensors":
        return read_safetensors
    raise ConvertError(f"{path}: unknown file type {ext or '(none)'!r}; expected "
                       f"{', '.join(TORCH_EXTS)}, .ckpt or .safetensors")


def read_state(path: str, reader: Optional[Callable] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, object]]:
    """Read a weights file -> (state {name: numpy array}, metadata).

    Unwraps "model" / "state_dict" / "module", strips DDP / torch.compile prefixes and drops the
    optimizer and meta entries of training checkpoints (core.layouts.unwrap_checkpoint). Floating
    tensors become float32; any other dtype (but relative_position_index buffers) is refused.
    """
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    obj, meta = (reader or _reader_for(path))(path)
    try:
        raw = layouts.unwrap_checkpoint(obj)
    except StateError as exc:
        raise ConvertError(f"{path}: {exc}") from None
    return {name: _to_numpy(name, value, path) for name, value in raw.items()}, meta


# ----------------------------------------------------------------------------------------------
# the source: layout, architecture, canonical state


def _recorded_arch(meta: Mapping[str, object], path: str) -> Optional[Dict[str, object]]:
    """The architecture a file records: its "arch" entry, or a training checkpoint's config."""
    if isinstance(meta.get("arch"), Mapping):
        return dict(meta["arch"])
    if isinstance(meta.get("config"), Mapping):
        from localmim.core import config as core_config
        try:
            return spec_to_arch(core_config.config_from_dict(dict(meta["config"]), where=f"{path} config").build_spec())
        except (core_config.ConfigError, SpecError) as exc:
            raise ConvertError(f"{path}: its training config does not describe a model: {first_sentence(exc)}") from None
    return None


def resolve_source(state: Mapping[str, np.ndarray], meta: Mapping[str, object], path: str,
                   layout: Optional[str] = None, name: Optional[str] = None,
                   arch: Optional[Mapping[str, object]] = None):
    """(layout, spec, notes) of a state read by `read_state`.

    layout: the caller's (--from), else the one recorded in the file when it fits, else detected.
    spec: core.layouts.infer_spec from the shapes, the architecture recorded in the file (or its
    training config; not with `name`) and `arch` (the caller's options, which win), `name` (--model).
    """
    src_layout, how = layouts.resolve_layout(state, given=layout, recorded=meta.get("layout"),
                                             official=bool(meta.get("official")), what=path)
    recorded = None if name else _recorded_arch(meta, path)  # --model names the architecture itself
    family = layouts.LAYOUT_INFO[src_layout].family
    if recorded is not None and recorded.get("family") != family:
        recorded = None  # an arch for the other family cannot describe these keys
    merged = dict(recorded or {})
    merged.update(arch or {})
    spec, notes = layouts.infer_spec(state, src_layout, what=path, name=name, arch=merged or None,
                                     from_file=recorded is not None)
    return src_layout, spec, [f"layout {src_layout} ({how})"] + notes


def target_spec(spec, img_size: Optional[int], window: Optional[int], what: str):
    """`spec` at another img_size / window (the resampling target), or `spec` itself."""
    changes = {}
    if img_size is not None and img_size != spec.img_size:
        changes["img_size"] = int(img_size)
    if window is not None:
        if not isinstance(spec, SwinSpec):
            raise ConvertError(f"{what}: --window applies to Swin models; this is a ViT")
        if window != spec.window_size:
            changes["window_size"] = int(window)
    if not changes:
        return spec
    try:
        return spec.with_(**changes)
    except SpecError as exc:
        raise ConvertError(f"{what}: cannot resample to {changes}: {exc}") from None


def read_pretrained(path: str, layout: Optional[str] = None, **arch):
    """What the backends' `load_pretrained(path, layout=None, **arch)` loads -> (spec, canonical
    state, notes).

    The file is read with the safe readers, its layout and architecture resolved as by
    `localmim convert` (`arch`: core.specs.ARCH_KEYS values for what the shapes cannot tell;
    `img_size` / `window_size` are the geometry wanted: position tables are resampled to it when
    the file has another). The canonical state is checked strictly against the spec; it lacks the
    decoders and target convs (and all but the last branch norm) when the file holds an encoder:
    the loader takes those from a freshly built model.
    """
    family_keys = set(ARCH_KEYS["vit"]) | set(ARCH_KEYS["swin"])
    unknown = sorted(k for k in arch if k not in family_keys)
    if unknown:
        raise ConvertError(f"unknown architecture option(s) {', '.join(unknown)}; known: "
                           f"{', '.join(sorted(family_keys))}")
    img_size, window = arch.pop("img_size", None), arch.pop("window_size", None)
    state, meta = read_state(path)
    src_layout, spec, notes = resolve_source(state, meta, path, layout=layout, arch=arch)
    dst = target_spec(spec, img_size, window, path)
    canon, more = keymaps.to_canonical(state, src_layout, spec, path)
    notes += more
    if dst != spec:
        from localmim.core.resample import resample_state
        canon, more = resample_state(canon, spec, dst)
        notes += more
    return dst, canon, notes


# ----------------------------------------------------------------------------------------------
# writers
