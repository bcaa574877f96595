"""data.decode: gpu (backends/torch/gpu_data.py), everything a CPU can check: the augmentation draws
are the CPU transform's, the batches carry the CPU loader's masks, and the decode + crop + resize
code, run here through torchvision's CPU JPEG decoder, gives the CPU path's images within the
stated tolerance on real photographs; without CUDA the option is one sentence and exit 2."""
import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from localmim.backends import images
from localmim.backends.torch import data as data_mod
from localmim.backends.torch import gpu_data
from localmim.core.config import PretrainConfig
from localmim.core.specs import get_spec

STD = torch.from_numpy(images.IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture
def jpeg_folder(tmp_path, sample_dir):
    """21 photographs as JPEGs (quality 90) plus a grayscale JPEG, a CMYK JPEG, a PNG, a truncated
    JPEG and a file that is not an image at all."""
    root = tmp_path / "jpegs"
    root.mkdir()
    names = sorted(os.listdir(sample_dir))[::6][:21]
    for name in names:
        Image.open(os.path.join(sample_dir, name)).convert("RGB").save(root / (name[:-4] + ".jpg"), quality=90)
    photo = Image.open(os.path.join(sample_dir, names[0])).convert("RGB")
    photo.convert("L").save(root / "zz_gray.jpg", quality=90)
    photo.convert("CMYK").save(root / "zz_cmyk.jpg", quality=90)
    photo.save(root / "zz_png.png")
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    (root / "zz_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zz_garbage.jpg").write_bytes(b"not a jpeg" * 20)
    return str(root)


def _cfg(path, batch=5, workers=0):
    cfg = PretrainConfig()
    cfg.data.path, cfg.data.batch_size, cfg.data.num_workers = path, batch, workers
    return cfg


def test_augmentation_draws_are_the_cpu_transforms(sample_dir):
    """PIL crop / resize / flip with draw_augmentation's numbers reproduces PretrainTransform bit for bit."""
    transform = images.PretrainTransform(48)
    dataset = images.PretrainDataset(sample_dir, transform, seed=3)
    flips = set()
    for epoch, index in [(0, 0), (0, 7), (1, 7), (2, 40), (5, 91)]:
        img = images.load_rgb(dataset.paths[index])
        top, left, h, w, flip = gpu_data.draw_augmentation(dataset.sample_rng(epoch, index), img.width, img.height,
                                                           transform)
        flips.add(flip)
        out = img.crop((left, top, left + w, top + h)).resize((48, 48), Image.BICUBIC)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        ref = (np.asarray(out, np.float32) / np.float32(255.0) - images.IMAGENET_MEAN) / images.IMAGENET_STD
        np.testing.assert_array_equal(ref.transpose(2, 0, 1), transform(img, dataset.sample_rng(epoch, index)))
    assert flips == {0, 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_batches_match_the_cpu_loader(jpeg_folder, workers):
    """Two epochs over 26 files: the same masks; images within 8 levels of 255 per pixel, 0.05 on
    average and at most 1e-3 of the pixels more than one level off (measured: 6, 0.006, 3e-5);
    the truncated and the garbage file are replaced exactly as the CPU loader replaces them."""
    spec = get_spec("vit_tiny_test", img_size=64)
    cfg = _cfg(jpeg_folder, workers=workers)
    gpu_loader, gpu_sampler = gpu_data.build_gpu_decode_loader(cfg, spec, torch.device("cpu"), require_cuda=False)
    cpu_loader, cpu_sampler = data_mod.build_pretrain_loader(cfg, spec)
    diffs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the unreadable files, reported by both paths
        for epoch in range(2):
            gpu_sampler.set_epoch(epoch)
            cpu_sampler.set_epoch(epoch)
            pairs = list(zip(gpu_loader, cpu_loader))
            assert len(pairs) == len(cpu_loader) == 5
            for got, ref in pairs:
                assert got["images"].shape == ref["images"].shape and got["images"].dtype == torch.float32
                assert got["masks"].keys() == ref["masks"].keys()
                for k in ref["masks"]:
                    assert torch.equal(got["masks"][k], ref["masks"][k]), k
                diffs.append(((got["images"] - ref["images"]) * STD * 255.0).abs())
    levels = torch.cat([d.flatten() for d in diffs])
    assert levels.max().item() <= 8.0 + 1e-3, levels.max()
    assert levels.mean().item() <= 0.05, levels.mean()
    assert (levels > 1.5).float().mean().item() <= 1e-3
    assert (levels > 0.5).float().mean().item() > 0  # really two implementations, not one


def test_swin_batches_carry_the_cpu_plan(jpeg_folder):
    spec = get_spec("swin_tiny_test")
    cfg = _cfg(jpeg_folder, batch=4)
    gpu_loader, gpu_sampler = gpu_data.build_gpu_decode_loader(cfg, spec, torch.device("cpu"), require_cuda=False)
    cpu_loader, cpu_sampler = data_mod.build_pretrain_loader(cfg, spec)
    gpu_sampler.set_epoch(1, 2, 3)
    cpu_sampler.set_epoch(1, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (got,), (ref,) = list(gpu_loader), list(cpu_loader)
    assert got["masks"].keys() == ref["masks"].keys()
    for k in ref["masks"]:
        assert torch.equal(got["masks"][k], ref["masks"][k]), k
    assert ((got["images"] - ref["images"]) * STD * 255.0).abs().max().item() <= 2.0 + 1e-3


def test_a_failing_loader_raises_in_the_training_thread():
    class Broken:
        def __iter__(self):
            yield {"images": gpu_data.EncodedBatch([]), "masks": {}}
            raise RuntimeError("worker died")

        def __len__(self):
            return 2

    decoder = gpu_data.BatchDecoder(8, torch.device("cpu"))
    decoder.decode = lambda batch: torch.zeros(0, 3, 8, 8)
    it = iter(gpu_data.GpuDecodeLoader(Broken(), decoder))
    assert next(it)["images"].shape == (0, 3, 8, 8)
    with pytest.raises(RuntimeError, match="worker died"):
        next(it)


def test_gpu_decode_without_cuda_is_one_sentence_and_exit_2(tmp_path, image_folder, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from localmim.tools.cli import main
    status = main(["pretrain", "--config", "demo_vit", "--data", image_folder(n=4, size=32), "--output",
                   str(tmp_path / "out"), "--device", "cpu", "--max-steps", "1", "data.decode=gpu",
                   "data.batch_size=2", "data.num_workers=0", "model.name=vit_tiny_test", "model.taps=null",
                   "model.img_size=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "data.decode: gpu" in err[0] and "data.decode=cpu" in err[0], err
