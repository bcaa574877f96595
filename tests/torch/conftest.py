"""Fixtures of the PyTorch backend tests; the tiny specs, images, masks and `h` are in tests/conftest.py."""
import pytest
import torch


@pytest.fixture(scope="module")
def mask_tensors():
    """VitMask -> the ViT models' masks argument {"ids_keep", "ids_restore", "mask"} as torch tensors."""
    return lambda m: {k: torch.from_numpy(v) for k, v in m.as_dict().items()}
