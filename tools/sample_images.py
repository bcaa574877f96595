"""Real colour photographs that ship inside scikit-image, written once as PNG files.

They make the demo and the tests runnable offline: `sample_image_dir()` returns a flat folder of
PNG images (full photographs plus 2x2 and 3x3 tiles of each, so an epoch has more than a handful
of batches; shorter side at most 320 px, so that decoding them costs little). The folder is built in a temporary directory and renamed into place, so a crash or a
concurrent caller never leaves a half-written set behind.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from localmim.core.files import write_atomically, write_text_atomically

__all__ = ["sample_image_dir", "cache_root", "PHOTOS", "MISSING_SKIMAGE", "SampleImagesUnavailable"]

VERSION = "2"
MISSING_SKIMAGE = ("the bundled sample images need scikit-image, which is not installed; "
                   "run: pip install 'localmim[demo]'")

# skimage.data loaders of colour photographs that load without a download (checked with 0.26).
PHOTOS: Tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
    "rocket", "motorcycle_left", "motorcycle_right",
)


class SampleImagesUnavailable(RuntimeError):
    """scikit-image, which holds the photographs, is not installed."""


MIN_TILE = 64          # px; tiles smaller than this are not written
MAX_SHORT_SIDE = 320   # px; larger images are downscaled so that data loading stays cheap
DARK_MEAN = 12         # tiles darker than this on average (retina corners, empty sky) are skipped


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """`cache_dir`, else $LOCALMIM_CACHE, else ~/.cache/localmim."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LOCALMIM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "localmim"


def _load_photos() -> Dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8 for every photograph in PHOTOS."""
    try:
        import skimage.data as data
    except ImportError:
        raise SampleImagesUnavailable(MISSING_SKIMAGE) from None
    out = {}
    for name in PHOTOS:
        if name.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            img = left if name.endswith("left") else right
        else:
            img = getattr(data, name)()
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] != 3:
            continue
        out[name] = img.astype(np.uint8)
    return out


def _tiles(img: np.ndarray, n: int) -> Iterator[np.ndarray]:
    """The n x n non-overlapping tiles of `img` (H, W, 3), row by row."""
    h, w = img.shape[0] // n, img.shape[1] // n
    for i in range(n):
        for j in range(n):
            yield img[i * h:(i + 1) * h, j * w:(j + 1) * w]


def _variants(name: str, img: np.ndarray) -> Iterator[Tuple[str, np.ndarray]]:
    yield name, img
    for n, tag in ((2, "q"), (3, "t")):
        for k, tile in enumerate(_tiles(img, n)):
            if min(tile.shape[:2]) >= MIN_TILE and tile.mean() >= DARK_MEAN:
                yield f"{name}_{tag}{k}", tile


def _shrink(img):
    """A PIL image whose shorter side is at most MAX_SHORT_SIDE (Lanczos)."""
    from PIL import Image
    w, h = img.size
    scale = MAX_SHORT_SIDE / min(w, h)
    if scale >= 1.0:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS, reducing_gap=3.0)


def _write_all(folder: Path) -> List[str]:
    from PIL import Image
    written = []
    for name, img in _load_photos().items():
        for stem, arr in _variants(name, img):
            picture = _shrink(Image.fromarray(np.ascontiguousarray(arr)))
            write_atomically(folder / f"{stem}.png", functools.partial(picture.save, format="PNG"), suffix=".png")
            written.append(stem)
    return written


def sample_image_dir(cache_dir: Optional[str] = None) -> str:
    """Path of a flat folder of colour sample photographs (PNG, each side >= 64 px).

    Written once into <cache>/sample_images (cache: `cache_dir`, $LOCALMIM_CACHE or
    ~/.cache/localmim); later calls return at once. Raises SampleImagesUnavailable (a
    RuntimeError) with an install hint when scikit-image is missing.
    """
    final = cache_root(cache_dir) / "sample_images"
    # The marker sits next to the folder, not in it, so that dataset loaders see only images.
    marker = final.parent / "sample_images.complete"

    def complete() -> bool:
        return final.is_dir() and marker.is_file() and marker.read_text().strip() == VERSION

    if complete():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final.parent / "sample_images.lock"):   # several ranks may start at once
        if complete():
            return str(final)
        tmp = Path(tempfile.mkdtemp(prefix=".sample_images.", dir=final.parent))
        try:
            _write_all(tmp)
            if marker.exists():
                marker.unlink()
            if final.exists():
                shutil.rmtree(final)                        # an older or half-finished set
            os.replace(tmp, final)
            write_text_atomically(marker, VERSION)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """An advisory inter-process lock (fcntl.flock where available, else no locking)."""
    try:
        import fcntl
    except ImportError:                                     # not POSIX: best effort
        yield
        return
    with open(path, "a") as handle:  # only a handle to lock: nothing is written
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

