"""`localmim eval knn | linprobe`: quick evaluation of a pretrained encoder (docs/evaluation.md).

    localmim eval knn --checkpoint runs/vitb/checkpoint-1000.pth --data DIR [--backend mindspore]
    localmim eval linprobe --checkpoint CKPT --data DIR --config demo --output runs/probe

`--data DIR` holds `train/<class>/*` and `val/<class>/*` (`localmim data digits DIR` writes a real
one). k-NN: features of both splits from the frozen, unmasked encoder (batches with a progress
bar, cached on disk by checkpoint, data and options), cosine similarity, k = 20, votes
exp(sim / 0.07) (DINO's protocol, core/knn.py). linprobe: MAE's protocol on the shared loop
(backends/<backend>/linprobe.py). Both append to `OUTPUT/log.jsonl` and end with one line
`knn top-1: 61.25 top-5: 97.50` (or `linprobe top-1: ...`).

`knn_hook` is the periodic k-NN of pretraining (`eval.knn_data=DIR eval.every_epochs=N`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from localmim.backends import labelled
from localmim.core import knn

__all__ = ["add_arguments", "run", "encoder_for", "extract_features", "cached_features", "knn_evaluate",
           "knn_hook", "FEATURES_VERSION"]

FEATURES_VERSION = 1   # part of the cache key: bump when the feature definition changes


def _backend_of(path: str, backend: Optional[str]) -> str:
    if backend:
        return backend
    return "mindspore" if str(path).endswith(".ckpt") else "torch"


def encoder_for(backend: str, checkpoint: str, layout: Optional[str] = None, pool: str = "avg",
                img_size: Optional[int] = None, random_init: bool = False, seed: int = 0):
    """The backend's features.Encoder for a checkpoint of any supported layout; random_init: a
    freshly initialised model of the checkpoint's geometry instead (the baseline)."""
    from localmim.tools.cli import import_backend_module
    features = import_backend_module(backend, "features")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    arch = {"img_size": int(img_size)} if img_size else {}
    encoder = features.load_encoder(checkpoint, layout, pool, **arch)
    return features.random_encoder(encoder.spec, pool, seed) if random_init else encoder


def extract_features(encoder, split: labelled.LabelledSplit, batch_size: int = 64, workers: int = 0,
                     progress: Optional[bool] = None, desc: str = "features") -> np.ndarray:
    """(n, E) float32 embeddings of a split (evaluation transform at the encoder's size), in order."""
    from localmim.backends.runs import show_progress
    transform = labelled.EvalTransform(encoder.spec.img_size)
    batches = labelled.eval_batches(split, transform, batch_size, workers)
    bar = None
    if show_progress(progress):
        from tqdm import tqdm
        bar = tqdm(total=len(split), desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    out = []
    try:
        for images, _ in batches:
            out.append(np.asarray(encoder.encode(images), np.float32))
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _cache_key(backend: str, checkpoint: Optional[str], encoder, split: labelled.LabelledSplit) -> str:
    info = {"version": FEATURES_VERSION, "backend": backend, "pool": encoder.pool, "img_size": encoder.spec.img_size,
            "crop_fraction": labelled.EVAL_CROP_FRACTION, "split": os.path.abspath(split.root),
            "images": labelled.split_fingerprint(split)}
    if checkpoint is not None:
        st = os.stat(checkpoint)
        info["checkpoint"] = [os.path.abspath(checkpoint), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:24]


def cached_features(encoder, split: labelled.LabelledSplit, backend: str, checkpoint: Optional[str],
                    cache_dir: Optional[str], batch_size: int = 64, workers: int = 0,
                    progress: Optional[bool] = None, desc: str = "features") -> Tuple[np.ndarray, bool]:
    """(features, whether they came from the cache). The cache file <cache_dir>/<key>.npy is keyed by
    backend, checkpoint (path, size, mtime), pool, input size and every image (path, size, mtime);
    cache_dir None: no cache. Written atomically (core.files)."""
    if cache_dir is None:
        return extract_features(encoder, split, batch_size, workers, progress, desc), False
    from localmim.core.files import write_atomically
    path = os.path.join(cache_dir, _cache_key(backend, checkpoint, encoder, split) + ".npy")
    if os.path.isfile(path):
        try:
            feats = np.load(path, allow_pickle=False)
            if feats.shape[0] == len(split) and np.isfinite(feats).all():
                return feats, True
        except (OSError, ValueError):
            pass  # a broken cache file is recomputed and replaced
    feats = extract_features(encoder, split, batch_size, workers, progress, desc)
    os.makedirs(cache_dir, exist_ok=True)
    write_atomically(path, lambda tmp: np.save(tmp, feats, allow_pickle=False), suffix=".npy")
    return feats, False


def knn_evaluate(encoder, data: str, backend: str = "torch", checkpoint: Optional[str] = None,
                 cache_dir: Optional[str] = None, k: int = knn.KNN_K, temperature: float = knn.KNN_TEMPERATURE,
                 batch_size: int = 64, workers: int = 0, progress: Optional[bool] = None) -> Dict:
    """k-NN top-1 / top-5 of an encoder on a labelled folder -> a log record (see README of eval)."""
    train, val = labelled.train_val_splits(data)
    start = time.perf_counter()
    train_f, hit_t = cached_features(encoder, train, backend, checkpoint, cache_dir, batch_size, workers, progress,
                                     "train features")
    val_f, hit_v = cached_features(encoder, val, backend, checkpoint, cache_dir, batch_size, workers, progress,
                                   "val features")
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    result = knn.knn_classify(train_f, train.labels, val_f, val.labels, len(train.classes), k, temperature)
    return {"val_acc1": result.top1, "val_acc5": result.top5, "k": int(k), "temperature": float(temperature),
            "train_images": len(train), "val_images": len(val), "classes": len(train.classes),
            "features_s": features_s, "knn_s": time.perf_counter() - start, "cached": bool(hit_t and hit_v),
            "predictions": result.predictions}


def knn_hook(backend: str, model, cfg) -> Callable[[int], Dict[str, float]]:
    """The pretraining loop's evaluate hook: k-NN of the model being trained on cfg.eval.knn_data
    -> {"knn_acc1", "knn_acc5"} (percent; logged beside the loss). The folder is checked now, so a
    bad one stops the run before its first step. Every rank computes it (a small folder)."""
    from localmim.tools.cli import import_backend_module
    features = import_backend_module(backend, "features")
    labelled.train_val_splits(cfg.eval.knn_data)  # raises LabelledDataError naming the problem
    encoder = features.Encoder(model)

    def evaluate(step: int) -> Dict[str, float]:
        rec = knn_evaluate(encoder, cfg.eval.knn_data, backend, batch_size=cfg.data.batch_size, progress=False)
        return {"knn_acc1": rec["val_acc1"], "knn_acc5": rec["val_acc5"]}

    return evaluate


# ---------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{knn,linprobe}")
    sub.required = True
    k = sub.add_parser("knn", help="weighted k-NN (DINO) top-1/top-5 of frozen features",
                       description="k-NN accuracy of a frozen encoder on DIR/train and DIR/val class folders.")
    k.add_argument("--checkpoint", required=True, metavar="CKPT", help="pretrained weights, any supported layout")
    k.add_argument("--data", required=True, metavar="DIR", help="folder with train/ and val/ class folders")
    k.add_argument("--backend", choices=("torch", "mindspore"), help="default: mindspore for .ckpt, else torch")
    k.add_argument("--layout", help="checkpoint layout (default: recorded or detected)")
    k.add_argument("--pool", choices=("avg", "cls"), default="avg", help="ViT embedding: patch mean or cls token")
    k.add_argument("--img-size", type=int, help="input size (default the checkpoint's; tables resampled)")
    k.add_argument("--random-init", action="store_true",
                   help="the baseline: a randomly initialised model of the checkpoint's geometry (seed --seed)")
    k.add_argument("--seed", type=int, default=0, help="initialisation seed of --random-init (default 0)")
    k.add_argument("--k", type=int, default=knn.KNN_K, help=f"neighbours (default {knn.KNN_K})")
    k.add_argument("--temperature", type=float, default=knn.KNN_TEMPERATURE,
                   help=f"vote temperature (default {knn.KNN_TEMPERATURE})")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--workers", type=int, default=0, help="image-decoding threads (default 0)")
    k.add_argument("--output", default="output/eval_knn", metavar="DIR", help="where log.jsonl goes")
    k.add_argument("--cache-dir", metavar="DIR", help="feature cache (default <cache>/features; see docs)")
    k.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    k.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")

    p = sub.add_parser("linprobe", help="linear probe (MAE protocol: BatchNorm + linear head, LARS)",
                       description="Train a linear probe on the frozen encoder; evaluate on DIR/val.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="pretrained weights, any supported layout")
    p.add_argument("--data", required=True, metavar="DIR", help="folder with train/ and val/ class folders")
    p.add_argument("--config", default="demo", metavar="NAME|FILE",
                   help="configs/linprobe/NAME.yaml or a file (vit_base, swin_base, demo; default demo)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder; sets train.output_dir")
    p.add_argument("--backend", choices=("torch", "mindspore"), help="default: mindspore for .ckpt, else torch")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "ascend"), help="sets train.device")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.blr=0.05")


def _append_log(folder: str, record: Dict) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "log.jsonl")
    with open(path, "a") as f:  # appending to log.jsonl is the one non-atomic write (core/files.py)
        f.write(json.dumps(record) + "\n")
    return path


def _run_knn(args) -> int:
    backend = _backend_of(args.checkpoint, args.backend)
    cache_dir = None
    if not args.no_cache:
        from localmim.tools.sample_images import cache_root
        cache_dir = args.cache_dir or str(cache_root() / "features")
    encoder = encoder_for(backend, args.checkpoint, args.layout, args.pool, args.img_size, args.random_init, args.seed)
    if args.random_init:
        cache_dir = None  # the features of a random model are not worth keeping
    rec = knn_evaluate(encoder, args.data, backend, args.checkpoint, cache_dir, args.k, args.temperature,
                       args.batch_size, args.workers, args.progress)
    rec.pop("predictions")
    rec = {"step": 0, "eval": "knn", "backend": backend, "checkpoint": os.path.abspath(args.checkpoint),
           "data": os.path.abspath(args.data), "pool": args.pool, "random_init": bool(args.random_init), **rec}
    _append_log(args.output, rec)
    print(knn.summary_line("knn", rec["val_acc1"], rec["val_acc5"]), flush=True)
    return 0


def _run_linprobe(args) -> int:
    from localmim.core.config import ConfigError, load_config, validate_config
    from localmim.tools.cli import import_backend_module
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"argument {bad[0]!r} is neither an option nor a section.key=value override")
    cfg = load_config(args.config, list(args.overrides), kind="linprobe")
    cfg.model.checkpoint, cfg.data.path, cfg.train.output_dir = args.checkpoint, args.data, args.output
    if args.max_steps is not None:
        cfg.train.max_steps = int(args.max_steps)
    if args.device is not None:
        cfg.train.device = args.device
    validate_config(cfg, f"{args.config} with the command's options")
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    labelled.train_val_splits(args.data)
    backend = _backend_of(args.checkpoint, args.backend)
    result = import_backend_module(backend, "linprobe").run_linprobe(cfg)
    print(knn.summary_line("linprobe", result["val_acc1"], result["val_acc5"]), flush=True)
    return 0


def run(args) -> int:
    return _run_knn(args) if args.eval_command == "knn" else _run_linprobe(args)
