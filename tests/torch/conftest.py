"""Shared fixtures for the PyTorch backend tests: tiny specs, images and core-sampled masks."""
import numpy as np
import pytest
import torch

from localmim.core import masking
from localmim.core.specs import TargetSpec, get_spec


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
    """Tiny ViT with 18-bin HOG and the frozen per-scale gradient biases (ViT-L style)."""
    return get_spec("vit_tiny_test", img_size=64, target=TargetSpec(kind="hog", nbins=18, hog_bias=True))


@pytest.fixture
def tiny_pixel_spec():
    """Tiny ViT with normalised-pixel targets."""
    return get_spec("vit_tiny_test", target=TargetSpec(kind="pixel", norm_pix=True))


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


def mask_tensors(m):
    """The ViT models' masks argument {"ids_keep", "ids_restore", "mask"} as torch tensors, from a VitMask."""
    return {k: torch.from_numpy(v) for k, v in m.as_dict().items()}


def rel_err(a, b):
    """max |a - b| / max |b| as a float (a, b numpy or torch)."""
    a = np.asarray(a.detach().cpu() if torch.is_tensor(a) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if torch.is_tensor(b) else b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class _Helpers:
    """Helper functions handed to tests as a fixture (avoids importing `conftest` by name)."""
    make_images = staticmethod(make_images)
    make_mask = staticmethod(make_mask)
    mask_tensors = staticmethod(mask_tensors)
    rel_err = staticmethod(rel_err)


@pytest.fixture
def h():
    return _Helpers
