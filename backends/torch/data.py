"""Pretraining data for the PyTorch backend: the framework-neutral dataset, augmentation, sampler
and mask arithmetic of `localmim.backends.images` as torch Dataset / Sampler / collate classes,
and the DataLoader that drives them.

Determinism (what makes resume and any worker count give the same numbers) is that of
`localmim.backends.images`: data order from (seed, epoch), augmentation from (seed, epoch, index),
the mask of micro-batch b of epoch e on rank r from `core.masking.mask_rng(seed, e, b, r)`.

Batches are dicts {"images" (B,3,S,S) float32 ImageNet-normalised, "masks": the model's second
argument as tensors}: for ViT {"ids_keep" (B,K) int64, "ids_restore" (B,N) int64, "mask" (B,N)
float32 (1 = masked)}, for Swin the arrays of core.swin_plan.build_swin_plan(spec,
swin_cell_mask(mask_rng(seed, e, b, r), ...)).to_arrays() (one cell mask per batch and rank; compiled
training pads every plan to the shapes of core.swin_plan.static_plan_bounds).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

from localmim.backends import images
from localmim.backends.loop import ignore_stop_signals
from localmim.backends.images import (IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, find_images, load_rgb,
                                      random_resized_crop_params)

__all__ = [
    "IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "find_images", "load_rgb",
    "random_resized_crop_params", "PretrainTransform", "PretrainDataset", "ShardedBatchSampler",
    "MaskCollate", "SwinPlanCollate", "build_pretrain_dataset", "build_pretrain_loader",
]


class PretrainTransform(images.PretrainTransform):
    """RandomResizedCrop(bicubic) + horizontal flip + ToTensor + ImageNet normalisation.

    All randomness comes from the generator passed to __call__. Images smaller than the crop are
    upscaled by the resize, not rejected.
    """

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """img: RGB PIL image -> (3, S, S) float32 tensor."""
        return torch.from_numpy(super().__call__(img, rng))


class PretrainDataset(images.PretrainDataset, torch.utils.data.Dataset):
    """`localmim.backends.images.PretrainDataset` as a torch Dataset."""


class ShardedBatchSampler(images.ShardedBatchSampler, torch.utils.data.Sampler):
    """`localmim.backends.images.ShardedBatchSampler` as a torch (batch) Sampler."""


class TensorBatches:
    """Batches of torch tensors: image tensors stacked, mask arrays wrapped without a copy. Runs in
    the loader workers, so the integer bookkeeping stays off the training step."""

    def stack(self, images_):
        return torch.stack(images_)

    def wrap(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)


class MaskCollate(TensorBatches, images.MaskCollate):
    """`localmim.backends.images.MaskCollate` (ViT masks) as torch tensors."""


class SwinPlanCollate(TensorBatches, images.SwinPlanCollate):
    """`localmim.backends.images.SwinPlanCollate` (Swin grouping plans) as torch tensors."""


def build_pretrain_dataset(cfg, spec) -> PretrainDataset:
    """The dataset of `cfg.data.path` with the augmentation for `spec.img_size`."""
    return images.build_pretrain_dataset(cfg, spec, PretrainDataset, PretrainTransform)


def build_pretrain_loader(cfg, spec, rank: int = 0, world: int = 1, pin_memory: bool = False,
                          dataset: Optional[PretrainDataset] = None, static_plans: bool = False):
    """DataLoader of mask-carrying batches for one rank. Returns (loader, batch_sampler).

    Drive it with `batch_sampler.set_epoch(epoch, start_batch, num_batches)` then `iter(loader)`.
    static_plans (Swin only) pads every plan to the shapes of core.swin_plan.static_plan_bounds
    (what a compiled step with static shapes needs).
    """
    dataset = dataset if dataset is not None else build_pretrain_dataset(cfg, spec)
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, seed=cfg.train.seed, rank=rank, world=world)
    if getattr(spec, "family", "vit") == "swin":
        collate = SwinPlanCollate(cfg.train.seed, rank, spec, cfg.mask.ratio, static=static_plans)
    else:
        collate = MaskCollate(cfg.train.seed, rank, spec.num_patches, cfg.mask.ratio)
    workers = int(cfg.data.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals)  # a SIGTERM to the job must reach the main process only
    return loader, sampler
