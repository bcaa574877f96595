"""`localmim bench`: training-step throughput of a LocalMIM model on synthetic data.

Prints images/s, step time, peak accelerator memory and model FLOPs utilisation (MFU, ViT on
CUDA: 3x the forward matmul FLOPs over the step time, against the GPU's dense bf16 peak).
The step is the engine's own `TrainStep` (encoder + four decoders + targets + loss + backward +
AdamW with the core's parameter groups, autocast / GradScaler / torch.compile as training uses
them); images are random and masks come from the loader's collate, prepared outside the timed
region like a prefetching data loader does.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from localmim.backends import images
from localmim.core import masking
from localmim.core.config import PretrainConfig
from localmim.core.specs import TargetSpec, ViTSpec, get_spec

# Dense bf16/fp16 tensor-core peaks (FLOP/s) used for MFU; fp32 uses TF32 peaks.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _linear_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def _block_flops(batch: int, tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre-norm transformer block on (batch, tokens, dim)."""
    n = batch * tokens
    hidden = int(dim * mlp_ratio)
    proj = _linear_flops(n, dim, 3 * dim) + _linear_flops(n, dim, dim)
    mlp = _linear_flops(n, dim, hidden) + _linear_flops(n, hidden, dim)
    attn = 2 * 2.0 * batch * tokens * tokens * dim  # q k^T and attn v
    return proj + mlp + attn


def vit_train_flops(spec: ViTSpec, batch: int, mask_ratio: float) -> float:
    """Model FLOPs of one training step (3x forward: forward + backward), matmuls only."""
    keep = masking.num_keep(spec.num_patches, mask_ratio)
    p = spec.patch_size
    fwd = _linear_flops(batch * spec.num_patches, 3 * p * p, spec.embed_dim)
    fwd += spec.depth * _block_flops(batch, 1 + keep, spec.embed_dim, spec.mlp_ratio)
    for branch, out_dim in zip(spec.branches(), spec.out_dims()):
        d, tokens = branch.decoder_dim, 1 + spec.num_patches
        fwd += _linear_flops(batch * (1 + keep), spec.embed_dim, d)
        fwd += branch.decoder_depth * _block_flops(batch, tokens, d, spec.mlp_ratio)
        g = spec.grid
        if branch.scale == 4.0:   # ConvT d->d/2 (k2s2), ConvT d/2->d/4, 1x1 d/4->out
            fwd += _linear_flops(batch * g * g, d, 2 * d) + _linear_flops(batch * 4 * g * g, d // 2, d)
            fwd += _linear_flops(batch * 16 * g * g, d // 4, out_dim)
        elif branch.scale == 2.0:
            fwd += _linear_flops(batch * g * g, d, 2 * d) + _linear_flops(batch * 4 * g * g, d // 2, out_dim)
        else:
            fwd += _linear_flops(batch * branch.grid ** 2, d, out_dim)
    return 3.0 * fwd


def _peak_flops(device_name: str):
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def synthetic_batches(spec, batch: int, mask_ratio: float, count: int = 4):
    """`count` loader-style numpy batches {"images", "masks"}: one set of random images, the masks of
    micro-batches 0..count-1 from the loader's own collate (ViT masks or Swin plans)."""
    collate = (images.SwinPlanCollate(0, 0, spec, mask_ratio) if spec.family == "swin"
               else images.MaskCollate(0, 0, spec.num_patches, mask_ratio))
    imgs = np.random.default_rng(0).standard_normal((batch, 3, spec.img_size, spec.img_size), dtype=np.float32)
    return [{"images": imgs, "masks": collate.mask_arrays(0, i, batch)} for i in range(count)]


def bench_torch(spec, batch: int, steps: int, warmup: int, precision: str, compile_model: bool,
                mask_ratio: float, device: str):
    """Time the PyTorch engine's own TrainStep (AdamW with the pretraining parameter groups)."""
    import torch
    from localmim.backends.torch import build_model, engine

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(spec).to(dev)
    cfg = PretrainConfig()
    stepper = engine.TrainStep(model, engine.build_optimizer(model, cfg, fused=dev.type == "cuda"), accum=1,
                               precision=precision, device=dev, compile=compile_model)
    stepper.set_lr(1e-4)
    # Batches sit on the device before the timed loop, as a prefetching loader leaves them.
    batches = [{"images": torch.from_numpy(b["images"]).to(dev),
                "masks": {k: torch.from_numpy(v).to(dev) for k, v in b["masks"].items()}}
               for b in synthetic_batches(spec, batch, mask_ratio)]

    def step(i):
        stepper.micro(batches[i % len(batches)])
        return stepper.apply()

    for i in range(warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        row = step(i)
    final_loss = float(row[0])  # one sync at the end
    elapsed = time.perf_counter() - start
    result = {"backend": "torch", "device": device, "step_time_s": elapsed / steps,
              "images_per_s": batch * steps / elapsed, "loss": final_loss}
    if dev.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        name = torch.cuda.get_device_name()
        result["device_name"] = name
        peak = _peak_flops(name)
        if peak and spec.family == "vit":
            result["mfu"] = vit_train_flops(spec, batch, mask_ratio) / (elapsed / steps) / peak
    return result


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="vit_base_patch16", help="a model name from core.specs")
    parser.add_argument("--backend", default="torch", choices=["torch"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--target", default=None, choices=["hog", "pixel"])
    parser.add_argument("--nbins", type=int, default=None)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--img-size", type=int, default=None)


def run(args) -> int:
    overrides = {}
    if args.img_size:
        overrides["img_size"] = args.img_size
    spec = get_spec(args.model, **overrides)
    if args.target or args.nbins:
        t = spec.target
        overrides["target"] = TargetSpec(kind=args.target or t.kind, nbins=args.nbins or t.nbins,
                                         hog_bias=t.hog_bias, norm_pix=t.norm_pix)
        spec = get_spec(args.model, **overrides)
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision if device != "cpu" or args.precision != "fp16" else "fp32"
    result = bench_torch(spec, args.batch, args.steps, args.warmup, precision, args.compile,
                         args.mask_ratio, device)
    result.update({"model": args.model, "batch": args.batch, "precision": precision, "compile": args.compile})
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="localmim bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
