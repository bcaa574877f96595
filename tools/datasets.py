"""Labelled datasets that ship inside packages, written as ImageNet-style class folders.

`localmim data digits DIR` writes scikit-learn's handwritten digits (`sklearn.datasets.load_digits`:
1797 real 8x8 grayscale scans of digits 0-9, the UCI "optdigits" test set, written by 13 people) as

    DIR/train/<digit>/<index>.png   1442 images
    DIR/val/<digit>/<index>.png      355 images: of each digit's samples, in load_digits order,
                                     every fifth one (the 5th, 10th, ...), about 36 per digit
    DIR/README.txt                   what the folder is, the split rule and the counts

<index> is the sample's position in load_digits (4 digits), pixel values 0..16 scaled to 0..255
(8-bit grayscale PNG, 8x8 as scanned). The split is fixed so that every evaluation and fine-tuning
demo scores the same images. Why this set: real handwriting (not synthetic), ten balanced
classes, no download at run time, and small enough for k-NN, a linear probe and a fine-tuning run
on 2 CPU cores in minutes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from PIL import Image

__all__ = ["DIGITS_VAL_EVERY", "digits_split", "write_digits", "digits_dir", "add_arguments", "run"]

DIGITS_VAL_EVERY = 5        # every fifth sample of each digit goes to val/, the others to train/
_README = "README.txt"


def digits_split(labels: np.ndarray) -> np.ndarray:
    """(n,) bool, True for the samples of val/: the j-th sample of each class (in order) with
    j % 5 == 4, so every digit keeps a fifth of its samples for validation."""
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return rank % DIGITS_VAL_EVERY == DIGITS_VAL_EVERY - 1


def _load():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the digits dataset needs scikit-learn: pip install 'localmim[demo]' "
                           "(or pip install scikit-learn)") from None
    data = load_digits()
    return np.asarray(data.images), np.asarray(data.target, dtype=np.int64)


def _complete(folder: Path, counts: Dict[str, int]) -> bool:
    readme = folder / _README
    return readme.is_file() and readme.read_text(encoding="utf-8").strip().endswith(
        f"train {counts['train']} val {counts['val']}")


def write_digits(folder, overwrite: bool = False, classes: Optional[int] = None,
                 per_class: Optional[int] = None) -> Dict[str, int]:
    """Write the digits as `folder/{train,val}/<digit>/<index>.png` -> {"train": n, "val": n}.

    classes / per_class: a subset for quick runs and tests (digits 0..classes-1, the first
    `per_class` samples of each digit in load_digits order, split by the same rule); None: all.

    A folder already holding this dataset is left as it is; any other existing, non-empty folder is
    an error (FileExistsError) unless overwrite. The images go to a temporary folder beside it that
    is renamed into place, so an interrupted run leaves no half-written dataset.
    """
    folder = Path(folder)
    images, labels = _load()
    keep = np.ones(len(labels), bool)
    if classes is not None:
        keep &= labels < int(classes)
    if per_class is not None:
        rank = np.zeros(len(labels), np.int64)
        for c in np.unique(labels):
            rank[labels == c] = np.arange(int((labels == c).sum()))
        keep &= rank < int(per_class)
    val = digits_split(labels) & keep
    train_mask = ~digits_split(labels) & keep
    counts = {"train": int(train_mask.sum()), "val": int(val.sum())}
    if folder.exists():
        if _complete(folder, counts) and not overwrite:
            return counts
        if any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} exists and is not the digits dataset; choose an empty or new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=str(folder.parent)))
    try:
        pixels = np.clip(np.round(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        for i, (img, label) in enumerate(zip(pixels, labels)):
            if not keep[i]:
                continue
            split = "val" if val[i] else "train"
            out = tmp / split / str(int(label))
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(out / f"{i:04d}.png")
        (tmp / _README).write_text(
            "scikit-learn load_digits (UCI optdigits test set): 8x8 grayscale handwritten digits 0-9, values "
            "0..16 scaled to 0..255.\nSplit: of each digit's samples in load_digits order, every fifth (5th, 10th, ...) "
            "-> val/, the others -> train/; files are <index>.png (the position in load_digits).\n"
            f"train {counts['train']} val {counts['val']}\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return counts


def digits_dir(cache_dir: Optional[str] = None) -> str:
    """The digits folder in the cache (<cache>/digits; $LOCALMIM_CACHE or ~/.cache/localmim), written once."""
    from localmim.tools.sample_images import cache_root
    folder = cache_root(cache_dir) / "digits"
    write_digits(folder)
    return str(folder)


DATASETS = {"digits": "scikit-learn's handwritten digits, 10 classes, 1442 train / 355 val images"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(DATASETS), help="; ".join(f"{k}: {v}" for k, v in DATASETS.items()))
    parser.add_argument("folder", metavar="DIR", help="where to write train/<class>/ and val/<class>/")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")


def run(args) -> int:
    try:
        counts = write_digits(args.folder, overwrite=args.overwrite)
    except (FileExistsError, RuntimeError) as e:
        from localmim.tools.cli import UserError
        raise UserError(str(e)) from None
    print(f"{args.name}: {counts['train']} train and {counts['val']} val images in {args.folder}")
    return 0
