"""Fixtures shared by every test folder: tiny specs, images, core-sampled masks, relative errors,
image folders and the sample photographs. A backend folder's conftest adds only what needs its
framework (`mask_tensors`, contexts, numpy references of its layers)."""
import types

import numpy as np
import pytest

from localmim.core import masking
from localmim.core.specs import TargetSpec, get_spec


def pytest_configure(config):
    """One torch thread: the tests run tiny models on 2 cores, and once MindSpore's CPU thread pool
    is loaded in the same process, torch's OpenMP threads contend with it (measured on vit_demo:
    a training step took 5 s with 2 threads, 0.1 s with 1)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture
def image_folder(tmp_path):
    """Factory: image_folder(n=4, size=64, mode="RGB", nested=False) -> path of a folder of PNGs.

    Images are smooth random colour fields (deterministic per index), so HOG and pixel targets
    are non-trivial. nested=True puts them in two class sub-folders (ImageFolder layout).
    """
    from PIL import Image

    def make(n: int = 4, size: int = 64, mode: str = "RGB", nested: bool = False, name: str = "images"):
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        for i in range(n):
            rng = np.random.default_rng(i)
            a, b, c = rng.uniform(1.0, 6.0, size=3)
            img = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))], -1)
            arr = ((img * 0.5 + 0.5) * 255).astype(np.uint8)
            folder = root / f"class{i % 2}" if nested else root
            folder.mkdir(exist_ok=True)
            Image.fromarray(arr).convert(mode).save(folder / f"img{i:03d}.png")
        return str(root)

    return make


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The bundled sample photographs, written once per test session into a temporary cache."""
    from localmim.tools.sample_images import sample_image_dir

    return sample_image_dir(str(tmp_path_factory.mktemp("localmim_cache")))


# ---------------------------------------------------------------------------------------- tiny specs
@pytest.fixture
def tiny_spec():
    """vit_tiny_test: 32 px, patch 8 (4x4 grid), width 32, 4 blocks all tapped, HOG 9 bins."""
    return get_spec("vit_tiny_test")


@pytest.fixture
def tiny64_spec():
    """The tiny ViT at 64 px: 8x8 patch grid, four branches with 32, 16, 8, 4 output grids."""
    return get_spec("vit_tiny_test", img_size=64)


@pytest.fixture
def tiny_bias_spec():
    """Tiny ViT at 64 px with 18-bin HOG and the frozen per-scale gradient biases (ViT-L style)."""
    return get_spec("vit_tiny_test", img_size=64, target=TargetSpec(kind="hog", nbins=18, hog_bias=True))


@pytest.fixture
def tiny_pixel_spec():
    """Tiny ViT with normalised-pixel targets."""
    return get_spec("vit_tiny_test", target=TargetSpec(kind="pixel", norm_pix=True))


# ---------------------------------------------------------------------------------------- helpers
def make_images(batch, size, seed=0):
    """Smooth-plus-noise float32 (B, 3, S, S) images in ImageNet-normalised range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - x), x * y * 2 - 1])[None]
    noise = rng.normal(0.0, 0.5, size=(batch, 3, size, size)).astype(np.float32)
    return (base + noise).astype(np.float32)


def make_mask(spec, batch, ratio=0.75, step=0):
    """A core.masking.VitMask for `spec`'s patch grid."""
    return masking.vit_mask(masking.mask_rng(0, 0, step, 0), batch, spec.num_patches, ratio)


def to_numpy(a):
    """A numpy array from numpy, a torch tensor or a MindSpore tensor."""
    if hasattr(a, "asnumpy"):
        return a.asnumpy()
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def rel_err(a, b):
    """max |a - b| / max |b| as a float (numpy arrays, torch or MindSpore tensors)."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def mask_tensors():
    """VitMask -> the ViT models' masks argument {"ids_keep", "ids_restore", "mask"}: numpy arrays
    here; the torch and MindSpore folders override it with their tensors."""
    return lambda m: dict(m.as_dict())


@pytest.fixture(scope="module")
def h(mask_tensors):
    """The helper functions above as one fixture (tests do not import `conftest` by name)."""
    return types.SimpleNamespace(make_images=make_images, make_mask=make_mask, mask_tensors=mask_tensors,
                                 rel_err=rel_err, to_numpy=to_numpy)
