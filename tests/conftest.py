"""Fixtures shared by every test folder (keep minimal; folder-specific ones live in their conftest)."""

import numpy as np
import pytest


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
