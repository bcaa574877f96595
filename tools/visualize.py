"""`localmim visualize`: a checkpoint's multi-scale reconstructions of one image, as a PNG.

    localmim visualize --checkpoint output/demo/checkpoint-300.pth --image cat.png --output rec.png

The figure has a header row (original | masked input) and one row per branch, finest scale
first. HOG rows show target | prediction: cells are drawn with a colour code (hue = dominant edge
orientation, brightness = how concentrated the histogram is) and, where cells are large enough,
one orientation glyph per bin and colour channel (red, green, blue glyphs for the R, G, B
histograms; a glyph is drawn along the edge, i.e. at the gradient angle + 90 degrees, its length
proportional to the bin value); cells that were visible to the encoder (not in the loss) are
dimmed. Pixel rows show the prediction as an image (de-normalised: norm_pix predictions with
each cell's own mean and std taken from the original image, as MAE's figures do, then the
ImageNet statistics undone) in the hidden patches, the visible ones grey | the same with the
visible patches of the original pasted back, as MAE's figures do.

The rendering (`render_reconstruction`) is pure numpy + PIL; `model_figure` (a model's figure of
one image), `visualize_checkpoint` / `run` and `training_figure` (the TensorBoard figure hook the
engines hand to backends/loop.py) reach a backend through
`localmim.backends.<fw>.inference.load_model / reconstruct`.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from localmim.core.files import write_atomically

__all__ = [
    "add_arguments", "run", "visualize_checkpoint", "render_reconstruction", "render_hog",
    "render_pixels", "denormalize_pixels", "paste_visible", "masked_input", "model_figure", "training_figure", "load_image", "normalize_image", "backend_for_checkpoint",
    "save_png", "unpatchify", "bin_angle", "VisualizeError", "IMAGENET_MEAN", "IMAGENET_STD",
]



class VisualizeError(ValueError):
    """Bad input to `localmim visualize` (unreadable image, unknown checkpoint type, bad ratio)."""


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

PANEL_MIN = 256          # px; panels are the image size times the smallest integer reaching this
GLYPH_MIN_CELL = 12      # px; smaller cells get the colour code only
VISIBLE_DIM = 0.3        # brightness factor of cells the encoder saw (not in the loss)
MASK_GREY = 96           # grey of hidden patches in the masked input
MARGIN = 8
LABEL_H = 14
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


# ----------------------------------------------------------------------------------------------
# Images in and out

def load_image(path: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: shorter side resized to `size` (bicubic), then centre-cropped.

    Grayscale, palette, RGBA and CMYK files are converted to RGB. A missing file raises
    FileNotFoundError, an unreadable one VisualizeError, each naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise VisualizeError(f"image {path!r} cannot be read as an image ({' '.join(str(e).split())})") from None
    w, h = rgb.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    rgb = rgb.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)


def normalize_image(image: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 -> (1, 3, S, S) float32, ImageNet-normalised."""
    x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def save_png(figure: np.ndarray, path: str) -> str:
    """Write an (H, W, 3) uint8 array as PNG atomically (core.files.write_atomically)."""
    from PIL import Image

    return write_atomically(path, lambda tmp: Image.fromarray(figure).save(tmp, format="PNG"), suffix=".png")


# ----------------------------------------------------------------------------------------------
# Cell geometry helpers

def _grid_of(tokens: int, what: str) -> int:
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise ValueError(f"{what}: {tokens} tokens do not form a square grid")
    return g


def _upsample(cells: np.ndarray, factor: int) -> np.ndarray:
    """(g, g, ...) -> (g*factor, g*factor, ...) by repetition."""
    return np.repeat(np.repeat(cells, factor, axis=0), factor, axis=1)


def _panel_scale(img_size: int) -> int:
    return max(1, -(-PANEL_MIN // img_size))


def _cell_brightness(mask_k: np.ndarray, grid: int) -> np.ndarray:
    """(g, g) factor in [VISIBLE_DIM, 1]: 1 for masked cells, dimmed for visible ones (fractional
    masks at the coarsest ViT scale blend)."""
    m = np.clip(np.asarray(mask_k, dtype=np.float32).reshape(grid, grid), 0.0, 1.0)
    return VISIBLE_DIM + (1.0 - VISIBLE_DIM) * m


# ----------------------------------------------------------------------------------------------
# HOG rendering

def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; all inputs in [0, 1], output (..., 3) float in [0, 1]."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(h.shape + (3,), dtype=np.float32)
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        out[sel] = np.stack([r[sel], g[sel], b[sel]], axis=-1)
    return out


def _hog_cells(features: np.ndarray, nbins: int) -> np.ndarray:
    """(L, 3*nbins) features -> (L, 3, nbins), negatives clipped, each channel L2-normalised.

    Predictions are unnormalised regressions, so they are put on the targets' scale first.
    """
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2 or f.shape[1] != 3 * nbins:
        raise ValueError(f"HOG features of shape {f.shape} do not match 3 x {nbins} bins")
    h = np.clip(f.reshape(f.shape[0], 3, nbins), 0.0, None)
    norm = np.sqrt((h ** 2).sum(-1, keepdims=True))
    return h / np.maximum(norm, 1e-12)


def bin_angle(b: int, nbins: int) -> float:
    """Centre of HOG bin b in radians, in the reference's unsigned convention [0, pi)."""
    return (b + 0.5) * math.pi / nbins


def _edge_direction(theta: float) -> Tuple[float, float]:
    """(dx, dy) unit vector of the edge for gradient orientation `theta` (image y points down).

    The reference measures theta = atan2(-Gx, -Gy) (docs/method.md#hog-targets); modulo pi an x ramp
    gives pi/2, a y ramp 0. The edge runs perpendicular to the gradient, along (cos theta, -sin
    theta).
    """
    return math.cos(theta), -math.sin(theta)


def render_hog(features: np.ndarray, nbins: int, size: int, brightness: Optional[np.ndarray] = None) -> np.ndarray:
    """One HOG panel: (L, 3*nbins) -> (size, size, 3) uint8.

    Colour code per cell: hue = dominant orientation (summed over R, G, B), value = how peaked the
    histogram is (flat cells are black). Cells of at least GLYPH_MIN_CELL px also get glyphs.
    brightness: optional (g, g) factor per cell (masking).
    """
    from PIL import Image, ImageDraw

    h = _hog_cells(features, nbins)
    g = _grid_of(h.shape[0], "HOG features")
    cell = size // g
    if cell < 1:
        raise ValueError(f"a {size}-px panel cannot show a {g}x{g} grid")
    total = h.sum(1)                                                   # (L, nbins)
    mass = total.sum(-1)
    dominant = total.argmax(-1)
    peak = total.max(-1) / np.maximum(mass, 1e-12)
    coherence = np.clip((peak - 1.0 / nbins) / (1.0 - 1.0 / nbins) * 2.0, 0.0, 1.0)
    value = np.where(mass > 1e-6, 0.35 + 0.65 * coherence, 0.0)
    hue = (dominant + 0.5) / nbins
    colour = _hsv_to_rgb(hue, np.full_like(hue, 0.85), value).reshape(g, g, 3)
    glyphs = cell >= GLYPH_MIN_CELL
    if glyphs:
        colour = colour * 0.45
    panel = _upsample(colour, cell)
    if glyphs:
        layers = [Image.new("L", (g * cell, g * cell), 0) for _ in range(3)]
        draws = [ImageDraw.Draw(layer) for layer in layers]
        half = 0.5 * (cell - 2)
        dirs = [_edge_direction(bin_angle(b, nbins)) for b in range(nbins)]
        cell_max = h.reshape(h.shape[0], -1).max(-1)
        for idx in np.nonzero(cell_max > 1e-6)[0]:
            r, c = divmod(int(idx), g)
            cx, cy = (c + 0.5) * cell, (r + 0.5) * cell
            for ch in range(3):
                for b in range(nbins):
                    rel = h[idx, ch, b] / cell_max[idx]
                    if rel < 0.1:
                        continue
                    dx, dy = dirs[b]
                    ln = half * rel
                    draws[ch].line([(cx - dx * ln, cy - dy * ln), (cx + dx * ln, cy + dy * ln)],
                                   fill=int(80 + 175 * rel), width=1)
        lines = np.stack([np.asarray(layer, dtype=np.float32) / 255.0 for layer in layers], -1)
        panel = np.maximum(panel, lines)
    if brightness is not None:
        panel = panel * _upsample(brightness, cell)[..., None]
    return _fit(panel, size)


# ----------------------------------------------------------------------------------------------
# Pixel rendering

def unpatchify(tokens: np.ndarray, grid: int, cell: int) -> np.ndarray:
    """(g*g, cell*cell*3) tokens, each (row, col, channel) flattened (MAE) -> (g*cell, g*cell, 3)."""
    t = np.asarray(tokens, dtype=np.float32).reshape(grid, grid, cell, cell, 3)
    return t.transpose(0, 2, 1, 3, 4).reshape(grid * cell, grid * cell, 3)


def render_pixels(tokens: np.ndarray, size: int, norm_pix: bool = True,
                  brightness: Optional[np.ndarray] = None) -> np.ndarray:
    """One pixel-target panel without the original image: (L, 3*c*c) -> (size, size, 3) uint8.

    norm_pix targets (and their predictions) have no absolute brightness, so each cell is stretched
    from its own min..max to 0..1; plain targets are un-normalised with the ImageNet statistics.
    (With the original image at hand, `denormalize_pixels` gives norm_pix cells their true scale.)
    """
    t = np.asarray(tokens, dtype=np.float32)
    g, cell = _pixel_grid(t)
    cells = t.reshape(g * g, cell * cell * 3)
    if norm_pix:
        lo, hi = cells.min(1, keepdims=True), cells.max(1, keepdims=True)
        cells = (cells - lo) / np.maximum(hi - lo, 1e-6)
    else:
        cells = (cells.reshape(-1, cell * cell, 3) * IMAGENET_STD + IMAGENET_MEAN).reshape(cells.shape)
    img = np.clip(unpatchify(cells, g, cell), 0.0, 1.0)
    if brightness is not None:
        img = img * _upsample(brightness, cell)[..., None]
    return _fit(img, size)


def _pixel_grid(tokens: np.ndarray) -> Tuple[int, int]:
    """(grid, cell) of (g*g, 3*c*c) pixel tokens."""
    g = _grid_of(tokens.shape[0], "pixel tokens")
    cell = math.isqrt(tokens.shape[1] // 3)
    if 3 * cell * cell != tokens.shape[1]:
        raise ValueError(f"pixel tokens of width {tokens.shape[1]} are not 3 x c x c values")
    return g, cell


def denormalize_pixels(tokens: np.ndarray, image: np.ndarray, norm_pix: bool) -> np.ndarray:
    """Pixel tokens (predictions or targets) as an image: (L, 3*c*c) -> (S, S, 3) float in [0, 1].

    image: the original (S, S, 3) uint8. norm_pix tokens are first scaled back with the mean and
    the unbiased std (+1e-6 under the root, core.targets.normalize_pixels) of the same cell of the
    ImageNet-normalised original; then the ImageNet normalisation is undone. A norm_pix target
    comes back as the original image (to rounding).
    """
    t = np.asarray(tokens, dtype=np.float64)
    g, cell = _pixel_grid(t)
    if g * cell != image.shape[0]:
        raise ValueError(f"{g}x{g} cells of {cell} px do not cover a {image.shape[0]}-px image")
    if norm_pix:
        ref = _patch_tokens(normalize_image(image)[0].transpose(1, 2, 0).astype(np.float64), cell)
        mean = ref.mean(-1, keepdims=True)
        std = np.sqrt(ref.var(-1, ddof=1, keepdims=True) + 1e-6)
        t = t * std + mean
    img = unpatchify(t.astype(np.float32), g, cell) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(img, 0.0, 1.0)


def _patch_tokens(img: np.ndarray, cell: int) -> np.ndarray:
    """(S, S, 3) -> (g*g, cell*cell*3) in unpatchify's order (inverse of `unpatchify`)."""
    g = img.shape[0] // cell
    return img.reshape(g, cell, g, cell, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, cell * cell * 3)


def paste_visible(recon: np.ndarray, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(S, S, 3) float [0, 1] reconstruction with the patches the encoder saw (mask (N,) on the
    model's mask grid, 0 = visible) replaced by `image`'s pixels ((S, S, 3) uint8, or float in
    [0, 1])."""
    s = image.shape[0]
    g = _grid_of(np.asarray(mask).size, "mask")
    hidden = _upsample(np.asarray(mask, dtype=np.float32).reshape(g, g) > 0.5, s // g)
    out = np.array(image, dtype=np.float32) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)
    out[hidden] = recon[hidden]
    return out


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """float [0, 1] (h, w, 3) -> uint8 (size, size, 3), nearest-neighbour so cells stay crisp."""
    from PIL import Image

    out = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if out.shape[:2] != (size, size):
        out = np.asarray(Image.fromarray(out).resize((size, size), Image.NEAREST))
    return out


# ----------------------------------------------------------------------------------------------
# The figure

def masked_input(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 with hidden patches (mask (N,) on the patch grid, 1 = hidden) greyed out."""
    img = np.asarray(image, dtype=np.uint8)
    s = img.shape[0]
    g = _grid_of(np.asarray(mask).size, "mask")
    if s % g:
        raise ValueError(f"a {g}x{g} mask does not tile a {s}-px image")
    hidden = _upsample(np.asarray(mask, dtype=np.float32).reshape(g, g) > 0.5, s // g)
    out = img.copy()
    out[hidden] = MASK_GREY
    return out


def render_reconstruction(image: np.ndarray, mask: np.ndarray, targets: Sequence[np.ndarray],
                          preds: Sequence[np.ndarray], masks: Sequence[np.ndarray], spec) -> np.ndarray:
    """The whole figure as (H, W, 3) uint8 RGB.

    image: (S, S, 3) uint8, S = spec.img_size. mask: (N,) on the model's mask grid (ViT patches,
    Swin mask cells), 1 = hidden. targets, preds: per branch (L_k, C_k) (a leading batch axis of 1
    is dropped). masks: per branch (L_k,) loss weights, 1 = masked. spec: ViTSpec / SwinSpec (its
    `target` says HOG or pixel, `img_size`, `branches()` the scale of each row).
    """
    from PIL import Image, ImageDraw

    image = np.asarray(image)
    size = int(spec.img_size)
    if image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be ({size}, {size}, 3) uint8, got {image.shape} {image.dtype}")
    if not (len(targets) == len(preds) == len(masks)):
        raise ValueError(f"got {len(targets)} targets, {len(preds)} predictions and {len(masks)} masks")
    panel = size * _panel_scale(size)
    kind, nbins = spec.target.kind, spec.target.nbins
    branches = list(spec.branches()) if hasattr(spec, "branches") else [None] * len(targets)

    rows: List[Tuple[Tuple[str, np.ndarray], Tuple[str, np.ndarray]]] = []
    ratio = float(np.mean(np.asarray(mask, dtype=np.float32) > 0.5))
    rows.append((("original", _fit(image / 255.0, panel)),
                 (f"masked input ({ratio:.0%} hidden)", _fit(masked_input(image, mask) / 255.0, panel))))
    for k, (t, p, m) in enumerate(zip(targets, preds, masks)):
        t, p, m = (np.asarray(a)[0] if np.asarray(a).ndim == n + 1 else np.asarray(a)
                   for a, n in ((t, 2), (p, 2), (m, 1)))
        if t.shape != p.shape or m.shape != (t.shape[0],):
            raise ValueError(f"branch {k}: target {t.shape}, prediction {p.shape} and mask {m.shape} disagree")
        g = _grid_of(t.shape[0], f"branch {k}")
        light = _cell_brightness(m, g)
        b = branches[k] if k < len(branches) else None
        scale = f"scale {b.scale:g}, " if b is not None and getattr(spec, "family", "") == "vit" else ""
        name = f"branch {k} ({scale}{g}x{g} cells of {size // g}px)"
        if kind == "hog":
            rows.append(((f"{name}: target", render_hog(t, nbins, panel, light)),
                         ("prediction", render_hog(p, nbins, panel, light))))
        else:
            pred = denormalize_pixels(p, image, bool(spec.target.norm_pix))
            grey = np.full_like(pred, MASK_GREY / 255.0)
            rows.append(((f"{name}: prediction", _fit(paste_visible(pred, grey, mask), panel)),
                         ("+ visible patches", _fit(paste_visible(pred, image, mask), panel))))

    if kind == "hog":
        legend = ("HOG: hue = edge orientation, brightness = its strength; glyphs R/G/B per channel. "
                  "Dimmed: visible to the encoder (not in the loss).")
    else:
        legend = ("Pixels" + (" (each cell at the original's mean and std)" if spec.target.norm_pix else "")
                  + ": what the model predicts where it saw nothing; grey: patches the encoder saw (not "
                  "in the loss).")
    width = 3 * MARGIN + 2 * panel
    height = MARGIN + len(rows) * (LABEL_H + panel + MARGIN) + 2 * LABEL_H
    fig = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    y = MARGIN
    for row in rows:
        for col, (label, arr) in enumerate(row):
            x = MARGIN + col * (panel + MARGIN)
            draw.text((x, y), label, fill=TEXT)
            fig.paste(Image.fromarray(arr), (x, y + LABEL_H))
        y += LABEL_H + panel + MARGIN
    for i, line in enumerate(_wrap(legend, width - 2 * MARGIN)):
        draw.text((MARGIN, y + i * LABEL_H), line, fill=TEXT)
    return np.asarray(fig, dtype=np.uint8)


def _wrap(text: str, width_px: int, char_px: int = 6) -> List[str]:
    """Split `text` into at most two lines that fit `width_px` with the default bitmap font."""
    per_line = max(10, width_px // char_px)
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > per_line and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return lines[:2]


# ----------------------------------------------------------------------------------------------
# Command

def backend_for_checkpoint(path: str, backend: str = "auto") -> str:
    """'torch' for .pth, 'mindspore' for .ckpt, or the explicit `backend`."""
    if backend != "auto":
        return backend
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pth", ".pt"):
        return "torch"
    if ext == ".ckpt":
        return "mindspore"
    raise VisualizeError(f"checkpoint {path!r}: cannot tell the backend from the extension {ext!r} "
                     f"(.pth = torch, .ckpt = mindspore); pass --backend")


def _mask_for(spec, seed: int, ratio: float):
    """(mask object for the backend, (N,) float mask on the model's mask grid)."""
    from localmim.core import masking

    rng = masking.mask_rng(seed, 0, 0, 0)
    if getattr(spec, "family", "vit") == "swin":
        cells = masking.swin_cell_mask(rng, spec.mask_grid, ratio)
        return cells, cells.astype(np.float32)
    vm = masking.vit_mask(rng, 1, spec.num_patches, ratio)
    return vm, vm.mask[0]


def model_figure(inference, model, spec, image: np.ndarray, seed: int = 0, mask_ratio: float = 0.75) -> np.ndarray:
    """The reconstruction figure (H, W, 3) uint8 of `image` ((S, S, 3) uint8, S = spec.img_size)
    under the mask of `seed`, from a backend's inference module and a model of it."""
    mask_obj, grid_mask = _mask_for(spec, seed, mask_ratio)
    out = inference.reconstruct(model, normalize_image(image), mask_obj)
    return render_reconstruction(image, grid_mask, [t[0] for t in out["targets"]],
                                 [p[0] for p in out["preds"]], [m[0] for m in out["masks"]], spec)


def training_figure(backend: str, model, cfg):
    """The figure hook of backends/loop.py for TensorBoard: step -> model_figure of the first image of
    cfg.data.path (find_images order, centre crop) under the mask of train.seed, drawn from the
    model as it is at that step."""
    from localmim.backends.images import find_images
    from localmim.tools.cli import import_backend_module

    inference = import_backend_module(backend, "inference")
    spec = model.spec
    image = load_image(find_images(cfg.data.path)[0][0], spec.img_size)
    return lambda step: model_figure(inference, model, spec, image, int(cfg.train.seed), float(cfg.mask.ratio))


def visualize_checkpoint(checkpoint: str, image_path: str, output: str, seed: int = 0,
                         backend: str = "auto", mask_ratio: float = 0.75) -> str:
    """Load `checkpoint`, reconstruct `image_path` under a seeded mask, write the figure to `output`."""
    from localmim.tools.cli import import_backend_module

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    if not 0.0 < mask_ratio < 1.0:
        raise VisualizeError(f"--mask-ratio {mask_ratio} must lie in (0, 1)")
    inference = import_backend_module(backend_for_checkpoint(checkpoint, backend), "inference")
    model, spec = inference.load_model(checkpoint)
    image = load_image(image_path, spec.img_size)
    return save_png(model_figure(inference, model, spec, image, seed, mask_ratio), output)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="training checkpoint (.pth or .ckpt)")
    parser.add_argument("--image", required=True, metavar="IMG", help="image file to reconstruct")
    parser.add_argument("--output", required=True, metavar="PNG", help="where to write the figure")
    parser.add_argument("--seed", type=int, default=0, help="mask seed (default 0)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="share of hidden patches (default 0.75)")
    parser.add_argument("--backend", choices=("auto", "torch", "mindspore"), default="auto",
                        help="auto: from the checkpoint extension (.pth torch, .ckpt mindspore)")


def run(args: argparse.Namespace) -> int:
    path = visualize_checkpoint(args.checkpoint, args.image, args.output, args.seed, args.backend,
                                args.mask_ratio)
    print(path)
    return 0
