"""Framework-neutral pretraining data shared by both backends: finding and decoding images, the
LocalMIM augmentation, the resumable sharded batch sampler and the mask / Swin-plan collate
arithmetic, in numpy + PIL only (never torch or mindspore).

Determinism (what makes resume, any worker count and either backend give the same numbers):
- data order of epoch e: `numpy.random.default_rng([seed, e]).permutation(n)`, padded and sharded
  per rank like `torch.utils.data.DistributedSampler` (`rank::world`), batches with drop_last;
- augmentation of sample i in epoch e: `numpy.random.default_rng([seed, e, i])`;
- mask of micro-batch b of epoch e (b counted from 0 within the epoch, on every rank) on rank r:
  `core.masking.vit_mask(core.masking.mask_rng(seed, e, b, r), B, N, ratio)`; Swin batches get one
  `core.masking.swin_cell_mask` per batch and rank (docs/method.md#swin-masking) and its `core.swin_plan` plan.

`localmim.backends.torch.data` and `localmim.backends.mindspore.data` subclass or re-export these;
the classes here produce numpy arrays, the torch subclasses wrap the same arrays in tensors.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
from PIL import Image

from localmim.core import masking
from localmim.core.swin_plan import build_swin_plan, static_plan_bounds

T = TypeVar("T")

__all__ = [
    "IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "find_images", "load_rgb",
    "random_resized_crop_params", "PretrainTransform", "PretrainDataset", "ShardedBatchSampler",
    "BatchCollate", "MaskCollate", "SwinPlanCollate", "build_pretrain_dataset",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def find_images(root: str) -> Tuple[List[str], List[int], List[str]]:
    """Images of a flat folder and/or a folder of class folders (one level deep).

    Returns (paths, labels, classes): class folders sorted by name, files sorted inside each;
    images lying directly in `root` come last with label 0 when there are no class folders, else
    label -1. Class folders without images are dropped from `classes`.
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

    All randomness comes from the generator passed to __call__, drawn in a fixed order (crop
    area, aspect, top, left, then the flip draw). Images smaller than the crop are upscaled by
    the resize, not rejected.
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
        """img: RGB PIL image -> (3, S, S) float32 C-contiguous array."""
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

    def first_readable(self, index: int, open_image: Callable[[str], T], verb: str = "decoded") -> Tuple[str, T]:
        """(path, open_image(path)) of `index`, or of the next file that `open_image` reads; a file
        it fails on is reported once per process and skipped."""
        n = len(self.paths)
        for k in range(n):
            path = self.paths[(index + k) % n]
            try:
                return path, open_image(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", RuntimeWarning,
                                  stacklevel=3)
        raise RuntimeError(f"data folder {self.root}: none of its {n} images could be {verb}")

    def _readable(self, index: int) -> Image.Image:
        return self.first_readable(index, load_rgb)[1]

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

    Yields lists of keys (epoch, batch_in_epoch, sample_index). Call set_epoch(epoch, start_batch,
    num_batches) before iterating (a loader may keep persistent workers across epochs).
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


class BatchCollate:
    """Stack images and attach the masks of (seed, epoch, batch index within the epoch, rank).

    Items are (image (3,S,S), epoch, batch_index) as PretrainDataset returns for sampler keys.
    Returns the batch contract of both backends: {"images" (B,3,S,S) float32, "masks": {name:
    array}}, the masks being what the model takes as its second argument (`mask_arrays`). A
    backend overrides `stack` / `wrap` to return its own tensors of the same values.
    """

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = int(seed), int(rank)

    def stack(self, images):
        """Per-sample images -> (B,3,S,S) batch."""
        return np.stack(images).astype(np.float32, copy=False)

    def wrap(self, array: np.ndarray):
        """A mask array as the backend's batch holds it (numpy here)."""
        return array

    def mask_arrays(self, epoch: int, batch_index: int, batch_size: int) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, items) -> Dict:
        images = self.stack([it[0] for it in items])
        epoch, batch_index = items[0][1], items[0][2]
        masks = {k: self.wrap(v) for k, v in self.mask_arrays(epoch, batch_index, len(items)).items()}
        return {"images": images, "masks": masks}


class MaskCollate(BatchCollate):
    """ViT batches: masks {"ids_keep" (B,K) int64, "ids_restore" (B,N) int64, "mask" (B,N)
    float32 (1 = masked)}, one random mask per sample."""

    mask_keys = ("ids_keep", "ids_restore", "mask")

    def __init__(self, seed: int, rank: int, num_patches: int, mask_ratio: float):
        super().__init__(seed, rank)
        self.num_patches, self.mask_ratio = int(num_patches), float(mask_ratio)

    def mask_arrays(self, epoch: int, batch_index: int, batch_size: int) -> Dict[str, np.ndarray]:
        """ids_keep (B,K) int64, ids_restore (B,N) int64, mask (B,N) float32 of one micro-batch."""
        rng = masking.mask_rng(self.seed, epoch, batch_index, self.rank)
        return masking.vit_mask(rng, batch_size, self.num_patches, self.mask_ratio).as_dict()


class SwinPlanCollate(BatchCollate):
    """Swin batches: masks = the grouping plan of the batch's cell mask.

    The mask of (seed, epoch, batch index within the epoch, rank) is one cell mask for the whole
    per-rank batch; the plan (window grouping, merge and scatter indices) is built here, off the
    training step, as a dict of C-contiguous arrays. static: pad every plan to the shapes of
    core.swin_plan.static_plan_bounds, the same for every mask (what compiled training needs);
    otherwise each plan has its natural, smallest shapes.
    """

    def __init__(self, seed: int, rank: int, spec, mask_ratio: float, static: bool = False):
        super().__init__(seed, rank)
        self.spec, self.mask_ratio = spec, float(mask_ratio)
        self.pad_groups_to, self.group_size = static_plan_bounds(spec, self.mask_ratio) if static else (None, None)
        # the plan's keys depend on the spec only; build one plan to list them
        probe = masking.swin_cell_mask(np.random.default_rng(0), spec.mask_grid, self.mask_ratio)
        self.mask_keys = tuple(sorted(build_swin_plan(spec, probe).to_arrays()))

    def cell_mask(self, epoch: int, batch_index: int) -> np.ndarray:
        """(mask_grid**2,) bool cell mask of micro-batch `batch_index` of `epoch` on this rank."""
        rng = masking.mask_rng(self.seed, epoch, batch_index, self.rank)
        return masking.swin_cell_mask(rng, self.spec.mask_grid, self.mask_ratio)

    def mask_arrays(self, epoch: int, batch_index: int, batch_size: int = 0) -> Dict[str, np.ndarray]:
        """The plan of micro-batch `batch_index` of `epoch` as C-contiguous numpy arrays by name."""
        plan = build_swin_plan(self.spec, self.cell_mask(epoch, batch_index),
                               pad_groups_to=self.pad_groups_to, group_size=self.group_size)
        return {k: np.ascontiguousarray(v) for k, v in plan.to_arrays().items()}


def build_pretrain_dataset(cfg, spec, dataset_cls=PretrainDataset, transform_cls=PretrainTransform):
    """The dataset of `cfg.data.path` with the augmentation for `spec.img_size`, built from the
    given classes (a backend passes its own subclasses)."""
    if cfg.data.path is None:
        raise ValueError("data.path is not set: pass data.path=<folder of images>")
    transform = transform_cls(spec.img_size, cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.hflip)
    return dataset_cls(cfg.data.path, transform, seed=cfg.train.seed)
