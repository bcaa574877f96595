"""MindSpore pretraining data: decoding, skipping, determinism, sharding, masks, loader backends."""
import os
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from localmim.backends.mindspore import data
from localmim.core import masking
from localmim.core.config import PretrainConfig


def _write_images(folder, n=12, size=(40, 48), seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img{i:02d}.png"))
    return folder


def _cfg(path, batch=4, seed=3):
    cfg = PretrainConfig()
    cfg.model.name = "vit_tiny_test"
    cfg.data.path = str(path)
    cfg.data.batch_size = batch
    cfg.data.num_workers = 0
    cfg.train.seed = seed
    return cfg


def test_find_images_flat_and_class_folders(tmp_path):
    flat = _write_images(tmp_path / "flat", n=3)
    paths, labels, classes = data.find_images(flat)
    assert [os.path.basename(p) for p in paths] == ["img00.png", "img01.png", "img02.png"]
    assert labels == [0, 0, 0] and classes == []

    root = tmp_path / "classes"
    _write_images(root / "b", n=2)
    _write_images(root / "a", n=1)
    os.makedirs(root / "empty")
    paths, labels, classes = data.find_images(root)
    assert classes == ["a", "b"]
    assert labels == [0, 1, 1]
    assert [os.path.relpath(p, root) for p in paths] == ["a/img00.png", "b/img00.png", "b/img01.png"]


def test_find_images_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        data.find_images(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="has no images"):
        data.find_images(str(tmp_path / "empty"))


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "1"])
def test_load_rgb_modes(tmp_path, mode):
    rgb = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    if mode == "I;16":
        gray = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(gray.astype("<u2"))
        assert img.mode == "I;16"
        ext = "png"
    else:
        img = base.convert(mode)
        ext = "tif" if mode == "CMYK" else "png"
    path = tmp_path / f"x.{ext}"
    img.save(path)
    out = data.load_rgb(str(path))
    assert out.mode == "RGB" and out.size == (7, 9)
    arr = np.asarray(out)
    if mode in ("L", "I;16"):
        expect = np.asarray(base.convert("L"))
        np.testing.assert_array_equal(arr[..., 0], expect)
        np.testing.assert_array_equal(arr[..., 0], arr[..., 2])
    elif mode == "RGBA":
        np.testing.assert_array_equal(arr, rgb)


def test_transform_matches_hand_computed_pipeline():
    rgb = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    t = data.PretrainTransform(16, scale=(0.3, 0.9), ratio=(0.5, 2.0), hflip=0.5)
    out = t(img, np.random.default_rng([5, 1, 2]))
    rng = np.random.default_rng([5, 1, 2])
    top, left, h, w = data.random_resized_crop_params(rng, 50, 30, (0.3, 0.9), (0.5, 2.0))
    flip = rng.random() < 0.5
    crop = img.crop((left, top, left + w, top + h)).resize((16, 16), Image.BICUBIC)
    ref = np.asarray(crop, dtype=np.float32) / 255.0
    if flip:
        ref = ref[:, ::-1]
    ref = ((ref - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # crop geometry stays inside the image and within the requested area range (when not a fallback)
    assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50


def test_crop_params_fallback_is_centre_crop():
    class Never:  # areas always too large -> torchvision's fallback
        def uniform(self, a, b):
            return b * 100

        def integers(self, a, b):
            raise AssertionError("no integer draw in the fallback")

    assert data.random_resized_crop_params(Never(), 100, 10, (1.0, 1.0), (0.75, 4 / 3)) == (0, 43, 10, 13)
    assert data.random_resized_crop_params(Never(), 20, 20, (1.0, 1.0), (0.75, 4 / 3)) == (0, 0, 20, 20)


def test_transform_rejects_bad_config():
    with pytest.raises(ValueError, match="crop_scale"):
        data.PretrainTransform(16, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hflip"):
        data.PretrainTransform(16, hflip=1.5)


def test_dataset_is_deterministic_per_seed_epoch_index(tmp_path):
    cfg = _cfg(_write_images(tmp_path / "d", n=5))
    spec = cfg.build_spec()
    a = data.build_pretrain_dataset(cfg, spec)
    b = data.build_pretrain_dataset(cfg, spec)
    x0 = a[(2, 7, 3)][0]
    np.testing.assert_array_equal(x0, b[(2, 7, 3)][0])
    assert not np.array_equal(x0, a[(3, 7, 3)][0])
    a.epoch = 2
    np.testing.assert_array_equal(a[3], x0)
    assert x0.shape == (3, 32, 32)


def test_corrupt_file_skipped_with_warning_and_next_index(tmp_path):
    folder = _write_images(tmp_path / "d", n=4)
    bad = os.path.join(folder, "img01.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    trunc = os.path.join(folder, "img02.png")
    with open(trunc, "rb") as f:
        head = f.read()[:60]
    with open(trunc, "wb") as f:
        f.write(head)
    cfg = _cfg(folder)
    ds = data.build_pretrain_dataset(cfg, cfg.build_spec())
    with pytest.warns(RuntimeWarning) as rec:
        got = ds[(0, 0, 1)][0]
    messages = [str(w.message) for w in rec]
    assert len(messages) == 2 and "img01.png" in messages[0] and "img02.png" in messages[1]
    # index 1 and 2 are unreadable: index 3's image with index 1's augmentation
    expect = ds.transform(data.load_rgb(os.path.join(folder, "img03.png")), ds.sample_rng(0, 1))
    np.testing.assert_array_equal(got, expect)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per process
        ds[(0, 0, 2)]


def test_all_unreadable_is_a_clear_error(tmp_path):
    folder = tmp_path / "bad"
    os.makedirs(folder)
    (folder / "a.png").write_bytes(b"junk")
    cfg = _cfg(folder)
    ds = data.build_pretrain_dataset(cfg, cfg.build_spec())
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="none of its 1 images"):
        ds[0]


def test_sampler_shards_pads_and_resumes():
    s0 = data.ShardedBatchSampler(10, 2, seed=4, rank=0, world=3)
    s1 = data.ShardedBatchSampler(10, 2, seed=4, rank=1, world=3)
    s2 = data.ShardedBatchSampler(10, 2, seed=4, rank=2, world=3)
    perm = np.random.default_rng([4, 5]).permutation(10)
    padded = np.concatenate([perm, perm[:2]])
    for r, s in enumerate((s0, s1, s2)):
        np.testing.assert_array_equal(s.rank_indices(5), padded[r::3])
        assert s.per_rank == 4 and s.batches_per_epoch == 2
    s0.set_epoch(5)
    full = list(s0)
    # the middle entry is the batch index within the epoch (it seeds the batch's mask)
    assert full == [[(5, 0, int(padded[0])), (5, 0, int(padded[3]))],
                    [(5, 1, int(padded[6])), (5, 1, int(padded[9]))]]
    s0.set_epoch(5, start_batch=1)
    assert list(s0) == full[1:] and len(s0) == 1
    with pytest.raises(ValueError, match="fewer than data.batch_size 8"):
        data.ShardedBatchSampler(10, 8, world=2)


def test_loader_batches_carry_core_masks(tmp_path):
    cfg = _cfg(_write_images(tmp_path / "d", n=12), batch=4, seed=3)
    cfg.mask.ratio = 0.75
    spec = cfg.build_spec()
    loader, sampler = data.build_pretrain_loader(cfg, spec, rank=1, world=2)
    sampler.set_epoch(2, start_batch=0)
    batches = list(loader)
    assert len(batches) == 1 and sampler.batches_per_epoch == 1
    b = batches[0]
    masks = b["masks"]
    m = masking.vit_mask(masking.mask_rng(3, 2, 0, 1), 4, spec.num_patches, 0.75)
    np.testing.assert_array_equal(masks["ids_keep"], m.ids_keep)
    np.testing.assert_array_equal(masks["ids_restore"], m.ids_restore)
    np.testing.assert_array_equal(masks["mask"], m.mask)
    assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == np.float32
    assert masks["ids_keep"].dtype == np.int64 and masks["mask"].dtype == np.float32
    ds = loader.dataset
    idx = sampler.rank_indices(2)[:4]
    np.testing.assert_array_equal(b["images"], np.stack([ds[(2, 0, int(i))][0] for i in idx]))


def test_loader_backends_agree_and_report_speed(tmp_path, capsys):
    cfg = _cfg(_write_images(tmp_path / "d", n=24, size=(96, 80)), batch=4)
    spec = cfg.build_spec()
    results, times = {}, {}
    for backend, workers in (("python", 0), ("python", 2), ("generator", 2)):
        cfg.data.num_workers = workers
        loader, sampler = data.build_pretrain_loader(cfg, spec, backend=backend)
        sampler.set_epoch(1)
        t = time.perf_counter()
        results[(backend, workers)] = list(loader)
        times[(backend, workers)] = time.perf_counter() - t
        loader.close()
    ref = results[("python", 0)]
    assert len(ref) == 6
    for key, batches in results.items():
        assert len(batches) == len(ref), key
        for x, y in zip(batches, ref):
            np.testing.assert_array_equal(x["images"], y["images"])
            assert set(x["masks"]) == {"ids_keep", "ids_restore", "mask"}
            for k in x["masks"]:
                np.testing.assert_array_equal(x["masks"][k], y["masks"][k])
    with capsys.disabled():
        print("\nloader seconds per epoch (24 images, batch 4):",
              {f"{b}/{w}": round(v, 4) for (b, w), v in times.items()})


def test_same_pixels_as_torch_twin(tmp_path):
    torch_data = pytest.importorskip("localmim.backends.torch.data")
    cfg = _cfg(_write_images(tmp_path / "d", n=4, size=(37, 29)))
    spec = cfg.build_spec()
    ms_ds = data.build_pretrain_dataset(cfg, spec)
    pt_ds = torch_data.build_pretrain_dataset(cfg, spec)
    for key in ((0, 0, 0), (1, 3, 2), (4, 9, 3)):
        np.testing.assert_array_equal(ms_ds[key][0], pt_ds[key][0].numpy())
