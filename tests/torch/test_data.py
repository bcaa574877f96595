"""Pretraining data: folder layouts, decoding, augmentation determinism, sharding and masks."""
import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from localmim.backends.torch import data
from localmim.core import masking
from localmim.core.config import config_from_dict


def _save_random(path, h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return arr


def _make_flat(folder, n=12, size=(40, 36)):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        _save_random(os.path.join(folder, f"img{i:02d}.png"), size[0] + i, size[1], seed=i)
    return folder


def _cfg(path, **data_kw):
    d = {"path": str(path), "batch_size": 4, "num_workers": 0}
    d.update(data_kw)
    return config_from_dict({"model": {"name": "vit_tiny_test"}, "data": d, "train": {"seed": 3}})


# ---------------------------------------------------------------------------------------- layouts
def test_flat_and_class_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.bmp", "e.webp", "f.tif"]:
        _save_random(str(flat / name), 9, 9, 0)
    (flat / "notes.txt").write_text("not an image")
    paths, labels, classes = data.find_images(str(flat))
    assert [os.path.basename(p) for p in paths] == ["a.jpg", "b.PNG", "c.JpEg", "d.bmp", "e.webp", "f.tif"]
    assert labels == [0] * 6 and classes == []

    tree = tmp_path / "tree"
    for cls, names in {"dog": ["1.png", "2.png"], "cat": ["x.jpg"], "empty": []}.items():
        (tree / cls).mkdir(parents=True)
        for n in names:
            _save_random(str(tree / cls / n), 9, 9, 1)
    paths, labels, classes = data.find_images(str(tree))
    assert classes == ["cat", "dog"]
    assert [os.path.relpath(p, tree) for p in paths] == ["cat/x.jpg", "dog/1.png", "dog/2.png"]
    assert labels == [0, 1, 1]


def test_folder_without_images_is_an_error_naming_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.find_images(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        data.find_images(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------- decoding
def test_modes_decode_to_rgb(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = np.asarray(data.load_rgb(str(tmp_path / "g.png")))
    assert out.shape == (6, 8, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 7
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(data.load_rgb(str(tmp_path / "a.png")))
    assert out.shape == (4, 4, 3) and (out == [200, 100, 50]).all()

    cmyk = Image.new("CMYK", (5, 3), (0, 255, 0, 0))  # pure magenta ink -> (255, 0, 255)
    cmyk.save(tmp_path / "c.tif")
    out = np.asarray(data.load_rgb(str(tmp_path / "c.tif")))
    assert out.shape == (3, 5, 3) and (out == [255, 0, 255]).all()

    pal = Image.new("P", (3, 3))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png")
    out = np.asarray(data.load_rgb(str(tmp_path / "p.png")))
    assert (out[1, 1] == [40, 50, 60]).all() and (out[0, 0] == [10, 20, 30]).all()

    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(deep).save(tmp_path / "d16.png")
    out = np.asarray(data.load_rgb(str(tmp_path / "d16.png")))
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[..., 0], np.round(deep / 65535 * 255).astype(np.uint8))


def test_corrupt_and_truncated_files_are_skipped_with_a_warning(tmp_path):
    folder = _make_flat(str(tmp_path / "imgs"), n=4)
    (tmp_path / "imgs" / "img01.png").write_bytes(b"this is not a png at all")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "imgs" / "img02.png").unlink()
    (tmp_path / "imgs" / "img02.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    transform = data.PretrainTransform(32)
    ds = data.PretrainDataset(folder, transform, seed=5)
    names = [os.path.basename(p) for p in ds.paths]
    bad1, bad2, good = names.index("img01.png"), names.index("img02.jpg"), names.index("img03.png")
    assert bad2 == bad1 + 1 and good == bad2 + 1

    with pytest.warns(RuntimeWarning) as record:
        item = ds[(2, 0, bad1)]
    messages = [str(w.message) for w in record]
    assert any("img01.png" in m for m in messages) and any("img02.jpg" in m for m in messages)
    # substitute: the next readable file, augmented with the randomness of the requested index
    expected = transform(data.load_rgb(ds.paths[good]), ds.sample_rng(2, bad1))
    assert torch.equal(item[0], expected)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per process: no second warning
        ds[(3, 0, bad2)]


# ---------------------------------------------------------------------------------------- augmentation
def test_transform_matches_torchvision_with_the_same_crop(tmp_path):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode
    arr = np.random.default_rng(1).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    t = data.PretrainTransform(32, scale=(0.2, 1.0), ratio=(0.75, 4 / 3), hflip=0.5)
    flips = 0
    for seed in range(12):
        rng = np.random.default_rng([7, seed])
        top, left, h, w = data.random_resized_crop_params(np.random.default_rng([7, seed]), 60, 45,
                                                          t.scale, t.ratio)
        assert 0 <= top <= 45 - h and 0 <= left <= 60 - w
        assert 0.2 * 2700 * 0.8 <= h * w <= 2700 and 0.6 <= w / h <= 1.7
        probe = np.random.default_rng([7, seed])
        data.random_resized_crop_params(probe, 60, 45, t.scale, t.ratio)
        flip = probe.random() < 0.5
        flips += flip
        ref = tvf.resized_crop(img, top, left, h, w, [32, 32], InterpolationMode.BICUBIC)
        if flip:
            ref = tvf.hflip(ref)
        ref = tvf.normalize(tvf.to_tensor(ref), list(data.IMAGENET_MEAN), list(data.IMAGENET_STD))
        out = t(img, rng)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert 0 < flips < 12


def test_fallback_crop_and_tiny_images_are_upscaled():
    # a 1x9 strip: no crop in the ratio range fits, so the centre crop clamped to 4/3 is used
    rng = np.random.default_rng(0)
    assert data.random_resized_crop_params(rng, 9, 1, (0.2, 1.0), (0.75, 4 / 3)) == (0, 4, 1, 1)
    tiny = Image.fromarray(np.full((3, 5, 3), 128, dtype=np.uint8))
    out = data.PretrainTransform(32)(tiny, np.random.default_rng(0))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor((128 / 255 - data.IMAGENET_MEAN) / data.IMAGENET_STD))


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    folder = _make_flat(str(tmp_path / "imgs"), n=3)
    ds = data.PretrainDataset(folder, data.PretrainTransform(32), seed=11)
    a, b = ds[(4, 0, 1)][0], ds[(4, 9, 1)][0]
    assert torch.equal(a, b)  # the batch index does not enter the augmentation
    assert not torch.equal(a, ds[(5, 0, 1)][0])
    ds2 = data.PretrainDataset(folder, data.PretrainTransform(32), seed=12)
    assert not torch.equal(a, ds2[(4, 0, 1)][0])
    ds.epoch = 4
    assert torch.equal(ds[1], a)


# ---------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("n,world,batch", [(12, 1, 4), (13, 2, 3), (10, 3, 2)])
def test_sampler_shards_like_distributed_sampler(n, world, batch):
    from torch.utils.data import DistributedSampler
    perm = np.random.default_rng([9, 2]).permutation(n)
    seen = []
    for rank in range(world):
        s = data.ShardedBatchSampler(n, batch, seed=9, rank=rank, world=world)
        s.set_epoch(2)
        ref = perm[list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))]
        batches = list(s)
        assert len(batches) == len(s) == len(ref) // batch
        assert [k[2] for b in batches for k in b] == list(ref[: len(batches) * batch])
        assert all(k[0] == 2 for b in batches for k in b)
        assert [b[0][1] for b in batches] == list(range(len(batches)))
        seen += list(ref)
    assert set(seen) == set(range(n))

    s = data.ShardedBatchSampler(n, batch, seed=9, rank=0, world=world)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=1)
    assert list(s) == full[1:]
    s.set_epoch(3)
    assert list(s) != full


def test_sampler_rejects_too_few_images():
    with pytest.raises(ValueError, match="batch_size 8"):
        data.ShardedBatchSampler(10, 8, world=2)


# ---------------------------------------------------------------------------------------- loader
def _epoch_batches(cfg, spec, rank=0, world=1, epoch=1, start=0):
    loader, sampler = data.build_pretrain_loader(cfg, spec, rank=rank, world=world)
    sampler.set_epoch(epoch, start)
    return list(loader)


def test_batches_carry_the_core_masks(tmp_path):
    cfg = _cfg(_make_flat(str(tmp_path / "imgs"), n=12))
    spec = cfg.build_spec()
    batches = _epoch_batches(cfg, spec, rank=1, world=2, epoch=1)
    assert len(batches) == 1
    for b, batch in enumerate(_epoch_batches(cfg, spec, rank=0, world=1, epoch=1)):
        assert set(batch) == {"images", "masks"}
        assert set(batch["masks"]) == {"ids_keep", "ids_restore", "mask"}
        assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
        ref = masking.vit_mask(masking.mask_rng(3, 1, b, 0), 4, spec.num_patches, cfg.mask.ratio)
        masks = batch["masks"]
        assert masks["ids_keep"].dtype == torch.int64 and masks["mask"].dtype == torch.float32
        np.testing.assert_array_equal(masks["ids_keep"].numpy(), ref.ids_keep)
        np.testing.assert_array_equal(masks["ids_restore"].numpy(), ref.ids_restore)
        np.testing.assert_array_equal(masks["mask"].numpy(), ref.mask)
    ref = masking.vit_mask(masking.mask_rng(3, 1, 0, 1), 4, spec.num_patches, cfg.mask.ratio)
    np.testing.assert_array_equal(batches[0]["masks"]["mask"].numpy(), ref.mask)


def test_loader_is_independent_of_worker_count_and_resume_offset(tmp_path):
    folder = _make_flat(str(tmp_path / "imgs"), n=12)
    spec = _cfg(folder).build_spec()
    serial = _epoch_batches(_cfg(folder, num_workers=0), spec, epoch=2)
    parallel = _epoch_batches(_cfg(folder, num_workers=2), spec, epoch=2)
    resumed = _epoch_batches(_cfg(folder, num_workers=0), spec, epoch=2, start=1)
    assert len(serial) == len(parallel) == 3 and len(resumed) == 2
    for a, b in list(zip(serial, parallel)) + list(zip(serial[1:], resumed)):
        assert torch.equal(a["images"], b["images"])
        for k in a["masks"]:
            assert torch.equal(a["masks"][k], b["masks"][k]), k
