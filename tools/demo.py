"""`localmim demo`: train the small demo model on the bundled photographs, then show what it learned.

    localmim demo                      # vit_demo, pixel targets, on the CPU
    localmim demo --target hog         # the same model with HOG targets
    localmim demo --model swin --backend mindspore --max-steps 100

Trains with configs/pretrain/demo_vit.yaml (or demo_swin.yaml) on the sample photographs
(`tools.sample_images`) less the held-out ones (`tools.heldout.HELD_OUT_PHOTOS`, every tile
included), then, from the last checkpoint:

- prints the first and the last logged training loss;
- draws the reconstructions of a held-out photograph (the coffee cup) into <output>/reconstruction.png;
- draws log.jsonl into <output>/loss.png (`localmim plot`);
- prints, last, the masked-region loss on the held-out images against the loss of predicting each
  image's mean target (`tools.heldout`): `held-out masked loss: 0.1234 (predicting the mean: 0.2345)`.

With --data DIR the model trains on DIR and is measured on the bundled held-out photographs
(which DIR should then not contain). Re-running with the same --output resumes from the last
checkpoint there. The torch backend runs with max(1, cores - data.num_workers) threads unless
OMP_NUM_THREADS is set: on 2 cores, one compute thread beside one loader process (oversubscribed
OpenMP threads made steps over ten times slower on a busy 2-core machine).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time
from typing import List, Optional, Tuple

from localmim.tools.cli import add_common_arguments, config_from_args, import_backend_module, resolve_data_path

__all__ = ["add_arguments", "run", "read_losses", "latest_checkpoint", "pick_image", "demo_data",
           "compute_threads"]

PREFERRED_IMAGE = "coffee.png"     # held out; its cup, saucer and table show the reconstruction best
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("vit", "swin"), default="vit",
                        help="demo model: vit (vit_demo) or swin (swin_demo); default vit")
    parser.add_argument("--target", choices=("pixel", "hog"), default=None,
                        help="reconstruction target (sets target.kind); default: the config's (pixel)")
    parser.add_argument("--seed", type=int, default=0, help="mask seed of the figure and the held-out masks")
    add_common_arguments(parser, config_note="default demo_vit or demo_swin, following --model")


def read_losses(log_path: str) -> List[Tuple[int, float]]:
    """(step, loss) of every line of a log.jsonl, in file order; unreadable lines are skipped."""
    out = []
    if not os.path.isfile(log_path):
        return out
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                out.append((int(row["step"]), float(row["loss"])))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def latest_checkpoint(folder: str) -> Optional[str]:
    """The checkpoint-<step>.pth / .ckpt with the highest step in `folder`, or None."""
    best, best_step = None, -1
    for path in glob.glob(os.path.join(folder, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)\.(pth|ckpt)", os.path.basename(path))
        if m and int(m.group(1)) > best_step:
            best, best_step = path, int(m.group(1))
    return best


def pick_image(folder: str) -> str:
    """The demo's reconstruction image: PREFERRED_IMAGE when present, else the first image by name."""
    preferred = os.path.join(folder, PREFERRED_IMAGE)
    if os.path.isfile(preferred):
        return preferred
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTS):
                return os.path.join(root, name)
    raise FileNotFoundError(f"data folder {folder!r} holds no image files")


def demo_data(cfg) -> Tuple[str, List[str]]:
    """(training folder, held-out image paths); sets cfg.data.path to the training folder.

    data.path null: the sample photographs split by tools.heldout.split_sample_images. Otherwise
    cfg.data.path itself, measured on the bundled held-out photographs ([] without scikit-image).
    """
    from localmim.tools import heldout
    from localmim.tools.sample_images import SampleImagesUnavailable, sample_image_dir

    if cfg.data.path is None:
        train, held = heldout.split_sample_images(sample_image_dir())
        cfg.data.path = train
        return resolve_data_path(cfg), held
    data = resolve_data_path(cfg)
    try:
        _, held = heldout.split_sample_images(sample_image_dir())
    except SampleImagesUnavailable:
        held = []
    return data, held


def compute_threads(num_workers: int, cores: Optional[int] = None) -> int:
    """Compute threads beside `num_workers` loader processes on `cores` cores (default: all)."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, cores - max(0, int(num_workers)))


def _drawing_unavailable(backend: str) -> Optional[str]:
    """Why the backend cannot draw reconstructions (its inference module is missing), or None."""
    from localmim.tools.cli import BackendUnavailable

    try:
        import_backend_module(backend, "inference")
    except BackendUnavailable as e:
        return str(e)
    return None


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def _print_losses(out: str) -> None:
    losses = read_losses(os.path.join(out, "log.jsonl"))
    if losses:
        (s0, l0), (s1, l1) = losses[0], losses[-1]
        trend = "falling" if l1 < l0 else "not falling"
        print(f"loss: {l0:.4f} at step {s0} -> {l1:.4f} at step {s1} ({trend})")
    else:
        print("loss: no logged steps in", os.path.join(out, "log.jsonl"))


def _plot(out: str) -> None:
    from localmim.tools.plot import PlotError, plot_run

    try:
        print(f"loss plot: {plot_run(out)}")
    except PlotError as e:
        print(f"loss plot: not drawn ({e})")


def _verdict(ratio: float) -> str:
    if ratio <= 0.7:
        return "the model predicts the hidden regions from what it sees"
    if ratio < 0.95:
        return "the model beats the mean a little; more steps help (--max-steps)"
    return "no better than the mean yet; train longer (--max-steps)"


def run(args: argparse.Namespace) -> int:
    from localmim.tools import heldout
    from localmim.tools.pretrain import pretrain
    from localmim.tools.visualize import load_image, model_figure, save_png

    start = time.perf_counter()
    cfg = config_from_args(args, default_config=f"demo_{args.model}")
    if args.target is not None:
        cfg.target.kind = args.target
    data, held = demo_data(cfg)
    out = cfg.train.output_dir
    print(f"localmim demo: {cfg.model.name} ({cfg.target.kind} targets) on {data} "
          f"({len(held)} held-out images), {cfg.train.max_steps or 'all'} steps, backend {args.backend}, "
          f"output {out}", flush=True)
    if args.backend == "torch":
        os.environ.setdefault("OMP_NUM_THREADS", str(compute_threads(cfg.data.num_workers)))
    import_backend_module(args.backend, "engine")            # fail before anything else if unavailable
    no_drawing = _drawing_unavailable(args.backend)
    if no_drawing:
        print(f"localmim demo: training only, no reconstruction figure: {no_drawing}", flush=True)
    result = pretrain(cfg, args.backend)
    trained = time.perf_counter() - start
    _print_losses(out)
    _plot(out)
    if no_drawing:
        return 0
    ckpt = result.get("checkpoint") or latest_checkpoint(out)
    if not ckpt or not os.path.isfile(ckpt):
        print(f"localmim demo: no checkpoint in {out}, so no reconstruction was drawn")
        return 1
    inference = import_backend_module(args.backend, "inference")
    model, spec = inference.load_model(ckpt)
    shown = next((p for p in held if os.path.basename(p) == PREFERRED_IMAGE), None) or pick_image(data)
    figure = model_figure(inference, model, spec, load_image(shown, spec.img_size), args.seed, cfg.mask.ratio)
    print(f"reconstruction of {os.path.basename(shown)}{' (held out)' if shown in held else ''}: "
          f"{save_png(figure, os.path.join(out, 'reconstruction.png'))}")
    print(f"time: {_minutes(time.perf_counter() - start)} in all, {_minutes(trained)} to train")
    if not held:
        print("held-out masked loss: not measured (the bundled photographs need scikit-image)")
        return 0
    loss = heldout.evaluate_images(inference, model, spec, held, seed=args.seed, ratio=cfg.mask.ratio)
    print(f"{loss.branch_line()}: {_verdict(loss.ratio)}")
    print(loss.line())
    return 0
