"""Labelled image folders for evaluation and fine-tuning, shared by both backends (numpy + PIL only).

The layout is ImageNet's: `DIR/train/<class>/*.png` and `DIR/val/<class>/*.png`. Classes are the
sorted names of the class folders of `train/`; label i is the i-th of them in both splits. Every
problem is one sentence naming the folder or file (LabelledDataError, a ValueError): no `train/`
or `val/`, a class of `train/` missing from `val/` (or the reverse), a class folder without
images, an image that does not decode. Unlike pretraining, a bad image is an error, never skipped:
accuracies would silently be computed on other images.

Transforms (images ImageNet-normalised, (3, S, S) float32):
- training: RandomResizedCrop (bicubic) + horizontal flip, seeded per (seed, epoch, index) as the
  pretraining data is (backends/images.py), so both backends see the same crops;
- evaluation: resize the shorter side to S / 0.875 (256 for 224), bicubic, centre crop S.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from localmim.backends.images import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, PretrainTransform, load_rgb

__all__ = ["LabelledDataError", "LabelledSplit", "EVAL_CROP_FRACTION", "list_class_folder", "train_val_splits",
           "read_image", "EvalTransform", "TrainTransform", "LabelledTrainDataset", "LabelledLoader",
           "eval_batches", "split_fingerprint"]

EVAL_CROP_FRACTION = 0.875   # 224 / 256: the evaluation resize is img_size / 0.875 before the centre crop


class LabelledDataError(ValueError):
    """A labelled data folder or image that cannot be used; the message names it."""


@dataclass
class LabelledSplit:
    """One split: paths (n,) sorted by class then file name, labels (n,) int64, classes (sorted names)."""
    root: str
    paths: List[str]
    labels: np.ndarray
    classes: List[str]

    def __len__(self) -> int:
        return len(self.paths)


def _images_in(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
                  and os.path.isfile(os.path.join(folder, f)))


def _class_dirs(folder: str) -> List[str]:
    return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def list_class_folder(folder: str, classes: Optional[Sequence[str]] = None) -> LabelledSplit:
    """The images of a folder of class folders. classes: the class list to follow (the training
    split's); None: the folder's own sorted class folders."""
    if not os.path.isdir(folder):
        raise LabelledDataError(f"labelled data folder {folder} does not exist or is not a folder")
    found = _class_dirs(folder)
    if not found:
        raise LabelledDataError(f"{folder} holds no class folders (expected {folder}/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        missing = [c for c in classes if c not in found]
        extra = [c for c in found if c not in classes]
        if missing:
            raise LabelledDataError(f"{folder} lacks the class folder(s) {', '.join(missing[:5])} that the training "
                                    f"split has; both splits need the same classes")
        if extra:
            raise LabelledDataError(f"{folder} has the class folder(s) {', '.join(extra[:5])} that the training "
                                    f"split lacks; both splits need the same classes")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _images_in(os.path.join(folder, name))
        if not files:
            raise LabelledDataError(f"class folder {os.path.join(folder, name)} holds no images "
                                    f"({', '.join(IMG_EXTENSIONS)})")
        paths += [os.path.join(folder, name, f) for f in files]
        labels += [label] * len(files)
    return LabelledSplit(folder, paths, np.asarray(labels, dtype=np.int64), list(classes))


def train_val_splits(root: str) -> Tuple[LabelledSplit, LabelledSplit]:
    """(train, val) of an ImageNet-style folder `root` with `train/` and `val/` class folders."""
    if not os.path.isdir(root):
        raise LabelledDataError(f"data folder {root} does not exist or is not a folder")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise LabelledDataError(f"data folder {root} has no {split}/ folder; a labelled folder holds "
                                    f"train/<class>/<image> and val/<class>/<image>")
    train = list_class_folder(os.path.join(root, "train"))
    val = list_class_folder(os.path.join(root, "val"), train.classes)
    return train, val


def read_image(path: str) -> Image.Image:
    """An RGB PIL image, or LabelledDataError naming a file that does not decode."""
    try:
        return load_rgb(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise LabelledDataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _normalise(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))


class EvalTransform:
    """Resize the shorter side to round(S / 0.875) (bicubic), centre crop S x S, normalise."""

    def __init__(self, img_size: int, crop_fraction: float = EVAL_CROP_FRACTION):
        self.img_size = int(img_size)
        self.resize = int(round(self.img_size / crop_fraction))

    def __call__(self, img: Image.Image) -> np.ndarray:
        w, h = img.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.img_size, int(round(w * scale))), max(self.img_size, int(round(h * scale)))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.img_size) // 2, (nh - self.img_size) // 2
        return _normalise(img.crop((left, top, left + self.img_size, top + self.img_size)))


class TrainTransform(PretrainTransform):
    """RandomResizedCrop (bicubic) + flip + normalise: the pretraining transform with the
    evaluation recipes' crop scale (MAE's linear probe: (0.08, 1))."""


class LabelledTrainDataset:
    """A training split with TrainTransform; sample i of epoch e uses default_rng([seed, e, i])."""

    def __init__(self, split: LabelledSplit, transform: TrainTransform, seed: int = 0):
        self.split, self.transform, self.seed = split, transform, int(seed)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key) -> Tuple[np.ndarray, int]:
        epoch, _, index = key
        img = read_image(self.split.paths[index])
        return self.transform(img, np.random.default_rng([self.seed, int(epoch), int(index)])), \
            int(self.split.labels[index])


class LabelledLoader:
    """Batches {"images" (B,3,S,S) float32, "labels" (B,) int64} of the sampler's current window
    (a backends.images.ShardedBatchSampler), decoded by `workers` threads (0: in this thread)."""

    def __init__(self, dataset: LabelledTrainDataset, sampler, workers: int = 0):
        self.dataset, self.sampler = dataset, sampler
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        for keys in self.sampler:
            items = list(self._pool.map(self.dataset.__getitem__, keys)) if self._pool else \
                [self.dataset[k] for k in keys]
            yield {"images": np.stack([it[0] for it in items]).astype(np.float32, copy=False),
                   "labels": np.asarray([it[1] for it in items], dtype=np.int64)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def eval_batches(split: LabelledSplit, transform: EvalTransform, batch_size: int,
                 workers: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(images (b,3,S,S) float32, labels (b,) int64) of the whole split in order, the last batch short."""
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        for start in range(0, len(split), batch_size):
            paths = split.paths[start:start + batch_size]
            load = (lambda p: transform(read_image(p)))
            arrays = list(pool.map(load, paths)) if pool else [load(p) for p in paths]
            yield np.stack(arrays).astype(np.float32, copy=False), split.labels[start:start + batch_size]
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def split_fingerprint(split: LabelledSplit) -> List[Tuple[str, int, int, int]]:
    """(relative path, label, size in bytes, mtime in ns) per image: what a feature cache is keyed on."""
    out = []
    for path, label in zip(split.paths, split.labels):
        st = os.stat(path)
        out.append((os.path.relpath(path, split.root), int(label), int(st.st_size), int(st.st_mtime_ns)))
    return out
