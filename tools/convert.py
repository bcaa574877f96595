"""`localmim convert SRC DST`: move ViT and Swin weights between frameworks and codebases.

Reads a PyTorch `.pth/.pt/.bin` (this package's training checkpoints, official LocalMIM, MAE or
timm files), a MindSpore `.ckpt` or a `.safetensors` file, detects its family (ViT or Swin), layout
and model size (core.layouts), maps it through the canonical state (core.keymaps) and writes `.pth`,
`.ckpt`, `.safetensors` or a timm-compatible encoder. Every write is atomic and verified by reading
the file back.

Swin: an official LocalMIM Swin checkpoint is recognised by its relative_position_index buffers
(or `--from official-localmim-swin`); its patch-merging weights are permuted from the official
order TL, TR, BL, BR to ours (Swin's TL, BL, TR, BR). `--layout official-localmim-swin` writes the
official layout back, `--layout swin-encoder` a standard Swin encoder for fine-tuning and
`--to timm` a timm SwinTransformer state.

Loading never runs code from the file: PyTorch files are read with `weights_only=True`, allowing
exactly `argparse.Namespace` (the `args` entry of official LocalMIM and MAE checkpoints).
MindSpore is imported only for `.ckpt` files and torch only for `.pth` files and `--check`.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from localmim.core import keymaps, layouts
from localmim.core.files import write_atomically
from localmim.core.specs import SpecError, SwinSpec, ViTSpec
from localmim.core.state import StateError

__all__ = ["ConvertError", "add_arguments", "run", "main", "read_state", "write_state",
           "output_format", "check_models"]

TORCH_EXTS = (".pth", ".pt", ".bin")
FORMATS = ("pth", "ckpt", "safetensors", "timm")
CHECK_TOLERANCE = 1e-4  # max abs feature difference accepted by --check (float32, two frameworks)


class ConvertError(ValueError):
    """A file that cannot be read, written or trusted; the message names the file."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


# ----------------------------------------------------------------------------------------------
# readers: path -> (canonical-or-foreign state dict[str, np.ndarray], metadata dict)


def _to_numpy(name: str, value, path: str) -> np.ndarray:
    """A tensor/array as numpy; floating tensors become float32 (lossless for fp16/bf16)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()
        return value.numpy()
    if hasattr(value, "asnumpy"):  # mindspore Tensor / Parameter
        value = value.asnumpy()
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating) and value.dtype != np.float32:
            value = value.astype(np.float32)
        return value
    raise ConvertError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")


def _read_torch(path: str) -> Tuple[Dict[str, object], Dict[str, str]]:
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
                      _first_line(exc))
        raise ConvertError(
            f"{path}: refusing to load it: its pickle asks for objects other than tensors and "
            f"argparse.Namespace, and untrusted code is never run ({reason})") from None
    except Exception as exc:  # truncated zips, junk bytes: torch raises many types
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    return obj, {}


def _read_mindspore(path: str) -> Tuple[Dict[str, object], Dict[str, str]]:
    try:
        import mindspore
    except ImportError:
        raise ConvertError(f"{path}: reading .ckpt files needs MindSpore, which is not installed "
                           f"(pip install 'localmim[mindspore]')") from None
    try:
        params = mindspore.load_checkpoint(path)
    except (RuntimeError, ValueError, OSError, TypeError) as exc:
        raise ConvertError(f"{path}: not a readable MindSpore checkpoint ({_first_line(exc)})") from None
    return dict(params), {}


def _read_safetensors(path: str) -> Tuple[Dict[str, object], Dict[str, str]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file
    try:
        with safe_open(path, framework="np") as f:
            meta = dict(f.metadata() or {})
        return load_file(path), meta
    except Exception as exc:  # safetensors raises its own SafetensorError or OSError
        raise ConvertError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _reader_for(path: str) -> Callable[[str], Tuple[Dict[str, object], Dict[str, str]]]:
    ext = os.path.splitext(path)[1].lower()
    if ext in TORCH_EXTS:
        return _read_torch
    if ext == ".ckpt":
        return _read_mindspore
    if ext == ".safetensors":
        return _read_safetensors
    raise ConvertError(f"{path}: unknown file type {ext or '(none)'!r}; expected "
                       f"{', '.join(TORCH_EXTS)}, .ckpt or .safetensors")


def read_state(path: str, reader: Optional[Callable] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Read a weights file -> (state {name: numpy array}, metadata).

    Unwraps "model" / "state_dict" / "module", strips DDP / torch.compile prefixes and drops the
    optimizer and meta entries of training checkpoints (core.layouts.unwrap_checkpoint).
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
# writers


def output_format(dst: str, to: Optional[str]) -> str:
    """The output format: --to when given, else from DST's extension."""
    ext = os.path.splitext(dst)[1].lower()
    if to == "timm" and ext not in TORCH_EXTS + (".safetensors",):
        raise ConvertError(f"{dst}: timm output is written as .pth or .safetensors, not {ext or 'no extension'!r}")
    if to:
        return to
    if ext in TORCH_EXTS:
        return "pth"
    if ext in (".ckpt", ".safetensors"):
        return ext[1:]
    raise ConvertError(f"{dst}: cannot tell the output format from {ext or 'no extension'!r}; pass --to "
                       f"{'|'.join(FORMATS)}")


def _write_torch(path: str, state: Dict[str, np.ndarray], wrap: bool) -> None:
    import torch
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    torch.save({"model": tensors} if wrap else tensors, path)


def _write_mindspore(path: str, state: Dict[str, np.ndarray]) -> None:
    try:
        import mindspore
    except ImportError:
        raise ConvertError(f"{path}: writing .ckpt files needs MindSpore, which is not installed "
                           f"(pip install 'localmim[mindspore]')") from None
    # A list of {"name", "data"}: saving a plain dict[str, Tensor] hits a MindSpore 2.10 bug.
    items = [{"name": k, "data": mindspore.Tensor(np.ascontiguousarray(v))} for k, v in state.items()]
    mindspore.save_checkpoint(items, path)


def _write_safetensors(path: str, state: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata=metadata)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _verify(path: str, reader: Callable, state: Dict[str, np.ndarray], shown: str) -> None:
    """Reload `path` and compare every tensor bit for bit with `state`."""
    back, _ = read_state(path, reader)
    if set(back) != set(state):
        extra, lost = sorted(set(back) - set(state)), sorted(set(state) - set(back))
        raise ConvertError(f"{shown}: verification failed: reloaded keys differ (lost {lost[:8]}, extra {extra[:8]})")
    bad = sorted(k for k in state if not _same_bits(back[k], np.asarray(state[k])))
    if bad:
        raise ConvertError(f"{shown}: verification failed: {len(bad)} tensor(s) changed on reload: {', '.join(bad[:8])}")


def write_state(dst: str, state: Dict[str, np.ndarray], fmt: str, metadata: Dict[str, str],
                force: bool = False) -> None:
    """Write `state` to `dst` atomically, verified bit for bit before it replaces anything.

    fmt: "pth" ({"model": tensors}), "ckpt" (MindSpore), "safetensors" (with `metadata`) or "timm"
    (a plain state dict; .safetensors when dst ends so, else .pth). The file is written beside dst
    under a temporary name, reloaded, compared, then renamed over dst (core.files.write_atomically);
    on any error the temporary file is removed and dst is untouched. An existing dst is refused
    unless `force`.
    """
    if fmt not in FORMATS:
        raise ConvertError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if os.path.exists(dst) and not force:
        raise ConvertError(f"{dst}: already exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ConvertError(f"{dst}: the folder {folder} does not exist")
    state = {k: np.ascontiguousarray(v) for k, v in state.items()}
    timm_st = fmt == "timm" and dst.lower().endswith(".safetensors")
    suffix = {"pth": ".pth", "ckpt": ".ckpt", "safetensors": ".safetensors",
              "timm": ".safetensors" if timm_st else ".pth"}[fmt]
    if fmt == "pth" or (fmt == "timm" and not timm_st):
        write, reader = (lambda tmp: _write_torch(tmp, state, wrap=fmt == "pth")), _read_torch
    elif fmt == "ckpt":
        write, reader = (lambda tmp: _write_mindspore(tmp, state)), _read_mindspore
    else:
        write, reader = (lambda tmp: _write_safetensors(tmp, state, metadata)), _read_safetensors

    def write_verified(tmp: str) -> None:
        write(tmp)
        _verify(tmp, reader, state, dst)  # raising here leaves dst untouched

    write_atomically(dst, write_verified, suffix=suffix)


# ----------------------------------------------------------------------------------------------
# --check: run both sides on the same image and mask


def _check_image(image: Optional[str], spec: ViTSpec) -> np.ndarray:
    """(1, 3, S, S) float32 ImageNet-normalised: the given image resized, or a fixed synthetic one."""
    size = spec.img_size
    if image is None:
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        rng = np.random.default_rng(0)
        rgb = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), x * y], 0)
        rgb = 0.5 + 0.4 * rgb + 0.05 * rng.standard_normal((3, size, size)).astype(np.float32)
    else:
        from PIL import Image
        try:
            with Image.open(image) as im:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
                rgb = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except OSError as exc:
            raise ConvertError(f"{image}: not a readable image ({_first_line(exc)})") from None
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return ((rgb - mean) / std).astype(np.float32)[None]


def _timm_features(state: Dict[str, np.ndarray], spec: ViTSpec, imgs: np.ndarray, ids_keep: np.ndarray) -> np.ndarray:
    """timm ViT with `state` (timm names) on the visible tokens -> final normed tokens (B, 1+K, D)."""
    import timm
    import torch
    kw = keymaps.timm_kwargs(spec)
    model = timm.create_model(kw.pop("model_name"), **kw).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        x = model.patch_embed(torch.from_numpy(imgs)) + model.pos_embed[:, 1:]
        idx = torch.from_numpy(ids_keep).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, idx)
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = model.norm(model.blocks(torch.cat([cls, x], 1)))
    return x.numpy()


def _backend_run(backend: str, state: Dict[str, np.ndarray], spec, imgs: np.ndarray,
                 masks: Dict[str, np.ndarray]) -> Tuple[List[np.ndarray], Optional[float]]:
    """Our model (ViT or Swin) in `backend` with the canonical `state` (keys it lacks come from a
    fresh model) on `imgs` and the numpy `masks` dict (ViT: VitMask.as_dict(), Swin: a plan's
    to_arrays()) -> (branch taps / latents, loss or None when the state has no decoders)."""
    if backend == "torch":
        import torch
        from localmim.backends.torch import build_model
        tensor = torch.from_numpy
        to_np = lambda t: t.detach().numpy()  # noqa: E731
    else:
        import mindspore
        from localmim.backends.mindspore import build_model
        tensor = mindspore.Tensor
        to_np = lambda t: t.asnumpy()  # noqa: E731
    model = build_model(spec)
    full = model.export_state()
    has_decoders = all(k in state for k in full)
    full.update(state)
    model.import_state(full)
    x, masks_t = tensor(imgs), {k: tensor(np.ascontiguousarray(v)) for k, v in masks.items()}
    if backend == "torch":
        model.eval()
        with torch.no_grad():
            taps = [to_np(t) for t in model.forward_encoder(x, masks_t)]
            loss = float(to_np(model(x, masks_t)[0])) if has_decoders else None
    else:
        model.set_train(False)
        taps = [to_np(t) for t in model.forward_encoder(x, masks_t)]
        loss = float(to_np(model(x, masks_t)[0])) if has_decoders else None
    return taps, loss


def check_models(src_state: Dict[str, np.ndarray], src_layout: str, dst_path: str, dst_fmt: str,
                 spec, image: Optional[str] = None,
                 dst_layout: Optional[str] = None) -> Tuple[float, Optional[float]]:
    """Run the source weights and the written file on one image and one core mask.

    Swin (`spec` a SwinSpec): both sides are mapped to the canonical state (official merge order
    permuted) and run in our LocalMIMSwin (MindSpore for a .ckpt destination, torch otherwise) on a
    core plan of the 0.75 cell mask from mask_rng(0, 0, 0, 0); `dst_layout` names the written layout.

    Source: our torch model for LocalMIM layouts, a timm ViT for MAE / timm layouts (decoder and head
    keys dropped). Destination: a timm ViT for timm output, our MindSpore model for .ckpt, our torch
    model otherwise. Returns (max abs difference of the last tap's features, loss difference or None).
    """
    try:
        if isinstance(spec, SwinSpec):
            return _check_swin(src_state, src_layout, dst_path, dst_layout, dst_fmt, spec, image)
        return _check_models(src_state, src_layout, dst_path, dst_fmt, spec, image)
    except ImportError as exc:
        raise ConvertError(f"--check cannot run: {_first_line(exc)}") from None


def _check_models(src_state, src_layout, dst_path, dst_fmt, spec, image):
    from localmim.core.masking import mask_rng, vit_mask
    imgs = _check_image(image, spec)
    mask = vit_mask(mask_rng(0, 0, 0, 0), 1, spec.num_patches, 0.75)
    if src_layout in ("localmim", "localmim-encoder"):
        src_taps, src_loss = _backend_run("torch", src_state, spec, imgs, mask.as_dict())
    else:
        src_taps, src_loss = [_timm_features(keymaps.mae_encoder_part(src_state), spec, imgs, mask.ids_keep)], None
    dst_state, _ = read_state(dst_path)
    if dst_fmt == "timm":
        dst_taps, dst_loss = [_timm_features(dst_state, spec, imgs, mask.ids_keep)], None
    else:
        dst_taps, dst_loss = _backend_run("mindspore" if dst_fmt == "ckpt" else "torch",
                                          dst_state, spec, imgs, mask.as_dict())
    n = min(len(src_taps), len(dst_taps))
    feat = max(float(np.max(np.abs(a - b))) for a, b in zip(src_taps[-n:], dst_taps[-n:]))
    loss = abs(src_loss - dst_loss) if src_loss is not None and dst_loss is not None else None
    return feat, loss


def _check_swin(src_state, src_layout, dst_path, dst_layout, dst_fmt, spec, image):
    from localmim.core.masking import mask_rng, swin_cell_mask
    from localmim.core.swin_plan import build_swin_plan
    imgs = _check_image(image, spec)
    plan = build_swin_plan(spec, swin_cell_mask(mask_rng(0, 0, 0, 0), spec.mask_grid, 0.75))
    src = keymaps.swin_to_canonical(src_state, src_layout, spec, "source")
    dst_state, _ = read_state(dst_path)
    dst = keymaps.swin_to_canonical(dst_state, dst_layout or layouts.detect_layout(dst_state), spec, dst_path)
    src_lat, src_loss = _backend_run("torch", src, spec, imgs, plan.to_arrays())
    dst_lat, dst_loss = _backend_run("mindspore" if dst_fmt == "ckpt" else "torch", dst, spec, imgs, plan.to_arrays())
    both_full = src_loss is not None and dst_loss is not None
    pairs = list(zip(src_lat, dst_lat)) if both_full else [(src_lat[-1], dst_lat[-1])]
    feat = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    return feat, (abs(src_loss - dst_loss) if both_full else None)


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", metavar="SRC", help="weights to read (.pth/.pt/.bin, .ckpt, .safetensors)")
    parser.add_argument("dst", metavar="DST", help="file to write")
    parser.add_argument("--from", dest="src_layout", choices=layouts.LAYOUTS, default=None,
                        help="source layout (default: detected from the keys)")
    parser.add_argument("--to", dest="fmt", choices=FORMATS, default=None,
                        help="output format (default: from DST's extension); timm writes a timm ViT encoder")
    parser.add_argument("--layout", dest="dst_layout", choices=layouts.LAYOUTS, default=None,
                        help="layout to write (default: ours, or its encoder part); e.g. "
                             "official-localmim-swin or swin-encoder for Swin")
    parser.add_argument("--model", default=None,
                        help="model spec name (default: detected from the shapes)")
    parser.add_argument("--check", nargs="?", const="", default=None, metavar="IMAGE",
                        help="run source and destination models on IMAGE (or a synthetic image) and "
                             "print the largest feature difference")
    parser.add_argument("--force", action="store_true", help="overwrite an existing DST")
    return parser


def _dst_layout(fmt: str, src_layout: str, state=None, requested: Optional[str] = None) -> str:
    """The layout to write: --layout when given, else timm for --to timm, else ours (the encoder
    part only when the source has no decoders)."""
    swin = src_layout in layouts.SWIN_LAYOUTS
    if fmt == "timm":
        if requested not in (None, "timm-swin" if swin else "timm-vit"):
            raise ConvertError(f"--to timm writes the {'timm-swin' if swin else 'timm-vit'} layout, not {requested!r}")
        return "timm-swin" if swin else "timm-vit"
    if requested is not None:
        if requested in ("timm-swin", "timm-vit"):
            raise ConvertError(f"--layout {requested} needs --to timm")
        if (requested in layouts.SWIN_LAYOUTS) != swin:
            raise ConvertError(f"--layout {requested} does not fit a {'Swin' if swin else 'ViT'} source ({src_layout})")
        return requested
    if swin:
        full = src_layout in ("localmim-swin", "official-localmim-swin") and any(
            k.startswith("decoder.") for k in (state or {}))
        return "localmim-swin" if full else "swin-encoder"
    return "localmim" if src_layout == "localmim" else "localmim-encoder"


def _convert(args) -> int:
    src, dst = args.src, args.dst
    fmt = output_format(dst, args.fmt)
    if os.path.exists(dst) and not args.force:
        raise ConvertError(f"{dst}: already exists; pass --force to overwrite it")
    state, meta = read_state(src)
    layout = args.src_layout or layouts.detect_layout(state)
    family = layouts.detect_family(state)
    if (layout in layouts.SWIN_LAYOUTS) != (family == "swin"):
        raise ConvertError(f"{src}: --from {layout} does not fit its keys, which are "
                           f"{'Swin' if family == 'swin' else 'ViT'} keys")
    infer = layouts.infer_swin_spec if family == "swin" else layouts.infer_vit_spec
    spec, spec_notes = infer(state, layout, what=src, name=args.model)
    spec_notes = [spec_notes[0] + (" (given)" if args.model else " (detected from shapes)")]
    out_layout = _dst_layout(fmt, layout, state, getattr(args, "dst_layout", None))
    out, notes = keymaps.convert_state(state, layout, out_layout, spec, what=src)
    print(f"source {src}: layout {layout}, {len(state)} keys")
    for line in spec_notes + notes:
        print(f"  {line}")
    write_state(dst, out, fmt, {"layout": out_layout, "model": spec.name, "source_layout": layout},
                force=args.force)
    print(f"wrote {dst}: {fmt}, layout {out_layout}, {len(out)} keys, verified")
    if args.check is not None:
        feat, loss = check_models(state, layout, dst, fmt, spec, args.check or None, dst_layout=out_layout)
        print(f"check: encoder features max abs diff {feat:.3e}")
        if loss is not None:
            print(f"check: loss abs diff {loss:.3e}")
        if feat > CHECK_TOLERANCE or (loss is not None and loss > CHECK_TOLERANCE):
            print(f"localmim convert: error: --check differences exceed {CHECK_TOLERANCE:g}", file=sys.stderr)
            return 1
    return 0


def run(args) -> int:
    """Run the conversion for parsed `args`; returns the exit code (0 ok, 2 bad input)."""
    try:
        return _convert(args)
    except (ConvertError, StateError, SpecError) as exc:
        print(f"localmim convert: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="localmim convert", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
