"""`localmim pretrain`: LocalMIM pretraining from a YAML config with either backend.

    localmim pretrain --config vit_base_hog --data /data/imagenet/train optim.blr=1.5e-4
    torchrun --nproc_per_node 8 -m localmim.tools.cli pretrain --config vit_base_hog --data DIR

Re-running with the same --output resumes from the newest checkpoint there (the engine's job).
"""
from __future__ import annotations

import argparse
from typing import Dict

from localmim.tools.cli import add_common_arguments, config_from_args, import_backend_module, resolve_data_path

__all__ = ["add_arguments", "run", "pretrain"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def pretrain(cfg, backend: str = "torch") -> Dict:
    """Resolve the data folder (null: the bundled sample photographs) and run the backend's engine.

    Returns the engine's summary dict (final step, last loss, checkpoint path, output folder).
    """
    resolve_data_path(cfg)
    engine = import_backend_module(backend, "engine")
    return engine.run_pretrain(cfg) or {}


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = pretrain(cfg, args.backend)
    if _is_main_process():
        parts = [f"{k} {result[k]}" for k in ("step", "loss", "checkpoint") if result.get(k) is not None]
        print(f"localmim pretrain: done ({', '.join(parts) or 'no steps run'}); "
              f"outputs in {result.get('output_dir', cfg.train.output_dir)}")
    return 0


def _is_main_process() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0" and os.environ.get("RANK_ID", "0") == "0"
