"""Pretraining data for the MindSpore backend: the same dataset, augmentation, sharding and masks
as `localmim.backends.torch.data` (the framework-neutral parts live in `localmim.backends.images`,
re-exported here), so both backends see the same images and masks for the same (seed, epoch, index).

Determinism (what makes resume and any worker count give the same numbers):
- data order of epoch e: `numpy.random.default_rng([seed, e]).permutation(n)`, padded and sharded
  per rank like `torch.utils.data.DistributedSampler` (`rank::world`), batches with drop_last;
- augmentation of sample i in epoch e: `numpy.random.default_rng([seed, e, i])`;
- mask of micro-batch b of epoch e (b counted from 0 within the epoch, on every rank) on rank r:
  `core.masking.vit_mask(core.masking.mask_rng(seed, e, b, r), ...)`, as in the torch twin.

Batches are dicts of numpy arrays {"images" (B,3,S,S) float32 ImageNet-normalised, "masks": the
model's second argument}: for ViT {"ids_keep" (B,K) int64, "ids_restore" (B,N) int64, "mask" (B,N)
float32 (1 = masked)}, for Swin the arrays of core.swin_plan.build_swin_plan(spec,
swin_cell_mask(mask_rng(seed, e, b, r), ...)) (one cell mask per batch and rank; compiled training
pads every plan to the shapes of core.swin_plan.static_plan_bounds). The step object turns them
into mindspore Tensors.

Two loaders produce identical batches: `PretrainLoader` (a plain Python iterator, optionally with
a thread pool that decodes the samples of a batch in parallel) and the same source wrapped in
`mindspore.dataset.GeneratorDataset` (`backend="generator"`). Measured on 2 shared CPU cores
(64 JPEGs of 500x375 -> 224 px, batch 16): plain 182 img/s (0 workers) / 199 (2 threads),
GeneratorDataset 193 (1 worker) / 208 (2 workers): equal within noise, while GeneratorDataset
costs ~0.1 s of pipeline start-up per epoch (17x slower on the tiny test images). The plain
iterator is the default.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from localmim.backends import images
from localmim.backends.images import (IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, PretrainDataset,
                                      PretrainTransform, ShardedBatchSampler, find_images, load_rgb,
                                      random_resized_crop_params)

__all__ = [
    "IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ColumnBatches", "find_images", "load_rgb",
    "random_resized_crop_params", "PretrainTransform", "PretrainDataset", "ShardedBatchSampler",
    "MaskCollate", "SwinPlanCollate", "PretrainLoader", "build_pretrain_dataset",
    "build_pretrain_loader",
]

class ColumnBatches:
    """Batch dicts <-> GeneratorDataset rows: one column "images" and one "masks:<name>" per mask
    array, in `columns` order (`mask_keys` comes from the collate class)."""

    @property
    def columns(self) -> Tuple[str, ...]:
        return ("images",) + tuple("masks:" + k for k in self.mask_keys)

    def flatten(self, batch: Dict) -> tuple:
        """Batch dict -> tuple of arrays in `columns` order (a GeneratorDataset row)."""
        return (batch["images"],) + tuple(batch["masks"][k] for k in self.mask_keys)

    def unflatten(self, row: Dict[str, np.ndarray]) -> Dict:
        """GeneratorDataset row (dict by column) -> batch dict."""
        return {"images": row["images"], "masks": {k: row["masks:" + k] for k in self.mask_keys}}


class MaskCollate(ColumnBatches, images.MaskCollate):
    """`localmim.backends.images.MaskCollate` (ViT masks) as numpy arrays and GeneratorDataset rows."""


class SwinPlanCollate(ColumnBatches, images.SwinPlanCollate):
    """`localmim.backends.images.SwinPlanCollate` (Swin grouping plans) as numpy arrays and
    GeneratorDataset rows."""


class _BatchSource:
    """Random-access list of the current epoch's batches, as tuples in `collate.columns` order.

    This is the `source` of mindspore.dataset.GeneratorDataset; it is also what the plain loader
    runs. `pool`: optional thread pool that decodes the samples of one batch in parallel.
    """

    def __init__(self, dataset: PretrainDataset, keys: List[List[Tuple[int, int, int]]], collate,
                 pool: Optional[ThreadPoolExecutor] = None):
        self.dataset, self.keys, self.collate, self.pool = dataset, keys, collate, pool

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, i: int) -> Dict[str, np.ndarray]:
        keys = self.keys[i]
        items = list(self.pool.map(self.dataset.__getitem__, keys)) if self.pool else [self.dataset[k] for k in keys]
        return self.collate(items)

    def __getitem__(self, i: int):
        return self.collate.flatten(self.batch(i))


class PretrainLoader:
    """Iterable of batch dicts for one rank; drive it with `sampler.set_epoch(...)` then `iter()`.

    backend "python": plain iterator; with num_workers > 0 a thread pool decodes the samples of a
    batch in parallel and the next batch is prepared while the current one trains.
    backend "generator": the same batches through mindspore.dataset.GeneratorDataset with
    num_parallel_workers = max(1, num_workers) (shuffle off: the order is ours).
    """

    def __init__(self, dataset: PretrainDataset, sampler: ShardedBatchSampler, collate,
                 num_workers: int = 0, backend: str = "python"):
        if backend not in ("python", "generator"):
            raise ValueError(f"data loader backend {backend!r} must be 'python' or 'generator'")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.num_workers, self.backend = int(num_workers), backend
        self._pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 0 and backend == "python" else None

    def __len__(self) -> int:
        return len(self.sampler)

    def _source(self) -> _BatchSource:
        return _BatchSource(self.dataset, list(self.sampler), self.collate, self._pool)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        source = self._source()
        if self.backend == "generator":
            yield from self._iter_generator(source)
        elif self._pool is None:
            for i in range(len(source)):
                yield source.batch(i)
        else:
            yield from self._iter_prefetch(source)

    def _iter_prefetch(self, source: _BatchSource) -> Iterator[Dict[str, np.ndarray]]:
        # One batch ahead on a separate thread; inside it the pool decodes samples in parallel.
        if len(source) == 0:
            return
        with ThreadPoolExecutor(1) as ahead:
            nxt = ahead.submit(source.batch, 0)
            for i in range(len(source)):
                cur = nxt.result()
                if i + 1 < len(source):
                    nxt = ahead.submit(source.batch, i + 1)
                yield cur

    def _iter_generator(self, source: _BatchSource) -> Iterator[Dict[str, np.ndarray]]:
        if len(source) == 0:
            return
        import mindspore.dataset as ds
        gen = ds.GeneratorDataset(source, column_names=list(self.collate.columns), shuffle=False,
                                  num_parallel_workers=max(1, self.num_workers), python_multiprocessing=False)
        for row in gen.create_dict_iterator(num_epochs=1, output_numpy=True):
            yield self.collate.unflatten(row)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def build_pretrain_dataset(cfg, spec) -> PretrainDataset:
    """The dataset of `cfg.data.path` with the augmentation for `spec.img_size`."""
    return images.build_pretrain_dataset(cfg, spec, PretrainDataset, PretrainTransform)


def build_pretrain_loader(cfg, spec, rank: int = 0, world: int = 1, dataset: Optional[PretrainDataset] = None,
                          backend: str = "python", static_plans: bool = False):
    """Loader of mask-carrying numpy batches for one rank. Returns (loader, batch_sampler).

    Drive it with `batch_sampler.set_epoch(epoch, start_batch, num_batches)` then `iter(loader)`.
    The default backend is the plain iterator (as fast as GeneratorDataset on 2 CPU cores at
    224 px, without its per-epoch start-up cost; see the module docstring). ViT specs get
    MaskCollate batches, Swin specs SwinPlanCollate batches; static_plans (Swin only) pads every
    plan to the shapes of core.swin_plan.static_plan_bounds (what compiled training needs).
    """
    dataset = dataset if dataset is not None else build_pretrain_dataset(cfg, spec)
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, seed=cfg.train.seed, rank=rank, world=world)
    if getattr(spec, "family", "vit") == "swin":
        collate = SwinPlanCollate(cfg.train.seed, rank, spec, cfg.mask.ratio, static=static_plans)
    else:
        collate = MaskCollate(cfg.train.seed, rank, spec.num_patches, cfg.mask.ratio)
    loader = PretrainLoader(dataset, sampler, collate, num_workers=int(cfg.data.num_workers), backend=backend)
    return loader, sampler
