"""PyTorch against MindSpore: time per training step of the same model, side by side in one process.

    python -m localmim.tools.bench_backends                       # vit_mini, batch 16, 1 thread
    python -m localmim.tools.bench_backends --model vit_demo --steps 20 --parts
    python -m localmim.tools.bench_backends --variants torch,mindspore,mindspore-before,mindspore-pynative

Both backends start from the same weights (the torch model's canonical state imported into the
MindSpore model) and train on the same synthetic batches (tools.bench.synthetic_batches: random
images, the loader's own masks), each with its engine's TrainStep (AdamW with the pretraining
parameter groups, fp32). The variants are timed in turn, one step each per round, so a busy shared
machine slows them alike; each step ends by reading its loss on the host. Prints one JSON line per
variant (median and min ms per step, ratio to torch, the first step's loss) and the 1-minute load
average before and after; --parts adds a line per backend timing the pieces of a step.

Variants: `torch` (eager), `mindspore` (graph mode, ms.jit, the engine's default),
`mindspore-before` (graph mode with the projections as they were before they became 2-D MatMuls:
`ops.matmul` of an N-D tensor with a 2-D weight; same numbers), `mindspore-adamw-before` (graph
mode with the AdamW update as it was before the fused kernel: mindspore.experimental.optim.AdamW,
~15 kernels per parameter; same numbers within float32 rounding), `mindspore-pynative`
(train.compile=false) and `mindspore-pynative-sync` (PyNative with pynative_synchronize, toggled
around its own steps).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List

import numpy as np

from localmim.core.config import PretrainConfig
from localmim.core.specs import get_spec
from localmim.tools.bench import synthetic_batches

__all__ = ["main", "run"]

VARIANTS = ("torch", "mindspore", "mindspore-before", "mindspore-adamw-before", "mindspore-pynative",
            "mindspore-pynative-sync")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _torch_step(spec, batches, state, threads: int):
    import torch
    from localmim.backends.torch import build_model, engine

    torch.set_num_threads(threads)
    model = build_model(spec)
    model.import_state(state)
    stepper = engine.TrainStep(model, engine.build_optimizer(model, PretrainConfig()), accum=1, precision="fp32",
                               device=torch.device("cpu"))
    stepper.set_lr(1e-4)
    tb = [{"images": torch.from_numpy(b["images"]), "masks": {k: torch.from_numpy(v) for k, v in b["masks"].items()}}
          for b in batches]

    def step(i: int) -> float:
        stepper.micro(tb[i % len(tb)])
        return float(stepper.apply()[0])
    return step, stepper


def _old_projections():
    """The projections as they were before this change (ops.matmul of an N-D tensor and a 2-D weight,
    which MindSpore runs as a broadcast BatchMatMul), to time the old graph beside the new one."""
    from mindspore import ops
    from localmim.backends.mindspore import layers

    def project(x, weight, out_dim, transpose=True):
        return ops.matmul(x, weight.T if transpose else weight)

    def linear(self, x):
        y = ops.matmul(x, self.weight.T)
        return y + self.bias if self.has_bias else y
    return {(layers, "_project"): project, (layers.Linear, "construct"): linear}


def _mindspore_step(spec, batches, state, variant: str):
    import mindspore as ms
    from localmim.backends.mindspore import build_model, engine

    ms.set_seed(0)
    model = build_model(spec)
    model.import_state(state)
    stepper = engine.TrainStep(model, engine.build_optimizer(model, PretrainConfig()), accum=1,
                               use_jit=not variant.startswith("mindspore-pynative"))
    stepper.set_lr(1e-4)
    sync = variant == "mindspore-pynative-sync"

    def step(i: int) -> float:
        if sync:
            ms.set_context(pynative_synchronize=True)
        stepper.micro(batches[i % len(batches)])
        loss = float(stepper.apply().asnumpy()[0])
        if sync:
            ms.set_context(pynative_synchronize=False)
        return loss
    return step, stepper


def _old_adamw():
    """The AdamW update as it was before engine.LocalAdamW became one fused kernel per parameter:
    mindspore.experimental.optim.AdamW, its per-group gradients passed as `mutable` tuples."""
    import mindspore as ms
    from mindspore.experimental.optim import AdamW
    from localmim.backends.mindspore import engine

    class ExperimentalAdamW(AdamW):
        def construct(self, gradients):
            self.assignadd(self.state_step, self.increase_tensor)
            for group_id, group in enumerate(self.param_groups):
                beta1, beta2 = group["betas"]
                start_id = self.group_start_id[group_id]
                end_id = self.group_start_id[group_id + 1]
                grads = ms.mutable(tuple(gradients[start_id:end_id]))
                self.implementation(self.lrs[group_id], group.get("weight_decay"), beta1, beta2,
                                    group.get("amsgrad"), group.get("eps"), grads, start_id, end_id)
            return True
    return {(engine, "LocalAdamW"): ExperimentalAdamW}


def _build(variant, spec, batches, state, threads) -> Callable[[int], float]:
    if variant == "torch":
        return _torch_step(spec, batches, state, threads)[0]
    patch_of = {"mindspore-before": _old_projections, "mindspore-adamw-before": _old_adamw}
    if variant not in patch_of:
        return _mindspore_step(spec, batches, state, variant)[0]
    # build the old version now, patched in (the projections: compile it too), then put the new one back
    patches = patch_of[variant]()
    saved = {key: getattr(*key) for key in patches}
    for (owner, name), fn in patches.items():
        setattr(owner, name, fn)
    try:
        step = _mindspore_step(spec, batches, state, variant)[0]
        if variant == "mindspore-before":
            step(0)
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
    return step


def _parts(spec, batches, state, threads: int, repeats: int) -> List[Dict]:
    """Median ms of each piece of a step, per backend: inputs, targets, forward, forward+backward, update."""
    import torch
    import mindspore as ms
    from localmim.backends.mindspore import engine as ms_engine
    from localmim.backends.torch import engine as torch_engine

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(1000 * float(np.median(times)), 1)

    out = []
    _, ts = _torch_step(spec, batches, state, threads)
    imgs, masks = torch_engine.batch_inputs({"images": torch.from_numpy(batches[0]["images"]),
                                             "masks": {k: torch.from_numpy(v) for k, v in batches[0]["masks"].items()}},
                                            torch.device("cpu"))

    def torch_fwd_bwd():
        loss, _ = ts.model(imgs, masks)
        loss.backward()

    def torch_update():
        ts.optimizer.step()
    with torch.no_grad():
        row = {"backend": "torch", "targets": median_ms(lambda: ts.model.forward_targets(imgs)),
               "forward": median_ms(lambda: ts.model(imgs, masks))}
    row["forward+backward"] = median_ms(torch_fwd_bwd)
    row["update"] = median_ms(torch_update)
    out.append(row)

    _, st = _mindspore_step(spec, batches, state, "mindspore")
    mimgs, mmasks = ms_engine.batch_inputs(batches[0])
    mmasks = ms.mutable(mmasks)
    model = st.model

    @ms.jit
    def targets(i):
        return model.forward_targets(i)

    @ms.jit
    def forward(i, m):
        return model(i, m)

    def fetch(x):
        while isinstance(x, (tuple, list)):
            x = x[0]
        x.asnumpy()
    grads, _ = st._micro(mimgs, mmasks)
    out.append({"backend": "mindspore", "inputs": median_ms(lambda: ms_engine.batch_inputs(batches[0])),
                "targets": median_ms(lambda: fetch(targets(mimgs))),
                "forward": median_ms(lambda: fetch(forward(mimgs, mmasks))),
                "forward+backward": median_ms(lambda: fetch(st._micro(mimgs, mmasks))),
                "update": median_ms(lambda: fetch(st._update(ms.mutable(tuple(grads)))))})
    return out


def run(args) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench_backends: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    import mindspore as ms
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    import torch
    from localmim.backends.torch import build_model as torch_model

    spec = get_spec(args.model)
    batches = synthetic_batches(spec, args.batch, args.mask_ratio, static=True)  # Swin: one ms.jit graph
    torch.manual_seed(0)
    state = torch_model(spec).export_state()
    load_start = _load()
    steps = {v: _build(v, spec, batches, state, args.threads) for v in variants}
    first_loss = {v: fn(0) for v, fn in steps.items()}  # compiles the graphs
    for i in range(1, args.warmup):
        for fn in steps.values():
            fn(i)
    times: Dict[str, List[float]] = {v: [] for v in variants}
    for i in range(args.steps):
        for v, fn in steps.items():
            start = time.perf_counter()
            fn(i)
            times[v].append(time.perf_counter() - start)
    load_end = _load()
    torch_ms = 1000 * float(np.median(times["torch"])) if "torch" in times else None
    for v in variants:
        med = 1000 * float(np.median(times[v]))
        print(json.dumps({"variant": v, "model": args.model, "batch": args.batch, "threads": args.threads,
                          "steps": args.steps, "median_ms": round(med, 1), "min_ms": round(1000 * min(times[v]), 1),
                          "ratio_to_torch": round(med / torch_ms, 2) if torch_ms else None,
                          "first_loss": first_loss[v], "load_1m_start": load_start, "load_1m_end": load_end}),
              flush=True)
    if args.parts:
        for row in _parts(spec, batches, state, args.threads, max(3, args.steps // 2)):
            print(json.dumps(dict(row, model=args.model, unit="ms", load_1m=_load())), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localmim.tools.bench_backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_mini", help="a model name from core.specs (default vit_mini)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first compiles)")
    parser.add_argument("--threads", type=int, default=1, help="compute threads of each framework (default 1)")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--variants", default="torch,mindspore,mindspore-before",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--parts", action="store_true", help="also time the pieces of a step per backend")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
