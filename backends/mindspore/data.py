"""Pretraining data for the MindSpore backend: the same dataset, augmentation, sharding and masks
as `localmim.backends.torch.data`, written with PIL + numpy only, so both backends see the same
images and masks for the same (seed, epoch, index).

Determinism (what makes resume and any worker count give the same numbers):
- data order of epoch e: `numpy.random.default_rng([seed, e]).permutation(n)`, padded and sharded
  per rank like `torch.utils.data.DistributedSampler` (`rank::world`), batches with drop_last;
- augmentation of sample i in epoch e: `numpy.random.default_rng([seed, e, i])`;
- mask of micro-batch b of epoch e (b counted from 0 within the epoch, on every rank) on rank r:
  `core.masking.vit_mask(core.masking.mask_rng(seed, e, b, r), ...)`, as in the torch twin.

ViT batches are dicts of numpy arrays {"images" (B,3,S,S) float32 ImageNet-normalised, "ids_keep"
(B,K) int64, "ids_restore" (B,N) int64, "mask" (B,N) float32 (1 = masked)}. Swin batches are
{"images", "plan": core.swin_plan.build_swin_plan(spec, swin_cell_mask(mask_rng(seed, e, b, r), ...),
pad_groups_to, group_size).to_arrays()} (one cell mask per batch and rank, spec §2.2; the padding
arguments are None except for compiled MindSpore training, see `static_plan_bounds`). The engine
turns them into mindspore Tensors.

Two loaders produce identical batches: `PretrainLoader` (a plain Python iterator, optionally with
a thread pool that decodes the samples of a batch in parallel) and the same source wrapped in
`mindspore.dataset.GeneratorDataset` (`backend="generator"`). Measured on 2 shared CPU cores
(64 JPEGs of 500x375 -> 224 px, batch 16): plain 182 img/s (0 workers) / 199 (2 threads),
GeneratorDataset 193 (1 worker) / 208 (2 workers): equal within noise, while GeneratorDataset
costs ~0.1 s of pipeline start-up per epoch (17x slower on the tiny test images). The plain
iterator is the default.
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from localmim.core import masking
from localmim.core.swin_plan import build_swin_plan

__all__ = [
    "IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "BATCH_COLUMNS", "find_images", "load_rgb",
    "random_resized_crop_params", "PretrainTransform", "PretrainDataset", "ShardedBatchSampler",
    "MaskCollate", "SwinPlanCollate", "static_plan_bounds", "PretrainLoader", "build_pretrain_dataset",
    "build_pretrain_loader",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
BATCH_COLUMNS = ("images", "ids_keep", "ids_restore", "mask")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def find_images(root: str) -> Tuple[List[str], List[int], List[str]]:
    """Images of a flat folder and/or a folder of class folders (one level deep).

    Returns (paths, labels, classes): class folders sorted by name, files sorted inside each;
    images lying directly in `root` come last with label 0 when there are no class folders, else
    label -1.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root} does not exist or is not a folder")
    entries = sorted(os.listdir(root))
    classes = [d for d in entries if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    paths, labels, kept_classes = [], [], []
    for d in classes:
        files = sorted(f for f in os.listdir(os.path.join(root, d))
                       if _is_image(f) and os.path.isfile(os.path.join(root, d, f)))
        if not files:
            continue
        label = len(kept_classes)
        kept_classes.append(d)
        paths += [os.path.join(root, d, f) for f in files]
        labels += [label] * len(files)
    flat = [f for f in entries if _is_image(f) and os.path.isfile(os.path.join(root, f))]
    flat_label = -1 if kept_classes else 0
    paths += [os.path.join(root, f) for f in flat]
    labels += [flat_label] * len(flat)
    if not paths:
        raise FileNotFoundError(
            f"data folder {root} has no images ({', '.join(IMG_EXTENSIONS)}) directly inside it or in its "
            f"class folders")
    return paths, labels, kept_classes


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image (grayscale, CMYK, RGBA, palette, 16-bit).

    Raises whatever PIL raises for corrupt or truncated files (OSError, SyntaxError, ...).
    """
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
            return Image.fromarray(arr, mode="L").convert("RGB")
        if im.mode == "F":
            arr = np.clip(np.asarray(im, dtype=np.float64), 0, 255).round().astype(np.uint8)
            return Image.fromarray(arr, mode="L").convert("RGB")
        if im.mode == "P" and "transparency" in im.info:
            return im.convert("RGBA").convert("RGB")
        return im.convert("RGB")


def random_resized_crop_params(rng: np.random.Generator, width: int, height: int,
                               scale: Sequence[float], ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy generator.

    Returns (top, left, crop_height, crop_width) in pixels: ten tries at an area fraction in `scale`
    and a log-uniform aspect ratio in `ratio`, then a centre crop clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """RandomResizedCrop(bicubic) + horizontal flip + ToTensor + ImageNet normalisation, in numpy.

    All randomness comes from the generator passed to __call__, in the same order as the torch
    backend (crop area, aspect, top, left, then the flip draw), so both give the same pixels.
    """

    def __init__(self, img_size: int, scale=(0.2, 1.0), ratio=(0.75, 4.0 / 3.0), hflip: float = 0.5):
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"data.crop_scale {list(scale)} must satisfy 0 < min <= max")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"data.crop_ratio {list(ratio)} must satisfy 0 < min <= max")
        if not (0.0 <= hflip <= 1.0):
            raise ValueError(f"data.hflip {hflip} must lie in [0, 1]")
        self.img_size = int(img_size)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.hflip = float(hflip)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """img: RGB PIL image -> (3, S, S) float32 array."""
        top, left, h, w = random_resized_crop_params(rng, img.width, img.height, self.scale, self.ratio)
        img = img.crop((left, top, left + w, top + h)).resize((self.img_size, self.img_size), Image.BICUBIC)
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


class PretrainDataset:
    """Images of `root` with the pretraining augmentation, seeded per (seed, epoch, index).

    Index with an int (epoch = `self.epoch`) or with a key (epoch, batch_index, sample_index) as
    the ShardedBatchSampler yields; the latter returns (image, epoch, batch_index) for MaskCollate.
    An unreadable file is reported once per process and replaced by the next readable index
    (the augmentation generator stays the one of the requested index), so batch sizes stay fixed.
    """

    def __init__(self, root: str, transform: PretrainTransform, seed: int = 0):
        self.root = root
        self.paths, self.labels, self.classes = find_images(root)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self._reported = set()

    def __len__(self) -> int:
        return len(self.paths)

    def sample_rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def _readable(self, index: int) -> Image.Image:
        n = len(self.paths)
        for k in range(n):
            path = self.paths[(index + k) % n]
            try:
                return load_rgb(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", RuntimeWarning,
                                  stacklevel=2)
        raise RuntimeError(f"data folder {self.root}: none of its {n} images could be decoded")

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, batch_index, index = key
        else:
            epoch, batch_index, index = self.epoch, -1, key
        img = self.transform(self._readable(int(index)), self.sample_rng(epoch, index))
        if isinstance(key, tuple):
            return img, int(epoch), int(batch_index)
        return img


class ShardedBatchSampler:
    """Per-epoch permutation from (seed, epoch), padded and sharded like DistributedSampler,
    cut into drop_last batches, resumable at a batch offset.

    Yields lists of keys (epoch, global_batch_index, sample_index); global_batch_index =
    epoch * batches_per_epoch + batch_in_epoch. Call set_epoch(epoch, start_batch, num_batches)
    before iterating.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.per_rank = math.ceil(self.num_samples / self.world)
        self.batches_per_epoch = self.per_rank // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} images over {self.world} rank(s) give {self.per_rank} per rank, fewer than "
                f"data.batch_size {self.batch_size}: no full batch (drop_last)")
        self.epoch, self.start_batch, self.stop_batch = 0, 0, self.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0, num_batches: Optional[int] = None) -> None:
        """Iterate batches [start_batch, num_batches) of `epoch` (num_batches None: all)."""
        stop = self.batches_per_epoch if num_batches is None else min(int(num_batches), self.batches_per_epoch)
        if not 0 <= start_batch <= stop:
            raise ValueError(f"start batch {start_batch} outside [0, {stop}] for epoch {epoch}")
        self.epoch, self.start_batch, self.stop_batch = int(epoch), int(start_batch), stop

    def rank_indices(self, epoch: int) -> np.ndarray:
        """Sample indices of this rank in `epoch` (length per_rank)."""
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_samples)
        total = self.per_rank * self.world
        if total > self.num_samples:
            reps = math.ceil((total - self.num_samples) / self.num_samples)
            perm = np.concatenate([perm] + [perm] * reps)[:total]
        return perm[self.rank:total:self.world]

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        idx = self.rank_indices(self.epoch)
        for b in range(self.start_batch, self.stop_batch):
            chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(self.epoch, b, int(i)) for i in chunk]

    def __len__(self) -> int:
        return self.stop_batch - self.start_batch


class MaskCollate:
    """Stack images and attach the ViT mask of (seed, epoch, global batch index, rank)."""

    def __init__(self, seed: int, rank: int, num_patches: int, mask_ratio: float):
        self.seed, self.rank = int(seed), int(rank)
        self.num_patches, self.mask_ratio = int(num_patches), float(mask_ratio)

    def __call__(self, items) -> Dict[str, np.ndarray]:
        images = np.stack([it[0] for it in items]).astype(np.float32, copy=False)
        epoch, batch_index = items[0][1], items[0][2]
        rng = masking.mask_rng(self.seed, epoch, batch_index, self.rank)
        m = masking.vit_mask(rng, images.shape[0], self.num_patches, self.mask_ratio)
        return {
            "images": images,
            "ids_keep": np.asarray(m.ids_keep, dtype=np.int64),
            "ids_restore": np.asarray(m.ids_restore, dtype=np.int64),
            "mask": np.asarray(m.mask, dtype=np.float32),
        }

    columns = BATCH_COLUMNS

    def flatten(self, batch: Dict[str, np.ndarray]) -> tuple:
        """Batch dict -> tuple of arrays in `columns` order (a GeneratorDataset row)."""
        return tuple(batch[c] for c in BATCH_COLUMNS)

    def unflatten(self, row: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """GeneratorDataset row (dict by column) -> batch dict."""
        return {c: row[c] for c in BATCH_COLUMNS}


def _windows_per_side(resolution: int, window: int, shift: int) -> int:
    """Windows per side of one window configuration (core.swin_plan.window_ids' offset grid)."""
    offset = (window - shift) % window
    return (resolution - 1 + offset) // window + 1


def static_plan_bounds(spec, mask_ratio: float) -> Tuple[List[Optional[int]], List[Optional[int]]]:
    """(pad_groups_to, group_size) per stage that make every Swin plan of `spec` at `mask_ratio`
    the same shape, for compiled (ms.jit) training. None for stages in masking mode.

    The visible token count of stage i is fixed (the ratio fixes the number of visible cells,
    each holding (res_i / mask_grid)^2 tokens), so only the grouping of grouping-mode stages
    (N_vis > 2 w^2) varies. group_size = w*w: no window holds more. pad_groups_to = the largest
    number of groups any mask can need, bounded three ways (per window configuration, the
    largest over the stage's configurations):
    - every group holds at least one non-empty window, and the windows a visible cell of c x c
      tokens can touch are at most ((c - 1) // w + 2)^2, so G <= visible_cells * that, and G is
      at most the windows of the configuration;
    - core.swin_plan.pack_windows takes, each round, a subset of the remaining windows with the
      largest total <= w*w. Two groups chosen in that order cannot sum to <= w*w (the later one's
      windows were available to the earlier round, whose union would have been a larger feasible
      subset), so any two groups hold >= w*w + 1 tokens; pairing them, G <= 2 * (N_vis // (w*w + 1)) + 1.
    """
    m = spec.mask_grid
    visible_cells = m * m - masking.num_masked_cells(m * m, mask_ratio)
    if visible_cells < 1:
        raise ValueError(f"mask.ratio {mask_ratio} leaves no visible cell of the {m}x{m} mask grid of {spec.name}")
    pads: List[Optional[int]] = []
    sizes: List[Optional[int]] = []
    for i in range(spec.num_stages):
        res, w, shift = spec.stage_resolution(i), spec.stage_window(i), spec.stage_shift(i)
        cell = res // m
        n_vis = visible_cells * cell * cell
        if n_vis <= 2 * w * w:      # masking mode: one group of the whole (fixed-length) sequence
            pads.append(None)
            sizes.append(None)
            continue
        per_cell = ((cell - 1) // w + 2) ** 2
        pair_bound = 2 * (n_vis // (w * w + 1)) + 1
        bound = 0
        for s in ((0, shift) if shift > 0 else (0,)):
            windows = _windows_per_side(res, w, s) ** 2
            bound = max(bound, min(n_vis, windows, visible_cells * per_cell, pair_bound))
        pads.append(bound)
        sizes.append(w * w)
    return pads, sizes


class SwinPlanCollate:
    """Stack images and attach the Swin grouping plan of the batch's cell mask.

    The mask of (seed, epoch, batch index within the epoch, rank) is one cell mask for the whole
    per-rank batch (as in the torch twin); the plan is built here, off the training step, and
    travels as a dict of numpy arrays under "plan". pad_groups_to / group_size: passed to
    build_swin_plan (None: the natural, variable shapes; see static_plan_bounds).
    """

    def __init__(self, seed: int, rank: int, spec, mask_ratio: float, pad_groups_to=None, group_size=None):
        self.seed, self.rank = int(seed), int(rank)
        self.spec, self.mask_ratio = spec, float(mask_ratio)
        self.pad_groups_to, self.group_size = pad_groups_to, group_size
        # the plan's keys depend on the spec only; build one plan to list them
        probe = masking.swin_cell_mask(np.random.default_rng(0), spec.mask_grid, self.mask_ratio)
        self.plan_keys = tuple(sorted(build_swin_plan(spec, probe).to_arrays()))
        self.columns = ("images",) + tuple("plan:" + k for k in self.plan_keys)

    def cell_mask(self, epoch: int, batch_index: int) -> np.ndarray:
        """(mask_grid**2,) bool cell mask of micro-batch `batch_index` of `epoch` on this rank."""
        rng = masking.mask_rng(self.seed, epoch, batch_index, self.rank)
        return masking.swin_cell_mask(rng, self.spec.mask_grid, self.mask_ratio)

    def __call__(self, items) -> Dict:
        images = np.stack([it[0] for it in items]).astype(np.float32, copy=False)
        epoch, batch_index = items[0][1], items[0][2]
        plan = build_swin_plan(self.spec, self.cell_mask(epoch, batch_index),
                               pad_groups_to=self.pad_groups_to, group_size=self.group_size)
        arrays = {k: np.ascontiguousarray(v) for k, v in plan.to_arrays().items()}
        return {"images": images, "plan": arrays}

    def flatten(self, batch: Dict) -> tuple:
        return (batch["images"],) + tuple(batch["plan"][k] for k in self.plan_keys)

    def unflatten(self, row: Dict[str, np.ndarray]) -> Dict:
        return {"images": row["images"], "plan": {k: row["plan:" + k] for k in self.plan_keys}}


class _BatchSource:
    """Random-access list of the current epoch's batches, as tuples in `collate.columns` order.

    This is the `source` of mindspore.dataset.GeneratorDataset; it is also what the plain loader
    runs. `pool`: optional thread pool that decodes the samples of one batch in parallel.
    """

    def __init__(self, dataset: PretrainDataset, keys: List[List[Tuple[int, int, int]]], collate,
                 pool: Optional[ThreadPoolExecutor] = None):
        self.dataset, self.keys, self.collate, self.pool = dataset, keys, collate, pool

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, i: int) -> Dict[str, np.ndarray]:
        keys = self.keys[i]
        items = list(self.pool.map(self.dataset.__getitem__, keys)) if self.pool else [self.dataset[k] for k in keys]
        return self.collate(items)

    def __getitem__(self, i: int):
        return self.collate.flatten(self.batch(i))


class PretrainLoader:
    """Iterable of batch dicts for one rank; drive it with `sampler.set_epoch(...)` then `iter()`.

    backend "python": plain iterator; with num_workers > 0 a thread pool decodes the samples of a
    batch in parallel and the next batch is prepared while the current one trains.
    backend "generator": the same batches through mindspore.dataset.GeneratorDataset with
    num_parallel_workers = max(1, num_workers) (shuffle off: the order is ours).
    """

    def __init__(self, dataset: PretrainDataset, sampler: ShardedBatchSampler, collate,
                 num_workers: int = 0, backend: str = "python"):
        if backend not in ("python", "generator"):
            raise ValueError(f"data loader backend {backend!r} must be 'python' or 'generator'")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.num_workers, self.backend = int(num_workers), backend
        self._pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 0 and backend == "python" else None

    def __len__(self) -> int:
        return len(self.sampler)

    def _source(self) -> _BatchSource:
        return _BatchSource(self.dataset, list(self.sampler), self.collate, self._pool)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        source = self._source()
        if self.backend == "generator":
            yield from self._iter_generator(source)
        elif self._pool is None:
            for i in range(len(source)):
                yield source.batch(i)
        else:
            yield from self._iter_prefetch(source)

    def _iter_prefetch(self, source: _BatchSource) -> Iterator[Dict[str, np.ndarray]]:
        # One batch ahead on a separate thread; inside it the pool decodes samples in parallel.
        if len(source) == 0:
            return
        with ThreadPoolExecutor(1) as ahead:
            nxt = ahead.submit(source.batch, 0)
            for i in range(len(source)):
                cur = nxt.result()
                if i + 1 < len(source):
                    nxt = ahead.submit(source.batch, i + 1)
                yield cur

    def _iter_generator(self, source: _BatchSource) -> Iterator[Dict[str, np.ndarray]]:
        if len(source) == 0:
            return
        import mindspore.dataset as ds
        gen = ds.GeneratorDataset(source, column_names=list(self.collate.columns), shuffle=False,
                                  num_parallel_workers=max(1, self.num_workers), python_multiprocessing=False)
        for row in gen.create_dict_iterator(num_epochs=1, output_numpy=True):
            yield self.collate.unflatten(row)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def build_pretrain_dataset(cfg, spec) -> PretrainDataset:
    """The dataset of `cfg.data.path` with the augmentation for `spec.img_size`."""
    if cfg.data.path is None:
        raise ValueError("data.path is not set: pass data.path=<folder of images>")
    transform = PretrainTransform(spec.img_size, cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.hflip)
    return PretrainDataset(cfg.data.path, transform, seed=cfg.train.seed)


def build_pretrain_loader(cfg, spec, rank: int = 0, world: int = 1, dataset: Optional[PretrainDataset] = None,
                          backend: str = "python", static_plans: bool = False):
    """Loader of mask-carrying numpy batches for one rank. Returns (loader, batch_sampler).

    Drive it with `batch_sampler.set_epoch(epoch, start_batch, num_batches)` then `iter(loader)`.
    The default backend is the plain iterator (as fast as GeneratorDataset on 2 CPU cores at
    224 px, without its per-epoch start-up cost; see the module docstring). ViT specs get
    MaskCollate batches, Swin specs SwinPlanCollate batches; static_plans (Swin only) pads every
    plan to the shapes of `static_plan_bounds` (what compiled training needs).
    """
    dataset = dataset if dataset is not None else build_pretrain_dataset(cfg, spec)
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, seed=cfg.train.seed, rank=rank, world=world)
    if getattr(spec, "family", "vit") == "swin":
        pads, sizes = static_plan_bounds(spec, cfg.mask.ratio) if static_plans else (None, None)
        collate = SwinPlanCollate(cfg.train.seed, rank, spec, cfg.mask.ratio, pad_groups_to=pads, group_size=sizes)
    else:
        collate = MaskCollate(cfg.train.seed, rank, spec.num_patches, cfg.mask.ratio)
    loader = PretrainLoader(dataset, sampler, collate, num_workers=int(cfg.data.num_workers), backend=backend)
    return loader, sampler
