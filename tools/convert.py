"""`localmim convert SRC DST`: move ViT and Swin weights between frameworks and codebases.

Reads a PyTorch `.pth/.pt/.bin` (this package's training checkpoints, official LocalMIM, MAE or
timm files), a MindSpore `.ckpt` or a `.safetensors` file; names its layout (core.layouts:
`--list-layouts` prints them, `--from` overrides the detection) and architecture (from the shapes,
with what they cannot tell from `--arch key=value` / `--arch-file`, or from the architecture
recorded in the file); maps it through the canonical state (core.keymaps), resamples position
tables on request (`--img-size`, `--window`, core.resample) and writes the layout `--layout` (by
default ours, or its encoder part) as `.pth`, `.ckpt` or `.safetensors`. The architecture is
recorded in the output (PyTorch: an "arch" entry beside "model"; safetensors: metadata; MindSpore:
a `meta.arch` string) so that it reloads without options. Every write is atomic and verified by
reading the file back; `--check` also runs both models on the same images.

Swin: an official LocalMIM Swin checkpoint is recognised by its relative_position_index buffers
(or `--from official-localmim-swin`); its patch-merging weights are permuted from the official
order TL, TR, BL, BR to ours (Swin's TL, BL, TR, BR). A file in Swin order that still has the
buffers reads with `--from localmim-swin`.

A fine-tuned classifier (`localmim finetune`'s checkpoints of either framework, recognised by the
fine-tuning config they carry) exports with `--to timm` to the state dict of a timm
VisionTransformer / SwinTransformer with its head (core.classifier.timm_classifier_state); the
`timm.create_model(...)` call that builds it is printed, and `--check` compares our classifier's
logits with timm's.

Files are read through localmim.backends.weights, which never runs code from a file (PyTorch
files with `weights_only=True`, allowing exactly `argparse.Namespace`; only floating-point tensors
besides relative_position_index) and is also the way in of both backends'
inference.load_pretrained. MindSpore is imported only for `.ckpt` files and torch only for `.pth`
files and `--check`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from localmim.backends.weights import (TORCH_EXTS, ConvertError, first_sentence, read_mindspore, read_pretrained,
                                       read_safetensors, read_state, read_torch, resolve_source, target_spec)
from localmim.core import keymaps, layouts
from localmim.core.files import write_atomically
from localmim.core.specs import ARCH_KEYS, SpecError, SwinSpec, ViTSpec, spec_to_arch
from localmim.core.state import StateError

__all__ = ["ConvertError", "add_arguments", "run", "main", "read_state", "write_state", "read_pretrained",
           "resolve_source", "output_format", "check_models", "parse_arch_options"]

FORMATS = ("pth", "ckpt", "safetensors", "timm")  # --to: a file format, or timm (= --layout timm-vit/timm-swin)
CHECK_TOLERANCE = 1e-4  # max abs feature difference accepted by --check (float32, two frameworks)


def output_format(dst: str, to: Optional[str]) -> str:
    """The file format, pth / ckpt / safetensors: --to when given (timm: .pth or .safetensors by
    DST's extension), else from DST's extension."""
    ext = os.path.splitext(dst)[1].lower()
    if to == "timm":
        if ext not in TORCH_EXTS + (".safetensors",):
            raise ConvertError(f"{dst}: timm output is written as .pth or .safetensors, not {ext or 'no extension'!r}")
        return "safetensors" if ext == ".safetensors" else "pth"
    if to:
        return to
    if ext in TORCH_EXTS:
        return "pth"
    if ext in (".ckpt", ".safetensors"):
        return ext[1:]
    raise ConvertError(f"{dst}: cannot tell the output format from {ext or 'no extension'!r}; pass --to "
                       f"{'|'.join(FORMATS)}")


def _write_torch(path: str, state: Dict[str, np.ndarray], header: Optional[Dict[str, object]]) -> None:
    """header None: a plain state dict (timm loads it strictly); else {"model": tensors, **header}."""
    import torch
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    torch.save(tensors if header is None else {"model": tensors, **header}, path)


def _write_mindspore(path: str, state: Dict[str, np.ndarray], strings: Dict[str, str]) -> None:
    try:
        import mindspore
    except ImportError:
        raise ConvertError(f"{path}: writing .ckpt files needs MindSpore, which is not installed "
                           f"(pip install 'localmim[mindspore]')") from None
    # A list of {"name", "data"}: saving a plain dict[str, Tensor] hits a MindSpore 2.10 bug.
    items = [{"name": k, "data": mindspore.Tensor(np.ascontiguousarray(v))} for k, v in state.items()]
    mindspore.save_checkpoint(items, path, append_dict={f"meta.{k}": v for k, v in strings.items()} or None)


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
                force: bool = False, layout: Optional[str] = None,
                arch: Optional[Dict[str, object]] = None) -> None:
    """Write `state` to `dst` atomically, verified bit for bit before it replaces anything.

    fmt: "pth", "ckpt" or "safetensors" ("timm" is "pth"). layout / arch: recorded in the file
    (pth: {"model": tensors, "layout", "arch"}, except the timm layouts, a plain state dict that
    timm loads strictly; safetensors: metadata strings "layout", "arch" (JSON) beside `metadata`;
    ckpt: `meta.layout`, `meta.arch` strings). The file is written beside dst under a temporary
    name, reloaded, compared, then renamed over dst (core.files.write_atomically); on any error the
    temporary file is removed and dst is untouched. An existing dst is refused unless `force`.
    """
    plain = layout in ("timm-vit", "timm-swin") or fmt == "timm"
    fmt = "pth" if fmt == "timm" else fmt
    if fmt not in layouts.FORMATS:
        raise ConvertError(f"unknown output format {fmt!r}; expected one of {', '.join(layouts.FORMATS)}")
    if os.path.exists(dst) and not force:
        raise ConvertError(f"{dst}: already exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ConvertError(f"{dst}: the folder {folder} does not exist")
    state = {k: np.ascontiguousarray(v) for k, v in state.items()}
    strings = dict(metadata)
    if layout is not None:
        strings["layout"] = layout
    if arch is not None:
        strings["arch"] = json.dumps(arch, sort_keys=True)
    if fmt == "pth":
        header = None if plain else {**({"layout": layout} if layout else {}), **({"arch": arch} if arch else {})}
        write, reader = (lambda tmp: _write_torch(tmp, state, header)), read_torch
    elif fmt == "ckpt":
        write, reader = (lambda tmp: _write_mindspore(tmp, state, strings)), read_mindspore
    else:
        write, reader = (lambda tmp: _write_safetensors(tmp, state, strings)), read_safetensors

    def write_verified(tmp: str) -> None:
        write(tmp)
        _verify(tmp, reader, state, dst)  # raising here leaves dst untouched

    write_atomically(dst, write_verified, suffix="." + fmt)


# ----------------------------------------------------------------------------------------------
# --check: run both sides on the same images and masks

_OURS_VIT = ("localmim-vit", "localmim-vit-encoder", "official-localmim-vit")


def _check_images(image: Optional[str], spec) -> np.ndarray:
    """(2, 3, S, S) float32 ImageNet-normalised: the given image resized (and its mirror), or two
    fixed synthetic images."""
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
            raise ConvertError(f"{image}: not a readable image ({first_sentence(exc)})") from None
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    one = ((rgb - mean) / std).astype(np.float32)
    return np.stack([one, one[:, :, ::-1]], 0).copy()


def _check_image(image: Optional[str], spec) -> np.ndarray:
    """The first of `_check_images`: (1, 3, S, S)."""
    return _check_images(image, spec)[:1]


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
    """Run the source weights and the written file on two images and one core mask each.

    Source: our torch model for LocalMIM layouts, a timm ViT for MAE / timm ViT layouts (decoder
    and head keys dropped). Destination: a timm ViT for the timm / MAE ViT layouts, our MindSpore
    model for .ckpt, our torch model otherwise. Swin (`spec` a SwinSpec): both sides mapped to the
    canonical state and run in LocalMIMSwin on a core plan of the 0.75 cell mask from
    mask_rng(0, 0, 0, 0). Returns (max abs difference of the compared features, loss difference
    or None when a side has no decoders).
    """
    dst_layout = dst_layout or layouts.detect_layout(read_state(dst_path)[0])
    try:
        if isinstance(spec, SwinSpec):
            return _check_swin(src_state, src_layout, dst_path, dst_layout, dst_fmt, spec, image)
        return _check_vit(src_state, src_layout, dst_path, dst_layout, dst_fmt, spec, image)
    except ImportError as exc:
        raise ConvertError(f"--check cannot run: {first_sentence(exc)}") from None


def _check_vit(src_state, src_layout, dst_path, dst_layout, dst_fmt, spec, image):
    from localmim.core.masking import mask_rng, vit_mask
    imgs = _check_images(image, spec)
    mask = vit_mask(mask_rng(0, 0, 0, 0), imgs.shape[0], spec.num_patches, 0.75)
    if src_layout in _OURS_VIT:
        src_taps, src_loss = _backend_run("torch", src_state, spec, imgs, mask.as_dict())
    else:
        src_taps, src_loss = [_timm_features(keymaps.mae_encoder_part(src_state), spec, imgs, mask.ids_keep)], None
    dst_state, _ = read_state(dst_path)
    if dst_layout not in _OURS_VIT:
        dst_taps, dst_loss = [_timm_features(keymaps.mae_encoder_part(dst_state), spec, imgs, mask.ids_keep)], None
    else:
        canon, _ = keymaps.to_canonical(dst_state, dst_layout, spec, dst_path)
        dst_taps, dst_loss = _backend_run("mindspore" if dst_fmt == "ckpt" else "torch",
                                          canon, spec, imgs, mask.as_dict())
    n = min(len(src_taps), len(dst_taps))
    feat = max(float(np.max(np.abs(a - b))) for a, b in zip(src_taps[-n:], dst_taps[-n:]))
    loss = abs(src_loss - dst_loss) if src_loss is not None and dst_loss is not None else None
    return feat, loss


def _check_swin(src_state, src_layout, dst_path, dst_layout, dst_fmt, spec, image):
    from localmim.core.masking import mask_rng, swin_cell_mask
    from localmim.core.swin_plan import build_swin_plan
    imgs = _check_images(image, spec)
    plan = build_swin_plan(spec, swin_cell_mask(mask_rng(0, 0, 0, 0), spec.mask_grid, 0.75))
    src = keymaps.swin_to_canonical(src_state, src_layout, spec, "source")
    dst_state, _ = read_state(dst_path)
    dst = keymaps.swin_to_canonical(dst_state, dst_layout, spec, dst_path)
    src_lat, src_loss = _backend_run("torch", src, spec, imgs, plan.to_arrays())
    dst_lat, dst_loss = _backend_run("mindspore" if dst_fmt == "ckpt" else "torch", dst, spec, imgs, plan.to_arrays())
    both_full = src_loss is not None and dst_loss is not None
    pairs = list(zip(src_lat, dst_lat)) if both_full else [(src_lat[-1], dst_lat[-1])]
    feat = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    return feat, (abs(src_loss - dst_loss) if both_full else None)


# ----------------------------------------------------------------------------------------------
# command line


class _ListLayouts(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(layouts.layout_table())
        print("\nEvery layout reads from .pth/.pt/.bin, .ckpt and .safetensors; --to timm is --layout "
              "timm-vit / timm-swin.")
        parser.exit(0)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    names = ", ".join(layouts.LAYOUTS)
    parser.add_argument("src", metavar="SRC", nargs="?", help="weights to read (.pth/.pt/.bin, .ckpt, .safetensors)")
    parser.add_argument("dst", metavar="DST", nargs="?", help="file to write")
    parser.add_argument("--list-layouts", action=_ListLayouts, help="list the layouts (read / write) and exit")
    parser.add_argument("--from", dest="src_layout", metavar="LAYOUT", default=None,
                        help=f"source layout (default: recorded in the file, else detected from the keys): {names}")
    parser.add_argument("--layout", dest="dst_layout", metavar="LAYOUT", default=None,
                        help="layout to write (default: this package's, or its encoder part when the source "
                             "has no decoders); see --list-layouts")
    parser.add_argument("--to", dest="fmt", choices=FORMATS, default=None,
                        help="output format (default: from DST's extension); timm = --layout timm-vit/timm-swin")
    parser.add_argument("--model", default=None,
                        help="registered model name (default: matched from the shapes, else inferred)")
    parser.add_argument("--arch", dest="arch", action="append", default=[], metavar="KEY=VALUE",
                        help="architecture the shapes cannot tell, e.g. num_heads=3, decoder_heads=4, "
                             "taps=[1,3,5,7], img_size=224 (a Swin encoder's); repeatable")
    parser.add_argument("--arch-file", default=None, metavar="FILE",
                        help="YAML/JSON file of the same keys, or a pretraining config (its model)")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="resample position tables for N-px images")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="Swin: resample relative-position tables for a W x W window")
    parser.add_argument("--check", nargs="?", const="", default=None, metavar="IMAGE",
                        help="run source and destination models on IMAGE (or synthetic images) and "
                             "print the largest feature difference")
    parser.add_argument("--force", action="store_true", help="overwrite an existing DST")
    return parser


def parse_arch_options(options: List[str], arch_file: Optional[str] = None) -> Dict[str, object]:
    """`--arch-file` then `--arch KEY=VALUE` options (values parsed as YAML) -> an arch dict."""
    import yaml
    out: Dict[str, object] = {}
    if arch_file:
        try:
            with open(arch_file, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise ConvertError(f"{arch_file}: not a readable YAML/JSON file ({first_sentence(exc)})") from None
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            from localmim.core import config as core_config
            try:
                data = spec_to_arch(core_config.load_config(arch_file).build_spec())
            except (core_config.ConfigError, SpecError) as exc:
                raise ConvertError(f"{arch_file}: {first_sentence(exc)}") from None
        if not isinstance(data, dict):
            raise ConvertError(f"{arch_file}: expected a mapping of architecture keys")
        out.update(data)
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or not key:
            raise ConvertError(f"--arch {option!r}: expected KEY=VALUE, e.g. --arch num_heads=3")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConvertError(f"--arch {option!r}: the value is not valid YAML") from None
    known = set(ARCH_KEYS["vit"]) | set(ARCH_KEYS["swin"]) | {"family"}
    unknown = sorted(k for k in out if k not in known)
    if unknown:
        raise ConvertError(f"unknown architecture key(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'family'}))}")
    return out


def _dst_layout(fmt_option: Optional[str], src_layout: str, state, requested: Optional[str], fmt: str) -> str:
    """The layout to write: --layout when given, else timm for --to timm, else ours (the encoder
    part only when the source has no decoders); checked against the family and the format."""
    family = layouts.LAYOUT_INFO[src_layout].family
    timm = "timm-swin" if family == "swin" else "timm-vit"
    if requested is not None:
        layouts.check_layout_name(requested, "destination layout")
    if fmt_option == "timm":
        if requested not in (None, timm):
            raise ConvertError(f"--to timm writes the {timm} layout, not {requested!r}")
        requested = timm
    if requested is None:
        has_heads = any(k.startswith("decoder.") for k in state)
        requested = f"localmim-{family}" + ("" if has_heads and src_layout.startswith(("localmim", "official"))
                                            else "-encoder")
    info = layouts.LAYOUT_INFO[requested]
    if info.family != family:
        raise ConvertError(f"--layout {requested} does not fit a {'Swin' if family == 'swin' else 'ViT'} "
                           f"source ({src_layout})")
    if fmt not in info.writes:
        raise ConvertError(f"the {requested} layout is written as {' or '.join('.' + f for f in info.writes)}, "
                           f"not .{fmt}")
    return requested


def _require_paths(args) -> None:
    if not args.src or not args.dst:
        raise ConvertError("SRC and DST are required (or --list-layouts)")


def _convert(args) -> int:
    _require_paths(args)
    src, dst = args.src, args.dst
    for name, role in ((args.src_layout, "source layout"), (args.dst_layout, "destination layout")):
        if name is not None:
            layouts.check_layout_name(name, role)
    fmt = output_format(dst, args.fmt)
    if os.path.exists(dst) and not args.force:
        raise ConvertError(f"{dst}: already exists; pass --force to overwrite it")
    arch = parse_arch_options(list(getattr(args, "arch", []) or []), getattr(args, "arch_file", None))
    state, meta = read_state(src)
    finetuned = _finetune_config(meta, src)
    if finetuned is not None:
        return _export_classifier(args, state, finetuned, fmt)
    layout, spec, spec_notes = resolve_source(state, meta, src, layout=args.src_layout, name=args.model, arch=arch)
    target = target_spec(spec, getattr(args, "img_size", None), getattr(args, "window", None), src)
    out_layout = _dst_layout(args.fmt, layout, state, args.dst_layout, fmt)
    out, notes = keymaps.convert_state(state, layout, out_layout, spec, what=src, dst_spec=target)
    print(f"source {src}: layout {layout}, {len(state)} keys")
    for line in spec_notes[1:] + notes:
        print(f"  {line}")
    write_state(dst, out, fmt, {"model": target.name, "source_layout": layout}, force=args.force,
                layout=out_layout, arch=spec_to_arch(target))
    print(f"wrote {dst}: {fmt}, layout {out_layout}, {len(out)} keys, verified")
    if args.check is not None:
        if target != spec:  # the resampled canonical state is the reference the file must reproduce
            canon, _ = keymaps.to_canonical(state, layout, spec, src)
            from localmim.core.resample import resample_state
            ref, ref_layout = resample_state(canon, spec, target)[0], f"localmim-{target.family}"
        else:
            ref, ref_layout = state, layout
        feat, loss = check_models(ref, ref_layout, dst, fmt, target, args.check or None, dst_layout=out_layout)
        print(f"check: encoder features max abs diff {feat:.3e}")
        if loss is not None:
            print(f"check: loss abs diff {loss:.3e}")
        if feat > CHECK_TOLERANCE or (loss is not None and loss > CHECK_TOLERANCE):
            print(f"localmim convert: error: --check differences exceed {CHECK_TOLERANCE:g}", file=sys.stderr)
            return 1
    return 0


def _finetune_config(meta: Dict[str, object], path: str):
    """The FinetuneConfig a fine-tuned checkpoint carries (its config has a `mixup` section), else None."""
    config = meta.get("config")
    if not isinstance(config, dict) or "mixup" not in config:
        return None
    from localmim.core import config as core_config
    try:
        return core_config.config_from_dict(dict(config), where=f"{path} config", kind="finetune")
    except core_config.ConfigError as exc:
        raise ConvertError(f"{path}: its fine-tuning config is not valid: {first_sentence(exc)}") from None


def timm_create_call(kwargs: Dict[str, object]) -> str:
    """The Python call that builds the timm model of `kwargs` (core.classifier.timm_classifier_kwargs)."""
    kw = dict(kwargs)
    name = kw.pop("model_name")
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return f"timm.create_model({name!r}, {args}, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))"


def _export_classifier(args, state: Dict[str, np.ndarray], cfg, fmt: str) -> int:
    """A fine-tuned classifier -> timm's state dict with the head (only `--to timm`)."""
    from localmim.core import classifier
    src, dst = args.src, args.dst
    if args.fmt != "timm" or args.dst_layout is not None:
        raise ConvertError(f"{src} is a fine-tuned classifier: it exports with --to timm (the other layouts hold "
                           f"pretraining encoders)")
    spec, pool = cfg.build_spec(), cfg.model.global_pool
    out = classifier.timm_classifier_state(state, spec, pool, what=src)
    kwargs = classifier.timm_classifier_kwargs(spec, state["head.weight"].shape[0], pool)
    print(f"source {src}: fine-tuned {spec.name} classifier, global_pool {pool}, {len(state)} keys")
    write_state(dst, out, fmt, {"model": spec.name, "source_layout": "localmim-classifier"}, force=args.force,
                layout=f"timm-{spec.family}")
    print(f"wrote {dst}: {fmt}, timm {kwargs['model_name']} with its head, {len(out)} keys, verified")
    print(f"build it with: {timm_create_call(kwargs)}")
    if args.check is not None:
        diff = check_classifier(state, dst, spec, pool, kwargs, args.check or None)
        print(f"check: logits max abs diff {diff:.3e}")
        if diff > CHECK_TOLERANCE:
            print(f"localmim convert: error: --check differences exceed {CHECK_TOLERANCE:g}", file=sys.stderr)
            return 1
    return 0


def check_classifier(state: Dict[str, np.ndarray], dst_path: str, spec, pool: str, kwargs: Dict[str, object],
                     image: Optional[str] = None) -> float:
    """Max abs difference of the logits of our torch classifier (`state`) and of the timm model
    `kwargs` builds, loaded strictly from the written file, on two images."""
    try:
        import functools
        import timm
        import torch
    except ImportError as exc:
        raise ConvertError(f"--check cannot run: {first_sentence(exc)}") from None
    from localmim.backends.torch.finetune import CLASSIFIERS
    ours = CLASSIFIERS[spec.family][0](spec, int(kwargs["num_classes"]), pool)
    ours.import_state(state)
    kw = dict(kwargs)
    ref = timm.create_model(kw.pop("model_name"), norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **kw)
    ref.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in read_state(dst_path)[0].items()}, strict=True)
    imgs = torch.from_numpy(_check_images(image, spec))
    with torch.no_grad():
        return float((ours.eval()(imgs) - ref.eval()(imgs)).abs().max())


def run(args) -> int:
    """Run the conversion for parsed `args`; returns the exit code (0 ok, 2 bad input)."""
    try:
        return _convert(args)
    except (ConvertError, StateError, SpecError) as exc:
        print(f"localmim convert: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="localmim convert", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
