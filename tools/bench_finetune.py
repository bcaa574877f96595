"""PyTorch against MindSpore: time per fine-tuning step of the same classifier, side by side in one process.

    python -m localmim.tools.bench_finetune                                  # ViT-B/16, batch 8, CPU
    python -m localmim.tools.bench_finetune --model swin_base_patch4_win7 --batch 4 --steps 3

Both backends start from the same classifier weights (the torch classifier's state imported into
the MindSpore one) and train on the same mixed batches (random images, core.mixup soft targets),
each through its FinetuneStep (AdamW with layer-wise lr decay, fp32, drop path as the config says;
MindSpore in graph mode, its default). The backends are timed in turn, one step each per round,
so a busy machine slows them alike; each step ends by reading its loss on the host. The first
step (MindSpore's graph compilation, torch's allocator warm-up) is reported on its own. Prints
one JSON line per backend: median and min seconds per step, images/s, first-step seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List

import numpy as np

from localmim.core import mixup
from localmim.core.config import FinetuneConfig
from localmim.core.specs import get_spec

__all__ = ["main", "run"]


def _batches(spec, batch: int, classes: int, count: int, seed: int = 0) -> List[Dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        images = rng.standard_normal((batch, 3, spec.img_size, spec.img_size)).astype(np.float32)
        labels = rng.integers(0, classes, batch)
        x, y = mixup.mix_batch(images, labels, classes, mixup.MixupConfig(), mixup.mix_rng(seed, 0, k))
        out.append({"images": x, "targets": y, "key": np.asarray([0, k])})
    return out


def _torch_step(cfg, spec, classes: int, batches, threads: int):
    import torch
    from localmim.backends.torch import finetune
    from localmim.backends.torch.engine import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = finetune.CLASSIFIERS[spec.family][0](spec, classes, cfg.model.global_pool, cfg.model.drop_path)
    stepper = finetune.FinetuneStep(model, build_optimizer(model, cfg, groups=finetune.finetune_groups(model, cfg)),
                                    accum=1, precision="fp32", device=torch.device("cpu"))
    stepper.set_lr(1e-4)
    tb = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]

    def step(i: int) -> float:
        stepper.micro(tb[i % len(tb)])
        return float(stepper.apply()[0])
    return step, model.export_state()


def _mindspore_step(cfg, spec, classes: int, batches, state):
    from localmim.backends.mindspore import ensure_cpu_context
    ensure_cpu_context()
    from localmim.backends.mindspore import finetune
    from localmim.backends.mindspore.engine import build_optimizer

    model = finetune.CLASSIFIERS[spec.family][0](spec, classes, cfg.model.global_pool, cfg.model.drop_path)
    model.import_state(state)
    model.set_train(True)
    stepper = finetune.FinetuneStep(model, build_optimizer(model, cfg, groups=finetune.finetune_groups(model, cfg)),
                                    accum=1)
    stepper.set_lr(1e-4)

    def step(i: int) -> float:
        stepper.micro(batches[i % len(batches)])
        return float(np.asarray(stepper.apply())[0])
    return step


def _timed(step: Callable[[int], float], i: int) -> float:
    start = time.perf_counter()
    step(i)
    return time.perf_counter() - start


def run(model: str = "vit_base_patch16", batch: int = 8, steps: int = 3, classes: int = 1000,
        threads: int = 0, drop_path: float = 0.1) -> List[Dict[str, object]]:
    """One result per backend (the module docstring); threads 0: every core."""
    spec = get_spec(model)
    threads = threads or os.cpu_count() or 1
    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.drop_path = model, drop_path
    batches = _batches(spec, batch, classes, max(2, steps))
    torch_step, state = _torch_step(cfg, spec, classes, batches, threads)
    sides = {"torch": torch_step, "mindspore": _mindspore_step(cfg, spec, classes, batches, state)}
    load_before = round(os.getloadavg()[0], 2)
    first = {name: _timed(step, 0) for name, step in sides.items()}
    times: Dict[str, List[float]] = {name: [] for name in sides}
    for i in range(1, steps + 1):
        for name, step in sides.items():
            times[name].append(_timed(step, i))
    results = []
    for name, ts in times.items():
        median = float(np.median(ts))
        results.append({"backend": name, "model": model, "batch": batch, "threads": threads, "steps": steps,
                        "median_s": round(median, 3), "min_s": round(min(ts), 3),
                        "img_per_s": round(batch / median, 2), "first_step_s": round(first[name], 2),
                        "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="localmim bench-finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16", help="a ViT or Swin name from core.specs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per backend after the first")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--drop-path", type=float, default=0.1)
    args = parser.parse_args(argv)
    for row in run(args.model, args.batch, args.steps, args.classes, args.threads, args.drop_path):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
