"""`localmim bench`: pretraining throughput of the PyTorch engine's own step, and of its loader.

Modes (one JSON line per configuration on stdout, and appended to `--output FILE`):
- step (default): images/s, step time, peak accelerator memory and MFU of the engine's
  `TrainStep`, built by `engine.build_train_step` exactly as run_pretrain builds it (encoder + four
  decoders + targets + loss + backward + AdamW with the core's parameter groups, fused on CUDA;
  autocast / GradScaler / torch.compile and its mode as training uses them) on synthetic images
  whose masks come from the loader's collate, prepared outside the timed region like a prefetching
  data loader does. MFU (on CUDA): the step's FLOPs as `--flops` counts them over the step time,
  against the GPU's dense bf16 peak.
- `--flops`: the FLOPs of one image's forward by part (encoder, each decoder, targets and loss)
  and of its forward + backward, counted by torch's FlopCounterMode on fake tensors (no compute).
- `--data DIR`: the loader alone (`data.decode` cpu or gpu), img/s per worker count, no model.
- `--data DIR --end-to-end`: loader + step, as training runs them, with the share of the time the
  step waited for data.
- `--find-max-batch GIB[,GIB]`: the largest batch whose step fits GIB of CUDA memory (bisection).
- `--check-sync` (CUDA): two more steps that fail at the first host synchronisation, and where.
- `--profile DIR`: a torch.profiler trace and a summary table of where a few steps spend their time.
- `--suite FILE`: every measurement of docs/performance.md, each in its own process with a time
  limit (one failing configuration does not stop the rest); `--tiny` runs the same suite on tiny
  models, 2 steps, on the CPU, to check it end to end; `--suite-only NAME[,NAME]` runs only the
  named configurations (a second GPU call that reruns what failed or was skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional

import numpy as np

from localmim.backends import images
from localmim.core.config import COMPILE_MODES, PretrainConfig
from localmim.core.specs import TargetSpec, get_spec

# Dense bf16/fp16 tensor-core peaks (FLOP/s): MFU is reported against these at every precision.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
GIB = 2 ** 30


class BenchError(ValueError):
    """A bench option that cannot run here (the CLI prints it as one sentence, exit 2)."""


# ---------------------------------------------------------------------------------------- FLOPs
def _flop_parts(model) -> Dict[str, List[str]]:
    """Part name -> the module paths whose FLOPs it sums: each decoder and each Swin encoder stage
    on its own, every other child of the model whole (a ModuleList as the sum of its items)."""
    import torch

    def whole(path, module):
        if isinstance(module, torch.nn.ModuleList):
            return [f"{path}.{i}" for i in range(len(module))]
        return [path]

    parts = {}
    for name, child in model.named_children():
        if name == "decoder":
            parts.update({f"decoder.{i}": [f"decoder.{i}"] for i in range(len(child))})
        elif name == "encoder":
            for sub, grand in child.named_children():
                path = f"encoder.{sub}"
                if sub == "layers":
                    parts.update({f"{path}.{i}": [f"{path}.{i}"] for i in range(len(grand))})
                else:
                    parts[path] = whole(path, grand)
        else:
            parts[name] = whole(name, child)
    return parts


def counted_flops(spec, mask_ratio: float) -> Dict:
    """FLOPs of one image's training step as torch's FlopCounterMode counts them: a freshly built
    model run forward and backward on fake tensors (shapes only, nothing computed), with the masks
    (ViT) or natural plan (Swin) of micro-batch 0. Every op is per image, so a batch costs B times
    this. -> {"forward_gflop_per_image", "train_gflop_per_image" (forward + backward),
    "forward_gflop_by_part": {part: GFLOP} of the parts with FLOPs, "rest" for what runs outside
    them (the targets and the loss), "forward_gflop_of_heads": {decoder.k.pred: GFLOP}, what of
    each decoder's count is its prediction head (which runs on every position)}."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from localmim.backends.torch import build_model

    model = build_model(spec)
    masks = {k: torch.from_numpy(v) for k, v in mask_collate(spec, mask_ratio).mask_arrays(0, 0, 1).items()}
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.empty(1, 3, spec.img_size, spec.img_size)
        with FlopCounterMode(display=False) as forward:
            loss, _ = model(images, masks)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    counts, root = forward.get_flop_counts(), type(model).__name__
    parts = {name: sum(sum(counts.get(f"{root}.{p}", {}).values()) for p in paths) / 1e9
             for name, paths in _flop_parts(model).items()}
    total = forward.get_total_flops() / 1e9
    parts["rest"] = total - sum(parts.values())
    heads = {f"decoder.{i}.pred": sum(counts.get(f"{root}.decoder.{i}.pred", {}).values()) / 1e9
             for i in range(len(model.decoder))}
    return {"forward_gflop_per_image": total, "train_gflop_per_image": total + backward.get_total_flops() / 1e9,
            "forward_gflop_by_part": {k: round(v, 4) for k, v in parts.items() if round(v, 4)},
            "forward_gflop_of_heads": {k: round(v, 4) for k, v in heads.items()}}


def _peak_flops(device_name: str):
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


# ---------------------------------------------------------------------------------------- setup
def bench_spec(args):
    """The model spec of --model, --img-size, --target, --nbins (the spec's own target otherwise)."""
    overrides = {"img_size": args.img_size} if args.img_size else {}
    spec = get_spec(args.model, **overrides)
    if args.target or args.nbins:
        t = spec.target
        overrides["target"] = TargetSpec(kind=args.target or t.kind, nbins=args.nbins or t.nbins,
                                         hog_bias=t.hog_bias, norm_pix=t.norm_pix)
        spec = get_spec(args.model, **overrides)
    return spec


def bench_config(args, precision: str) -> PretrainConfig:
    """The training config the step and loader are built from (pretraining defaults otherwise)."""
    cfg = PretrainConfig()
    cfg.model.name = args.model
    cfg.data.batch_size, cfg.data.path, cfg.data.decode = args.batch, args.data, args.decode
    cfg.mask.ratio = args.mask_ratio
    cfg.train.precision, cfg.train.seed = precision, args.seed
    cfg.train.compile, cfg.train.compile_mode = bool(args.compile), args.compile_mode
    return cfg


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def mask_collate(spec, mask_ratio: float, static: bool = False):
    """The loader's mask collate for `spec` (seed 0, rank 0): ViT masks, or Swin plans padded to
    static shapes when `static` (what a compiled step is fed, engine.build_loader)."""
    if spec.family == "swin":
        return images.SwinPlanCollate(0, 0, spec, mask_ratio, static=static)
    return images.MaskCollate(0, 0, spec.num_patches, mask_ratio)


def synthetic_batches(spec, batch: int, mask_ratio: float, count: int = 4, static: bool = False):
    """`count` loader-style numpy batches {"images", "masks"}: one set of random images, the masks of
    micro-batches 0..count-1 from the loader's own collate (`mask_collate`)."""
    collate = mask_collate(spec, mask_ratio, static)
    imgs = np.random.default_rng(0).standard_normal((batch, 3, spec.img_size, spec.img_size), dtype=np.float32)
    return [{"images": imgs, "masks": collate.mask_arrays(0, i, batch)} for i in range(count)]


def build_step(cfg, spec, dev):
    """(model, stepper) as run_pretrain builds them: seeded, `engine.build_train_step`."""
    import torch
    from localmim.backends import loop
    from localmim.backends.torch import build_model, engine

    torch.manual_seed(int(cfg.train.seed))
    loop.seed_host(cfg.train.seed)
    model = build_model(spec).to(dev)
    stepper = engine.build_train_step(cfg, model, dev)
    stepper.set_lr(1e-4)
    return model, stepper


def loader_batches(cfg, spec, dev) -> Iterator[Dict]:
    """Endless batches of `engine.build_loader` (data.decode), epoch after epoch."""
    from localmim.backends.torch import engine

    loader, sampler = engine.build_loader(cfg, spec, dev)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------- step
def bench_torch(spec, cfg, device: str, steps: int, warmup: int, end_to_end: bool = False,
                profile_dir: Optional[str] = None, profile_steps: int = 3, label: str = "bench",
                static_plans: bool = False, check_sync: bool = False) -> Dict:
    """Time `steps` optimizer steps of the engine's TrainStep after `warmup` steps.

    Synthetic batches sit on the device before the timed loop (Swin plans padded to static shapes
    with train.compile, as the loader pads them, or with static_plans: the padding's cost in
    eager); end_to_end pulls each batch from the loader of cfg.data (its wait is reported as
    data_wait_share). `first_loss` is the loss of the first step (gathered during warmup, outside
    the timed region). check_sync: after the timed steps, `host_sync_check` (CUDA only).
    """
    import torch

    dev = torch.device(device)
    model, stepper = build_step(cfg, spec, dev)
    if end_to_end:
        source = loader_batches(cfg, spec, dev)
    else:
        synthetic = [{"images": torch.from_numpy(b["images"]).to(dev),
                      "masks": {k: torch.from_numpy(v).to(dev) for k, v in b["masks"].items()}}
                     for b in synthetic_batches(spec, cfg.data.batch_size, cfg.mask.ratio,
                                                static=static_plans or bool(cfg.train.compile))]
        source = (synthetic[i % len(synthetic)] for i in range(10 ** 12))
    waited = [0.0]

    def step():
        t0 = time.perf_counter()
        batch = next(source)
        waited[0] += time.perf_counter() - t0
        stepper.micro(batch)
        return stepper.apply()

    first_loss = float(stepper.gather([step()])[0, 0])
    for _ in range(max(0, warmup - 1)):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    waited[0] = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        row = step()
    final_loss = float(row[0])  # one sync at the end
    elapsed = time.perf_counter() - start
    batch = cfg.data.batch_size
    result = {"mode": "end_to_end" if end_to_end else "step", "backend": "torch", "device": device,
              "step_time_s": elapsed / steps, "step_ms": 1e3 * elapsed / steps,
              "images_per_s": batch * steps / elapsed, "first_loss": first_loss, "loss": final_loss}
    if end_to_end:
        result["data_wait_share"] = waited[0] / elapsed
    if dev.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
        name = torch.cuda.get_device_name(dev)
        result["device_name"] = name
        peak = _peak_flops(name)
        if peak:
            try:  # a failing count must not cost the GPU measurement it belongs to
                flops = counted_flops(spec, cfg.mask.ratio)["train_gflop_per_image"] * 1e9 * batch
                result["mfu"] = flops / (elapsed / steps) / peak
            except Exception as err:  # noqa: BLE001 - recorded in the JSON line
                result["mfu_error"] = f"{type(err).__name__}: {err}"
    if check_sync:
        result.update(host_sync_check(step, dev))
    if profile_dir:
        result.update(profile_steps_summary(step, dev, profile_steps, profile_dir, label))
    return result


def host_sync_check(step, dev, steps: int = 2) -> Dict:
    """Run `steps` more steps with torch.cuda.set_sync_debug_mode("error"), which raises at the
    first operation that makes the host wait for the GPU (a device-to-host copy, .item(), a
    synchronize, nonzero, ...). -> {"host_sync": "none"} or {"host_sync": where the first one was}.
    The step's own loss rows stay on the device, so none is expected. `dev` is a CUDA device."""
    import torch

    _sync(dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step()
        found = "none"
    except RuntimeError as err:
        found = f"{_innermost_frame(err)}: {str(err).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _sync(dev)
    return {"host_sync": found}


def _innermost_frame(err: BaseException) -> str:
    """Where `err` was raised: "file:line (function)" of the deepest traceback frame in this
    package, then " -> " the deepest frame of all when that one is elsewhere (torch, say)."""
    import traceback
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # realpath: a linked checkout too
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if os.path.realpath(f.filename).startswith(root + os.sep)]

    def where(f):
        path = os.path.realpath(f.filename)
        path = os.path.relpath(path, root) if path.startswith(root + os.sep) else path.split("site-packages" + os.sep)[-1]
        return f"{path}:{f.lineno} ({f.name})"

    text = where(ours[-1]) if ours else ""
    if frames and (not ours or frames[-1] is not ours[-1]):
        text += (" -> " if text else "") + where(frames[-1])
    return text


def profile_steps_summary(step, dev, steps: int, out_dir: str, label: str, rows: int = 30) -> Dict:
    """Run `steps` steps under torch.profiler; write <label>-trace.json (chrome://tracing,
    perfetto) and <label>-summary.txt (ops by self time) into out_dir; return the top ops."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(dev)
    trace = os.path.join(out_dir, f"{label}-trace.json")
    summary = os.path.join(out_dir, f"{label}-summary.txt")
    prof.export_chrome_trace(trace)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    with open(summary, "w") as f:
        f.write(averages.table(sort_by=key, row_limit=rows))
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = sorted(averages, key=lambda e: getattr(e, attr, 0.0), reverse=True)
    total = sum(getattr(e, attr, 0.0) for e in averages) or 1.0
    top = [[e.key, round(getattr(e, attr, 0.0) / 1e3 / steps, 3), round(getattr(e, attr, 0.0) / total, 4)]
           for e in events[:8]]
    return {"profile_trace": trace, "profile_summary": summary, "profile_top_ms_per_step_share": top}


# ---------------------------------------------------------------------------------------- loader
def bench_loader(cfg, spec, device: str, workers: int, batches: int, warmup: int) -> Dict:
    """img/s of the loader of cfg.data alone (no model) with `workers` worker processes."""
    import torch

    dev = torch.device(device)
    cfg.data.num_workers = workers
    source = loader_batches(cfg, spec, dev)
    for _ in range(warmup):
        next(source)
    _sync(dev)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(source)
    _sync(dev)
    elapsed = time.perf_counter() - start
    rate = cfg.data.batch_size * batches / elapsed
    assert batch["images"].shape[0] == cfg.data.batch_size
    return {"mode": "loader", "decode": cfg.data.decode, "workers": workers, "images_per_s": rate,
            "images_per_s_per_worker": rate / max(workers, 1), "batch": cfg.data.batch_size,
            "img_size": spec.img_size, "data": cfg.data.path, "device": device}


def compare_decoders(cfg, spec, device: str, batches: int = 4) -> Dict:
    """data.decode gpu against cpu on the first batches of epoch 0: differences in 8-bit levels."""
    import torch
    from localmim.backends.torch import data as data_mod, gpu_data

    dev = torch.device(device)
    cfg.data.num_workers = 0
    gpu_loader, gpu_sampler = gpu_data.build_gpu_decode_loader(cfg, spec, dev, require_cuda=dev.type == "cuda")
    cpu_loader, cpu_sampler = data_mod.build_pretrain_loader(cfg, spec)
    gpu_sampler.set_epoch(0, 0, batches)
    cpu_sampler.set_epoch(0, 0, batches)
    std = torch.from_numpy(images.IMAGENET_STD).view(1, 3, 1, 1)
    diffs = [((g["images"].cpu() - c["images"]) * std * 255.0).abs().flatten()
             for g, c in zip(gpu_loader, cpu_loader)]
    levels = torch.cat(diffs)
    return {"mode": "decode_compare", "device": device, "images": batches * cfg.data.batch_size,
            "max_levels": levels.max().item(), "mean_levels": levels.mean().item(),
            "share_over_1_level": (levels > 1.5).float().mean().item()}


# ---------------------------------------------------------------------------------------- memory
def largest_fitting(fits, start: int = 64, multiple: int = 8, ceiling: int = 1 << 16) -> int:
    """The largest multiple of `multiple` for which fits(batch) holds (0 if none does), assuming
    fits is monotone: double from `start` until a batch fails, then bisect (below `start` too)."""
    lo, hi, batch = 0, None, max(multiple, start // multiple * multiple)
    while hi is None and batch <= ceiling:
        if fits(batch):
            lo, batch = batch, batch * 2
        else:
            hi = batch
    if hi is None:
        return lo
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def find_max_batch(spec, cfg, device: str, memory_gib: float, start: int = 64, multiple: int = 8) -> Dict:
    """The largest batch (a multiple of `multiple`) whose training step fits `memory_gib` GiB of
    CUDA memory: grow by doubling from `start`, then bisect between the last fit and the first OOM.
    The cap is torch.cuda.set_per_process_memory_fraction; each try runs two steps (the second
    holds the AdamW state)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise BenchError("--find-max-batch bisects the batch size against CUDA memory, and this run has no CUDA "
                         "device; run it on a GPU")
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, memory_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    model, stepper = build_step(cfg, spec, dev)
    tries = []

    collate = mask_collate(spec, cfg.mask.ratio, static=bool(cfg.train.compile))

    def fits(batch: int) -> bool:
        x = None
        try:  # images drawn on the device: thousands of 224 px images are slow to draw in numpy
            x = {"images": torch.randn(batch, 3, spec.img_size, spec.img_size, device=dev),
                 "masks": {k: torch.from_numpy(v).to(dev) for k, v in collate.mask_arrays(0, 0, batch).items()}}
            for _ in range(2):
                stepper.micro(x)
                stepper.apply()
            _sync(dev)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        stepper.optimizer.zero_grad(set_to_none=True)
        stepper._row = None
        x = None
        torch.cuda.empty_cache()
        tries.append([batch, ok])
        return ok

    lo = largest_fitting(fits, start, multiple)
    torch.cuda.set_per_process_memory_fraction(1.0, dev)
    return {"mode": "find_max_batch", "device": device, "device_name": torch.cuda.get_device_name(dev),
            "memory_gib": memory_gib, "max_batch": lo, "tries": tries}


# ---------------------------------------------------------------------------------------- JPEGs
def write_jpeg_folder(folder: str, count: int, width: int = 500, height: int = 375, seed: int = 0) -> str:
    """`count` JPEGs (quality 90, ImageNet's typical 500x375) cut at random places and scales from
    the bundled photographs (scikit-image) into `folder`; files already there are kept."""
    from PIL import Image
    from localmim.tools.sample_images import sample_image_dir

    os.makedirs(folder, exist_ok=True)
    src = sample_image_dir()
    photos = [images.load_rgb(os.path.join(src, f)) for f in sorted(os.listdir(src))]
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = os.path.join(folder, f"img{i:06d}.jpg")
        if os.path.exists(path):
            continue
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.5, 1.0)
        w, h = max(8, int(photo.width * scale)), max(8, int(photo.height * scale))
        left, top = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        img = photo.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
        img.save(path + ".tmp", format="JPEG", quality=90)
        os.replace(path + ".tmp", path)
    return folder


# ---------------------------------------------------------------------------------------- suite
def suite_configs(tiny: bool, jpegs: str, out_dir: str) -> List[List[str]]:
    """(name, bench arguments) of every measurement of docs/performance.md, in the order they run:
    the issue's table and the loader first, so that a budget cut drops the extras."""
    if tiny:
        # ViT-L's stand-in has ViT-B's shapes, so its compiled graph comes from the FX graph cache
        vit_b, swin_b, vit_l = ("vit_tiny_test", "8"), ("swin_tiny_test", "8"), ("vit_tiny_test", "8")
        common, workers, loader_batch = ["--steps", "2", "--warmup", "1", "--device", "cpu"], "2", "8"
    else:
        vit_b, swin_b, vit_l = ("vit_base_patch16", "256"), ("swin_base_patch4_win7", "256"), \
            ("vit_large_patch16", "128")
        common, workers, loader_batch = ["--steps", "10", "--warmup", "3"], "16", "256"
    precision = ["--precision", "fp32" if tiny else "bf16"]

    def model(m, target):
        return ["--model", m[0], "--batch", m[1], "--target", target] + precision + common

    vitb, swinb, vitl = model(vit_b, "hog"), model(swin_b, "pixel"), model(vit_l, "hog")
    loader = ["--data", jpegs, "--workers", workers, "--batch", loader_batch, "--model", vit_b[0]] + common
    # eager runs check for host syncs: a compiled forward cannot hold one (fullgraph), and the
    # backward and AdamW outside it are the eager step's
    sync = [] if tiny else ["--check-sync"]
    runs = [["vitb_hog_eager", *vitb, *sync], ["vitb_hog_compiled", *vitb, "--compile"],
            ["loader_cpu", *loader]]
    end_to_end = [*vitb, "--compile", "--data", jpegs, "--end-to-end", "--workers", workers]
    if not tiny:
        runs.append(["loader_gpu", *loader, "--decode", "gpu"])
        runs.append(["vitb_hog_compiled_jpegs_gpu_decode", *end_to_end, "--decode", "gpu"])
    runs += [["swinb_pixel_eager", *swinb, *sync], ["swinb_pixel_compiled", *swinb, "--compile"],
             ["vitl_hog_eager", *vitl], ["vitl_hog_compiled", *vitl, "--compile"],
             ["vitb_hog_compiled_jpegs_cpu_decode", *end_to_end]]
    if not tiny:
        runs.append(["decode_compare", "--data", jpegs, "--decode", "gpu", "--compare-cpu", "--batch", "32",
                     "--model", vit_b[0]])
        for label, m, target in (("vitb_hog", vit_b, "hog"), ("swinb_pixel", swin_b, "pixel"),
                                 ("vitl_hog", vit_l, "hog")):
            runs.append([f"{label}_max_batch", "--model", m[0], "--target", target, "--find-max-batch", "80,141"]
                        + precision)
        runs.append(["vitb_hog_compiled_reduce_overhead", *vitb, "--compile", "--compile-mode", "reduce-overhead"])
        runs.append(["swinb_pixel_compiled_reduce_overhead", *swinb, "--compile", "--compile-mode", "reduce-overhead"])
        runs.append(["swinb_pixel_eager_static_plans", *swinb, "--static-plans"])   # what the padding costs
    runs.append(["vitb_hog_compiled_profile", *vitb, "--compile", "--profile", out_dir])
    return runs


def selected_configs(configs: List[List[str]], only: Optional[str]) -> List[List[str]]:
    """The configurations named in `only` ("name,name", suite order kept), or all of them."""
    if not only:
        return configs
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    names = [c[0] for c in configs]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise BenchError(f"--suite-only {only!r}: {', '.join(unknown) or 'no name'} is not a configuration of "
                         f"this suite; its configurations are {', '.join(names)}")
    return [c for c in configs if c[0] in wanted]


def run_suite(output: str, tiny: bool, budget_s: float, limit_s: float, jpeg_count: int, jpeg_dir: str,
              only: Optional[str] = None) -> int:
    """Each configuration in its own `localmim bench` process (a crash, an OOM or a hang costs only
    that one); its JSON lines, or one {"config", "error"} line, are appended to `output`. Stops
    starting new configurations after `budget_s` seconds. `only`: see `selected_configs`."""
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    start = time.monotonic()  # the budget counts the JPEGs too
    configs = selected_configs(suite_configs(tiny, jpeg_dir, out_dir), only)  # a typo fails before any work
    write_jpeg_folder(jpeg_dir, jpeg_count)
    print(f"{jpeg_count} JPEGs in {jpeg_dir} ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    failures = 0
    for name, *argv in configs:
        left = budget_s - (time.monotonic() - start)
        if left < 10:
            _append(output, {"config": name, "skipped": f"the suite's {budget_s:.0f} s budget is spent"})
            continue
        cmd = [sys.executable, "-m", "localmim.tools.cli", "bench", *argv, "--label", name]
        limit = min(limit_s if "--compile" in argv else limit_s / 2, left)  # compiling takes the time
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", e.stdout or "", f"killed after {limit:.0f} s"
            out = out.decode() if isinstance(out, bytes) else out
        lines = [line for line in out.splitlines() if line.startswith("{")]
        for line in lines:
            _append(output, dict(json.loads(line), config=name, wall_s=round(time.monotonic() - t0, 1)))
        if rc != 0 or not lines:
            failures += 1
            tail = [line for line in (err or "").strip().splitlines() if line.strip()][-3:]
            _append(output, {"config": name, "error": " | ".join(tail) or f"exit status {rc}", "rc": rc,
                             "wall_s": round(time.monotonic() - t0, 1)})
        print(f"{name}: {'ok' if rc == 0 and lines else 'FAILED'} ({time.monotonic() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    print(f"suite done in {time.monotonic() - start:.0f} s, {failures} failed; results in {output}", file=sys.stderr)
    return 0


def _append(path: Optional[str], record: Dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="vit_base_patch16", help="a model name from core.specs")
    parser.add_argument("--backend", default="torch", choices=["torch"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (loader mode: timed batches)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the step (train.compile)")
    parser.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, help="train.compile_mode")
    parser.add_argument("--static-plans", action="store_true",
                        help="Swin, synthetic batches: plans padded to static shapes without --compile too")
    parser.add_argument("--target", default=None, choices=["hog", "pixel"])
    parser.add_argument("--nbins", type=int, default=None)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="an image folder: the loader alone (img/s per --workers), or with --end-to-end loader + step")
    parser.add_argument("--end-to-end", action="store_true", help="with --data: time loader + step together")
    parser.add_argument("--workers", default=None,
                        help="loader worker counts, comma-separated (default: 0,1,2,4,... up to the CPU count; "
                             "end-to-end: the CPU count)")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="data.decode")
    parser.add_argument("--compare-cpu", action="store_true",
                        help="with --data --decode gpu: the GPU-decoded images against the CPU path's, in 8-bit levels")
    parser.add_argument("--find-max-batch", metavar="GIB[,GIB]", default=None,
                        help="largest batch whose step fits each memory size (GiB of CUDA memory)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="after timing, profile a few steps: DIR/<label>-trace.json and -summary.txt")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--flops", action="store_true",
                        help="print the FLOPs of one image's step by part (torch's counter on fake tensors) and exit")
    parser.add_argument("--check-sync", action="store_true",
                        help="after the timed steps, 2 steps that fail at any host sync (CUDA only); prints where")
    parser.add_argument("--label", default=None, help="a name for this configuration in the JSON line and files")
    parser.add_argument("--output", metavar="FILE", default=None, help="also append each JSON line to FILE")
    parser.add_argument("--suite", metavar="FILE", default=None,
                        help="run every measurement of docs/performance.md, JSON lines appended to FILE")
    parser.add_argument("--tiny", action="store_true", help="with --suite: tiny models, 2 steps, CPU (a dry run)")
    parser.add_argument("--suite-only", metavar="NAMES", default=None,
                        help="with --suite: only these configurations (comma-separated names, as in its JSON lines)")
    parser.add_argument("--suite-budget-s", type=float, default=450.0)
    parser.add_argument("--suite-limit-s", type=float, default=200.0,
                        help="time limit of one compiled configuration (half of it for the others)")
    parser.add_argument("--jpegs", type=int, default=None, help="with --suite: JPEGs to generate (default 4096, tiny 24)")
    parser.add_argument("--jpeg-dir", default=None,
                        help="with --suite: where the JPEGs go (default /tmp/localmim_bench_jpegs[_tiny])")


def _worker_counts(text: Optional[str], end_to_end: bool) -> List[int]:
    cpus = os.cpu_count() or 1
    if text:
        return [int(w) for w in text.split(",")]
    if end_to_end:
        return [cpus]
    counts, w = [0], 1
    while w <= cpus:
        counts.append(w)
        w *= 2
    return counts


def run(args) -> int:
    if args.suite:
        count = args.jpegs or (24 if args.tiny else 4096)
        jpeg_dir = args.jpeg_dir or ("/tmp/localmim_bench_jpegs" + ("_tiny" if args.tiny else ""))
        return run_suite(args.suite, args.tiny, args.suite_budget_s, args.suite_limit_s, count, jpeg_dir,
                         args.suite_only)
    spec = bench_spec(args)
    device = resolve_device(args.device)
    precision = args.precision if device != "cpu" or args.precision != "fp16" else "fp32"
    cfg = bench_config(args, precision)
    label = args.label or f"{args.model}-b{args.batch}"
    common = {"model": args.model, "target": spec.target.kind, "batch": args.batch, "precision": precision,
              "compile": bool(args.compile), "compile_mode": args.compile_mode, "label": label}
    if spec.family == "swin":
        common["static_plans"] = bool(args.compile or args.static_plans)
    if args.check_sync and not device.startswith("cuda"):
        raise BenchError("--check-sync watches CUDA's host synchronisations, and this run has no CUDA device; "
                         "run it on a GPU")
    if args.data and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data} does not exist or is not a folder")
    results = []
    if args.flops:
        results.append({"mode": "flops", **counted_flops(spec, args.mask_ratio)})
    elif args.find_max_batch:
        for gib in (float(g) for g in args.find_max_batch.split(",")):
            results.append(find_max_batch(spec, cfg, device, gib))
    elif args.data and args.compare_cpu:
        results.append(compare_decoders(cfg, spec, device))
    elif args.data and not args.end_to_end:
        for w in _worker_counts(args.workers, False):
            results.append(bench_loader(cfg, spec, device, w, args.steps, args.warmup))
    else:
        if args.data:
            cfg.data.num_workers = _worker_counts(args.workers, True)[0]
            common["workers"], common["decode"] = cfg.data.num_workers, cfg.data.decode
        results.append(bench_torch(spec, cfg, device, args.steps, args.warmup, end_to_end=bool(args.data),
                                   profile_dir=args.profile, profile_steps=args.profile_steps, label=label,
                                   static_plans=args.static_plans, check_sync=args.check_sync))
    for r in results:
        record = {**common, **r}
        print(json.dumps(record), flush=True)
        _append(args.output, record)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="localmim bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
