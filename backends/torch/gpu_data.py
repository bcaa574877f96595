"""GPU image decoding for PyTorch pretraining (`data.decode: gpu`).

The CPU loader (data.py) decodes, crops and resizes every image with PIL in its worker
processes; at ~10,000 img/s that needs far more cores than a GPU server has. Here the workers only
read the file bytes, read the image size from the header and draw the augmentation parameters;
the main process decodes the batch's JPEGs on the GPU (`torchvision.io.decode_jpeg(device=...)`,
nvJPEG, one batched call) and crops, resizes, flips and normalises there.

Same images as the CPU path (what makes resume, any worker count and either path agree):
- the crop and flip of sample i of epoch e are drawn from the same generator
  `PretrainDataset.sample_rng(e, i)` in the same order as `images.PretrainTransform` draws them
  (`random_resized_crop_params(rng, width, height, scale, ratio)`, then `rng.random() < hflip`);
- the masks are those of the CPU collates (`MaskCollate`, `SwinPlanCollate`) for the same
  (seed, epoch, batch index, rank);
- the pixels differ only by the resampling and the JPEG decoder: PIL resizes 8-bit images in
  two passes with 8-bit rounding in between, this path resizes in float32 with the same
  antialiased bicubic kernel (a = -0.5, `F.interpolate(antialias=True)`) and rounds once; nvJPEG's
  IDCT is not libjpeg-turbo's. tests/torch/test_gpu_data.py bounds the first on real
  photographs decoded on the CPU (where torchvision's and PIL's decoders agree bit for bit):
  at most 8 levels of 255 per pixel, 0.05 on average, 1e-3 of the pixels more than one level off
  (measured 6, 0.006, 3e-5); `localmim bench --data DIR --decode gpu --compare-cpu` measures both
  on a GPU.

Files that are not baseline/progressive RGB or grayscale JPEGs (PNG, CMYK JPEG, ...) are decoded
by PIL in the worker and only cropped on the GPU; a file that nvJPEG cannot decode gets the CPU
path's image for the same key (which skips unreadable files as data.py does).
"""
from __future__ import annotations

import queue
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from localmim.backends import images
from localmim.backends.loop import ignore_stop_signals
from localmim.backends.torch import data as data_mod

__all__ = [
    "GpuDecodeUnavailable", "EncodedImage", "EncodedBatch", "EncodedDataset", "EncodedMaskCollate",
    "EncodedSwinPlanCollate", "draw_augmentation", "decode_jpegs", "crop_resize", "round_and_normalize",
    "BatchDecoder", "GpuDecodeLoader", "check_device", "build_gpu_decode_loader",
]

JPEG_MODES = ("RGB", "L")   # what nvJPEG decodes to RGB like PIL's convert("RGB")


class GpuDecodeUnavailable(ValueError):
    """data.decode: gpu on a machine (or a device) where it cannot run."""


def _decode_jpeg():
    """torchvision.io.decode_jpeg and its RGB mode (torchvision 0.29 deprecates it for TorchCodec,
    which is not a dependency here; the calls silence that warning)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg, ImageReadMode.RGB


def draw_augmentation(rng: np.random.Generator, width: int, height: int, transform) -> Tuple[int, int, int, int, int]:
    """(top, left, crop_height, crop_width, flip) of one sample, drawn exactly as
    `images.PretrainTransform.__call__` draws them from `rng` (crop, then the flip draw)."""
    top, left, h, w = images.random_resized_crop_params(rng, width, height, transform.scale, transform.ratio)
    flip = int(rng.random() < transform.hflip)
    return top, left, h, w, flip


class EncodedImage:
    """One sample as a worker hands it over: the JPEG bytes (1-D uint8 tensor) or, for other
    files, the PIL-decoded pixels (H, W, 3) uint8; the augmentation (top, left, h, w, flip); the
    dataset key it answers."""

    __slots__ = ("jpeg", "pixels", "crop", "key")

    def __init__(self, jpeg: Optional[torch.Tensor], pixels: Optional[torch.Tensor], crop: Tuple[int, ...], key):
        self.jpeg, self.pixels, self.crop, self.key = jpeg, pixels, tuple(int(c) for c in crop), key


class EncodedDataset(data_mod.PretrainDataset):
    """The CPU dataset's files, seeds and fallbacks, yielding `EncodedImage`s instead of tensors.

    Index it with the ShardedBatchSampler's keys (epoch, batch_index, sample_index) -> (EncodedImage,
    epoch, batch_index), what the collates below take. `cpu_sample(key)` is the CPU path's image of
    a key (the replacement for a file nvJPEG rejects).
    """

    def encoded(self, key) -> EncodedImage:
        epoch, _, index = key
        path, im = self.first_readable(int(index), Image.open, "opened")  # the header only, not decoded
        with im:
            width, height = im.size
            is_jpeg = im.format == "JPEG" and im.mode in JPEG_MODES
            if not is_jpeg:
                pixels = torch.from_numpy(np.array(images.load_rgb(path), dtype=np.uint8))
        crop = draw_augmentation(self.sample_rng(epoch, index), width, height, self.transform)
        if is_jpeg:
            with open(path, "rb") as f:
                jpeg = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            return EncodedImage(jpeg, None, crop, key)
        return EncodedImage(None, pixels, crop, key)

    def cpu_sample(self, key) -> torch.Tensor:
        """The CPU path's (3, S, S) float32 image of `key` (data.py's decode, crop and resize)."""
        epoch, _, index = key
        return torch.from_numpy(self.transform(self._readable(int(index)), self.sample_rng(epoch, index)))

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            raise TypeError("EncodedDataset is indexed with sampler keys (epoch, batch_index, sample_index)")
        return self.encoded(key), int(key[0]), int(key[1])


class EncodedBatch:
    """The images of one batch before decoding: `samples` (EncodedImage per sample, batch order)."""

    def __init__(self, samples: Sequence[EncodedImage]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)


class _EncodedBatches:
    """Collate mix-in: the images stay encoded (`EncodedBatch`), the masks are the CPU collate's."""

    def stack(self, images_):
        return EncodedBatch(images_)

    def wrap(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)


class EncodedMaskCollate(_EncodedBatches, images.MaskCollate):
    """ViT batches {"images": EncodedBatch, "masks": the CPU path's mask tensors}."""


class EncodedSwinPlanCollate(_EncodedBatches, images.SwinPlanCollate):
    """Swin batches {"images": EncodedBatch, "masks": the CPU path's plan tensors}."""


def decode_jpegs(jpegs: Sequence[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """JPEG byte tensors -> (3, H, W) uint8 RGB tensors on `device` (None for a file the decoder
    rejects). One batched call (nvJPEG on CUDA); after an error, one call per file to find it."""
    if not jpegs:
        return []
    decode, rgb = _decode_jpeg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode(list(jpegs), mode=rgb, device=device))
        except RuntimeError:
            out = []
            for j in jpegs:
                try:
                    out.append(decode(j, mode=rgb, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def crop_resize(img: torch.Tensor, crop: Sequence[int], size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) float32: the crop (top, left, h, w), PIL's resize up to
    its last rounding (which `round_and_normalize` does, batched), the horizontal flip when crop[4].

    PIL resizes an 8-bit image in two passes, rows first, each an antialiased bicubic (a = -0.5,
    `F.interpolate(antialias=True)`) rounded and clipped to 8 bits; doing the same here (a one-pass
    float resize differs from PIL by 0.16 levels on average, this by 0.02: the clipping of the
    first pass's overshoot matters at edges). What remains is PIL's fixed-point weights.
    """
    top, left, h, w, flip = (int(c) for c in crop)
    x = img[:, top:top + h, left:left + w].unsqueeze(0).float()
    x = F.interpolate(x, size=(h, size), mode="bicubic", align_corners=False, antialias=True).round_().clamp_(0, 255)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return x.flip(-1) if flip else x


def round_and_normalize(resized: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) `crop_resize` outputs -> rounded and clipped to the 8-bit levels PIL stores,
    /255 and the ImageNet normalisation (mean, std: (3, 1, 1)), the CPU path's arithmetic. Once
    per batch, not per image: on a GPU each op per image is B kernel launches from one thread."""
    return (resized.round().clamp_(0.0, 255.0) / 255.0 - mean) / std


class BatchDecoder:
    """Turns a batch {"images": EncodedBatch, "masks": ...} into the batch contract with
    (B, 3, S, S) float32 images on `device` (masks moved there too, non-blocking).

    fallback: the EncodedDataset, whose `cpu_sample` replaces a file the decoder rejects (a
    warning names it once).
    """

    def __init__(self, img_size: int, device: torch.device, fallback: Optional[EncodedDataset] = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the stream and the decode thread need the index
            device = torch.device("cuda", torch.cuda.current_device())
        self.img_size, self.device, self.fallback = int(img_size), device, fallback
        self.mean = torch.from_numpy(images.IMAGENET_MEAN).view(3, 1, 1).to(self.device)
        self.std = torch.from_numpy(images.IMAGENET_STD).view(3, 1, 1).to(self.device)
        self._reported = set()

    def decode(self, batch: EncodedBatch) -> torch.Tensor:
        samples = batch.samples
        jpeg_at = [i for i, s in enumerate(samples) if s.jpeg is not None]
        decoded: List[Optional[torch.Tensor]] = [None] * len(samples)
        for i, img in zip(jpeg_at, decode_jpegs([samples[i].jpeg for i in jpeg_at], self.device)):
            decoded[i] = img
        resized, replaced = [], {}
        for i, s in enumerate(samples):
            img = decoded[i]
            if img is None and s.pixels is not None:
                img = s.pixels.to(self.device, non_blocking=True).permute(2, 0, 1)
            if img is None:
                replaced[i] = self._replacement(s)   # already normalised, by the CPU path
            else:
                resized.append(crop_resize(img, s.crop, self.img_size))
        if not replaced:
            return round_and_normalize(torch.stack(resized), self.mean, self.std)
        kept = iter(round_and_normalize(torch.stack(resized), self.mean, self.std) if resized else ())
        return torch.stack([replaced[i] if i in replaced else next(kept) for i in range(len(samples))])

    def _replacement(self, s: EncodedImage) -> torch.Tensor:
        if self.fallback is None:
            raise RuntimeError(f"sample {s.key} could not be decoded on {self.device} and there is no CPU fallback")
        index = s.key[2]
        if index not in self._reported:
            self._reported.add(index)
            warnings.warn(f"image {self.fallback.paths[index]} could not be decoded on {self.device}; using the CPU "
                          f"decoder for it", RuntimeWarning, stacklevel=2)
        return self.fallback.cpu_sample(s.key).to(self.device)

    def __call__(self, batch: Dict) -> Dict:
        return {"images": self.decode(batch["images"]),
                "masks": {k: v.to(self.device, non_blocking=True) for k, v in batch["masks"].items()}}


class GpuDecodeLoader:
    """Iterates the worker loader's encoded batches as decoded batches, one batch ahead.

    A background thread decodes batch n+1 (on CUDA on its own stream, so nvJPEG and the resize
    kernels overlap the training step) while the caller trains on batch n. Exceptions of the
    thread are raised in the caller. `len()` is the worker loader's.
    """

    def __init__(self, loader, decoder: BatchDecoder, depth: int = 2):
        self.loader, self.decoder, self.depth = loader, decoder, int(depth)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        device = self.decoder.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        done = object()
        slots: "queue.Queue" = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce():
            try:
                if stream is not None:
                    torch.cuda.set_device(device)
                for raw in self.loader:
                    if stop.is_set():
                        return
                    if stream is None:
                        slots.put((self.decoder(raw), None))
                        continue
                    with torch.cuda.stream(stream):
                        batch = self.decoder(raw)
                        ready = torch.cuda.Event()
                        ready.record(stream)
                    slots.put((batch, ready))
                slots.put((done, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                slots.put((e, None))

        worker = threading.Thread(target=produce, name="localmim-gpu-decode", daemon=True)
        worker.start()
        try:
            while True:
                batch, ready = slots.get()
                if batch is done:
                    return
                if isinstance(batch, BaseException):
                    raise batch
                if ready is not None:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(ready)
                    batch["images"].record_stream(current)
                    for v in batch["masks"].values():
                        v.record_stream(current)
                yield batch
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    slots.get(timeout=0.1)
                except queue.Empty:
                    pass
            worker.join()


def check_device(device: torch.device) -> None:
    """GpuDecodeUnavailable unless `device` is a CUDA device and CUDA is available."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise GpuDecodeUnavailable(
            f"data.decode: gpu decodes JPEGs with nvJPEG on a CUDA GPU, and this run's device is "
            f"{torch.device(device).type} (CUDA available: {torch.cuda.is_available()}); use data.decode=cpu")


def build_gpu_decode_loader(cfg, spec, device: torch.device, rank: int = 0, world: int = 1,
                            dataset: Optional[EncodedDataset] = None, require_cuda: bool = True,
                            static_plans: bool = False):
    """(GpuDecodeLoader, batch_sampler) for one rank: the CPU loader's sampler, seeds and masks
    (static_plans as in data.build_pretrain_loader), images decoded on `device`. require_cuda=False
    lets tests run the same code on the CPU."""
    if require_cuda:
        check_device(device)
    dataset = dataset if dataset is not None else images.build_pretrain_dataset(
        cfg, spec, EncodedDataset, images.PretrainTransform)
    sampler = data_mod.ShardedBatchSampler(len(dataset), cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
                                           world=world)
    if getattr(spec, "family", "vit") == "swin":
        collate = EncodedSwinPlanCollate(cfg.train.seed, rank, spec, cfg.mask.ratio, static=static_plans)
    else:
        collate = EncodedMaskCollate(cfg.train.seed, rank, spec.num_patches, cfg.mask.ratio)
    workers = int(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals)
    return GpuDecodeLoader(loader, BatchDecoder(spec.img_size, device, fallback=dataset)), sampler
