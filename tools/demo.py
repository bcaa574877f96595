"""`localmim demo`: train the small demo model on the bundled photographs, then look at it.

    localmim demo                      # vit_demo, HOG targets, 300 steps on the CPU
    localmim demo --model swin --backend torch --max-steps 100

Runs pretraining with configs/pretrain/demo_vit.yaml (or demo_swin.yaml) on the sample images
(`tools.sample_images`), prints the first and the last logged loss, then renders the last
checkpoint's reconstructions of one sample photograph into <output>/reconstruction.png.
Re-running with the same --output resumes from the last checkpoint there.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from typing import List, Optional, Tuple

from localmim.tools.cli import add_common_arguments, config_from_args, import_backend_module, resolve_data_path

__all__ = ["add_arguments", "run", "read_losses", "latest_checkpoint", "pick_image"]

PREFERRED_IMAGE = "chelsea.png"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("vit", "swin"), default="vit",
                        help="demo model: vit (vit_demo, HOG) or swin (swin_demo, pixels); default vit")
    parser.add_argument("--seed", type=int, default=0, help="mask seed of the reconstruction figure")
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
    """The demo's reconstruction image: chelsea.png when present, else the first image by name."""
    preferred = os.path.join(folder, PREFERRED_IMAGE)
    if os.path.isfile(preferred):
        return preferred
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTS):
                return os.path.join(root, name)
    raise FileNotFoundError(f"data folder {folder!r} holds no image files")


def _drawing_unavailable(backend: str) -> Optional[str]:
    """Why the backend cannot draw reconstructions (its inference module is missing), or None."""
    from localmim.tools.cli import BackendUnavailable

    try:
        import_backend_module(backend, "inference")
    except BackendUnavailable as e:
        return str(e)
    return None


def run(args: argparse.Namespace) -> int:
    from localmim.tools.pretrain import pretrain
    from localmim.tools.visualize import visualize_checkpoint

    cfg = config_from_args(args, default_config=f"demo_{args.model}")
    data = resolve_data_path(cfg)
    out = cfg.train.output_dir
    print(f"localmim demo: {cfg.model.name} ({cfg.target.kind} targets) on {data}, "
          f"{cfg.train.max_steps or 'all'} steps, backend {args.backend}, output {out}", flush=True)
    import_backend_module(args.backend, "engine")            # fail before anything else if unavailable
    no_drawing = _drawing_unavailable(args.backend)
    if no_drawing:
        print(f"localmim demo: training only, no reconstruction figure: {no_drawing}", flush=True)
    result = pretrain(cfg, args.backend)

    losses = read_losses(os.path.join(out, "log.jsonl"))
    if losses:
        (s0, l0), (s1, l1) = losses[0], losses[-1]
        trend = "falling" if l1 < l0 else "not falling"
        print(f"loss: {l0:.4f} at step {s0} -> {l1:.4f} at step {s1} ({trend})")
    else:
        print("loss: no logged steps in", os.path.join(out, "log.jsonl"))

    if no_drawing:
        return 0
    ckpt = result.get("checkpoint") or latest_checkpoint(out)
    if not ckpt or not os.path.isfile(ckpt):
        print(f"localmim demo: no checkpoint in {out}, so no reconstruction was drawn")
        return 1
    figure = visualize_checkpoint(ckpt, pick_image(data), os.path.join(out, "reconstruction.png"),
                                  seed=args.seed, backend=args.backend, mask_ratio=cfg.mask.ratio)
    print(f"reconstruction: {figure}")
    return 0
