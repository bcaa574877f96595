"""`localmim finetune`: fine-tune a pretrained encoder for image classification, or evaluate a
fine-tuned checkpoint (docs/method.md#fine-tuning).

    localmim finetune --config vit_base --pretrained pretrain/checkpoint-1600.pth --data /data/imagenet
    localmim finetune --config vit_base --pretrained mae_pretrain_vit_base.pth --train T --val V
    localmim finetune --eval-only --checkpoint output/finetune_vit_base/checkpoint-best.pth --data /data/imagenet

--data DIR holds train/ and val/ class folders (ImageNet layout). Re-running with the same
--output resumes from the newest checkpoint there. The last line is the summary
`finetune top-1: 83.95 top-5: 96.71 (best top-1 84.02, ...)`.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict

from localmim.tools.cli import BACKENDS, UserError, config_from_args, import_backend_module

__all__ = ["add_arguments", "run", "finetune", "summary_line"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config file or bundled name of configs/finetune (vit_base, vit_base_100ep, "
                             "vit_large, demo_vit)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="framework (default torch)")
    parser.add_argument("--pretrained", metavar="CKPT", help="the pretrained file (any layout localmim convert "
                                                             "reads); sets model.pretrained")
    parser.add_argument("--data", metavar="DIR", help="a folder with train/ and val/ class folders; sets data.path")
    parser.add_argument("--train", metavar="DIR", help="the training split's class folders; sets data.train")
    parser.add_argument("--val", metavar="DIR", help="the validation split's class folders; sets data.val")
    parser.add_argument("--output", metavar="DIR", help="output folder; sets train.output_dir")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps; sets train.max_steps")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "ascend"), help="sets train.device")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --data (its val/)")
    parser.add_argument("--checkpoint", metavar="CKPT", help="with --eval-only: a fine-tuned checkpoint")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="with --eval-only (default 64)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.layer_decay=0.65 model.drop_path=0.2")


def summary_line(metrics: Dict[str, float]) -> str:
    """`finetune top-1: 61.25 top-5: 97.50` (+ the best top-1 when known)."""
    line = f"finetune top-1: {metrics['val_acc1']:.2f} top-5: {metrics['val_acc5']:.2f}"
    if "best_acc1" in metrics:
        line += f" (best top-1 {metrics['best_acc1']:.2f})"
    return line


def _apply_flags(cfg, args) -> None:
    from localmim.core.config import validate_config
    flags = []
    for flag, section, key in (("pretrained", "model", "pretrained"), ("train", "data", "train"),
                               ("val", "data", "val")):  # --data, --output, ... : cli.config_from_args
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(cfg, section), key, str(value))
            flags.append("--" + flag)
    if flags:
        validate_config(cfg, f"{args.config} with {' '.join(flags)}")


def finetune(cfg, backend: str = "torch") -> Dict:
    """Run the backend's fine-tuning (backends/<backend>/finetune.py run_finetune)."""
    if cfg.model.pretrained and not os.path.isfile(os.path.expanduser(cfg.model.pretrained)):
        raise FileNotFoundError(f"pretrained file {cfg.model.pretrained!r} does not exist (model.pretrained / "
                                f"--pretrained)")
    return import_backend_module(backend, "finetune").run_finetune(cfg)


def run(args: argparse.Namespace) -> int:
    if args.eval_only:
        if not (args.checkpoint and args.data):
            raise UserError("--eval-only needs --checkpoint CKPT and --data DIR")
        module = import_backend_module(args.backend, "finetune")
        metrics = module.evaluate_checkpoint(args.checkpoint, os.path.expanduser(args.data), args.batch_size,
                                             args.device or "auto")
        print(summary_line(metrics) + f" loss: {metrics['val_loss']:.4f} ({args.checkpoint})")
        return 0
    if args.checkpoint:
        raise UserError("--checkpoint goes with --eval-only; to start from a pretrained file use --pretrained")
    cfg = config_from_args(args, kind="finetune")
    _apply_flags(cfg, args)
    result = finetune(cfg, args.backend)
    if _is_main_process() and result.get("eval"):
        best = result.get("best_checkpoint")
        print(summary_line(result["eval"]) + (f"; best checkpoint {best}" if best else ""))
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("RANK_ID", "0") == "0"
