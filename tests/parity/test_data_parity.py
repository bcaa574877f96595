"""Both backends' loaders deliver the same batches: same images, same order, same masks or plans."""
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("mindspore")

from localmim.backends.mindspore import data as ms_data  # noqa: E402
from localmim.backends.torch import data as torch_data  # noqa: E402
from localmim.core.config import PretrainConfig  # noqa: E402


def _images(folder, n=10):
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    for i in range(n):
        size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _batches(data_module, cfg, rank, world, epoch, start_batch):
    spec = cfg.build_spec()
    loader, sampler = data_module.build_pretrain_loader(cfg, spec, rank=rank, world=world)
    sampler.set_epoch(epoch, start_batch=start_batch)
    out = []
    for batch in loader:
        out.append({"images": _numpy(batch["images"]), "masks": {k: _numpy(v) for k, v in batch["masks"].items()}})
    return out


def _numpy(v):
    return v.numpy() if hasattr(v, "numpy") else (v.asnumpy() if hasattr(v, "asnumpy") else np.asarray(v))


@pytest.mark.parametrize("model", ["vit_tiny_test", "swin_tiny_test"])
def test_loaders_agree_for_every_rank_epoch_and_offset(tmp_path, model):
    cfg = PretrainConfig()
    cfg.model.name = model
    cfg.data.path = str(_images(tmp_path / "imgs"))
    cfg.data.batch_size = 2
    cfg.data.num_workers = 0
    cfg.train.seed = 5
    for rank, epoch, start in [(0, 0, 0), (1, 3, 1)]:
        tb = _batches(torch_data, cfg, rank, 2, epoch, start)
        mb = _batches(ms_data, cfg, rank, 2, epoch, start)
        assert len(tb) == len(mb) > 0
        for t, m in zip(tb, mb):
            np.testing.assert_allclose(m["images"], t["images"], rtol=0, atol=1e-6)
            assert sorted(t["masks"]) == sorted(m["masks"])
            if model.startswith("vit"):
                assert sorted(t["masks"]) == ["ids_keep", "ids_restore", "mask"]
            for key in t["masks"]:
                np.testing.assert_array_equal(m["masks"][key], t["masks"][key], err_msg=key)
