"""Frozen-encoder features of a LocalMIM model for evaluation and dense tasks (MindSpore; twin of
backends/torch/features.py, docs/method.md#feature-maps and docs/evaluation.md).

The encoder runs unmasked: a ViT keeps every patch (ids_keep 0..N-1), a Swin runs on the plan of
an all-visible cell mask (core.features.unmasked_swin_plan: the plain shifted-window Swin). What
comes out (shapes in core.features):

- `Encoder(model, pool).encode(images)`: (B, E) pooled embedding. ViT: the last tap's branch
  LayerNorm (`norm.{last}`, the encoder's final norm) on every token, then the mean of the patch
  tokens (pool "avg") or the cls token (pool "cls"). Swin: the last stage's branch LayerNorm, then
  the mean over tokens;
- `Encoder.feature_maps(images)`: ViT: the patch tokens after each tapped block, cls dropped and no
  norm, as (B, D, g, g); Swin: each stage's output before its patch merging, (B, C_i, r_i, r_i);
- `ViTBackbone(model)`: a Cell whose construct(images) returns the tuple of four maps of the
  simple feature pyramid (strides p/4, p/2, p, 2p), the way mmdetection / mmsegmentation backbones
  do; its pyramid layers are new (trained by the downstream task).

`encode` and `feature_maps` take numpy arrays (-> numpy, float32) or Tensors (-> Tensors), run in
PyNative without gradients and leave the model's train flag as it is (LocalMIM encoders have no
dropout or batch norm, so it does not change their output).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Uniform, initializer

from localmim.backends.mindspore.layers import AvgPool2x2, ConvTranspose2x2, GELU
from localmim.backends.mindspore.swin import plan_tensors, window_inputs
from localmim.core.features import POOLS, full_vit_ids, swin_raster_orders, unmasked_swin_plan

__all__ = ["Encoder", "load_encoder", "random_encoder", "vit_taps", "vit_embedding", "swin_stages", "swin_embedding",
           "tokens_to_map", "BatchNorm", "SimpleFeaturePyramid", "ViTBackbone"]


def tokens_to_map(tokens: Tensor, side: int) -> Tensor:
    """(B, side*side, C) raster-ordered tokens -> (B, C, side, side)."""
    b, n, c = tokens.shape
    return tokens.transpose(0, 2, 1).reshape(b, c, side, side)


def vit_taps(model, imgs: Tensor) -> List[Tensor]:
    """The unmasked ViT encoder: (B, 1+N, D) output of each tapped block (cls first, no norm).

    The same arithmetic as LocalMIMViT.forward_encoder with every patch kept, stopping at the last tap
    (later blocks are not trained by LocalMIM).
    """
    b = imgs.shape[0]
    ids = Tensor(full_vit_ids(b, model.spec.num_patches))
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
    d = x.shape[-1]
    x = ops.gather_elements(x, 1, ops.broadcast_to(ids.expand_dims(-1), (b, ids.shape[1], d)))
    cls = ops.broadcast_to(model.cls_token + model.pos_embed[:, :1, :], (b, 1, d))
    x = ops.concat((cls, x), axis=1)
    taps = []
    for i in range(model.last_tap + 1):
        x = model.blocks[i](x)
        if model.tap_branch[i] >= 0:
            taps.append(x)
    return taps


def vit_embedding(model, last_tap: Tensor, pool: str) -> Tensor:
    """(B, 1+N, D) last tap -> (B, D): its branch LayerNorm, then the patch mean or the cls token."""
    x = model.norm[model.num_branches - 1](last_tap)
    return x[:, 0] if pool == "cls" else x[:, 1:].mean(axis=1)


def swin_stages(model, imgs: Tensor, plan, orders: Sequence[Tensor]) -> List[Tensor]:
    """The unmasked Swin encoder: each stage's (B, r_i^2, C_i) output before its merging, raster order.

    plan: the Tensors of core.features.unmasked_swin_plan; orders: core.features.swin_raster_orders.
    """
    enc = model.encoder
    x = ops.gather(enc.patch_embed(imgs), plan["patch_index"], 1)
    outs = []
    for i, stage in enumerate(enc.layers):
        windows = tuple(window_inputs(plan, i, j) for j in range(stage.num_windows))
        for b, blk in enumerate(stage.blocks):
            x = blk(x, windows[b % len(windows)])
        outs.append(ops.gather(x, orders[i], 1))
        if stage.downsample is not None:
            x = stage.downsample(x, plan[f"stage{i}.merge_index"])
    return outs


def swin_embedding(model, last_stage: Tensor) -> Tensor:
    """(B, N, C) last stage output -> (B, C): its branch LayerNorm, then the mean over tokens."""
    return model.encoder.norm[len(model.encoder.norm) - 1](last_stage).mean(axis=1)


class Encoder:
    """The frozen, unmasked encoder of a LocalMIM model (ViT or Swin): `encode`, `feature_maps`.

    pool: "avg" (default) or "cls" (ViT only; a Swin always averages).
    """

    def __init__(self, model, pool: str = "avg"):
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r} must be one of {', '.join(POOLS)}")
        self.model, self.spec, self.pool = model, model.spec, pool
        if self.spec.family == "swin" and pool != "avg":
            raise ValueError(f"pool 'cls' needs a ViT; the Swin {self.spec.name} has no cls token (use avg)")
        self._plan: Optional[tuple] = None

    def _swin_inputs(self):
        if self._plan is None:
            plan = unmasked_swin_plan(self.spec)
            self._plan = (plan_tensors(plan), [Tensor(o) for o in swin_raster_orders(plan)])
        return self._plan

    def _run(self, images) -> Tuple[List[Tensor], Tensor, bool]:
        """(four (B, N_k, C_k) raw tokens of the maps, (B, E) embedding, whether the input was numpy)."""
        as_numpy = not isinstance(images, Tensor)
        imgs = Tensor(np.asarray(images, np.float32)) if as_numpy else images.astype(ms.float32)
        if self.spec.family == "swin":
            plan, orders = self._swin_inputs()
            maps = swin_stages(self.model, imgs, plan, orders)
            return maps, swin_embedding(self.model, maps[-1]), as_numpy
        taps = vit_taps(self.model, imgs)
        return [t[:, 1:] for t in taps], vit_embedding(self.model, taps[-1], self.pool), as_numpy

    def encode(self, images):
        """(B, 3, S, S) ImageNet-normalised images -> (B, E) pooled embeddings."""
        _, emb, as_numpy = self._run(images)
        return emb.asnumpy().astype(np.float32) if as_numpy else emb

    def feature_maps(self, images) -> list:
        """(B, 3, S, S) -> four (B, C_k, H_k, W_k) maps (ViT: tapped blocks; Swin: stages before merging)."""
        tokens, _, as_numpy = self._run(images)
        maps = [tokens_to_map(t, int(round(t.shape[1] ** 0.5))) for t in tokens]
        return [m.asnumpy().astype(np.float32) for m in maps] if as_numpy else maps


def load_encoder(path: str, layout: Optional[str] = None, pool: str = "avg", **arch) -> Encoder:
    """An Encoder from a checkpoint of any supported layout (inference.load_pretrained: this package's
    .pth / .ckpt / .safetensors, official LocalMIM, MAE, timm); arch as load_pretrained takes it
    (img_size resamples the position tables)."""
    from localmim.backends.mindspore.inference import load_pretrained
    return Encoder(load_pretrained(path, layout, **arch), pool)


def random_encoder(spec, pool: str = "avg", seed: int = 0) -> Encoder:
    """The baseline: an Encoder of a freshly initialised model of `spec` (MindSpore's generator
    seeded with `seed`, the pretraining initialisation of docs/method.md#initialisation)."""
    from localmim.backends.mindspore import build_model
    ms.set_seed(int(seed))
    model = build_model(spec)
    model.set_train(False)
    return Encoder(model, pool)


class BatchNorm(nn.Cell):
    """torch.nn.BatchNorm1d/2d semantics over the last axis of (..., C): training normalises with
    the batch mean and biased variance and moves running_mean / running_var (unbiased batch
    variance) by `momentum` (torch convention: new = (1 - m) old + m batch); eval uses the running
    statistics. affine=False: no weight / bias (MAE's linear-probe BatchNorm).

    Written out rather than nn.BatchNorm1d/2d: MindSpore's momentum counts the other way, its
    parameters are gamma / beta / moving_*, and it wants channels first, while the maps here are
    channels-last; this gives torch's names and numbers (parity, canonical state) directly.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True):
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = int(num_features), float(eps), float(momentum), affine
        c = self.num_features
        self.running_mean = Parameter(Tensor(np.zeros(c, np.float32)), name="running_mean", requires_grad=False)
        self.running_var = Parameter(Tensor(np.ones(c, np.float32)), name="running_var", requires_grad=False)
        if affine:
            self.weight = Parameter(Tensor(np.ones(c, np.float32)), name="weight")
            self.bias = Parameter(Tensor(np.zeros(c, np.float32)), name="bias")

    def construct(self, x):
        if self.training:
            flat = x.reshape(-1, self.num_features)
            n = flat.shape[0]
            mean = flat.mean(axis=0)
            var = ((flat - mean) ** 2).mean(axis=0)
            m = self.momentum
            ops.assign(self.running_mean, ops.stop_gradient((1.0 - m) * self.running_mean + m * mean))
            ops.assign(self.running_var, ops.stop_gradient((1.0 - m) * self.running_var + m * var * (n / max(n - 1, 1))))
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) / ops.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y

    def extend_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class SimpleFeaturePyramid(nn.Cell):
    """Four stride-p maps -> (stride p/4, p/2, p, 2p) maps of the same width (the reference's
    segmentation neck, docs/method.md#feature-maps): fpn1 ConvT 2x2 . BatchNorm . GELU . ConvT 2x2,
    fpn2 ConvT 2x2, fpn3 identity, fpn4 2x2 average pooling. Map k goes through fpn k+1. Parameter
    names and layouts are the torch twin's (fpn1.0.weight (D, D, 2, 2), fpn1.1.running_mean, ...)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.SequentialCell([ConvTranspose2x2(dim, dim), BatchNorm(dim), GELU(), ConvTranspose2x2(dim, dim)])
        self.fpn2 = nn.SequentialCell([ConvTranspose2x2(dim, dim)])
        self.fpn4 = AvgPool2x2()
        for conv in (self.fpn1[0], self.fpn1[3], self.fpn2[0]):
            # torch's ConvTranspose2d default: U(+-1/sqrt(fan_in)), fan_in = weight.shape[1] * 2 * 2
            bound = 1.0 / math.sqrt(conv.weight.shape[1] * 4)
            for param in (conv.weight, conv.bias):
                param.set_data(initializer(Uniform(bound), param.shape, ms.float32))

    def construct(self, maps):
        """maps: four (B, D, g, g) -> ((B, D, 4g, 4g), (B, D, 2g, 2g), (B, D, g, g), (B, D, g/2, g/2))."""
        last = [m.transpose(0, 2, 3, 1) for m in maps]  # the layers work on channels-last maps
        out = (self.fpn1(last[0]), self.fpn2(last[1]), last[2], self.fpn4(last[3]))
        return tuple(o.transpose(0, 3, 1, 2) for o in out)


class ViTBackbone(nn.Cell):
    """A ViT LocalMIM encoder as a dense-prediction backbone: construct(images (B, 3, S, S)) -> the
    tuple of the four simple-feature-pyramid maps (finest first), as mmdetection / mmsegmentation
    backbones return. Gradients flow (the downstream task trains encoder and pyramid)."""

    def __init__(self, model):
        super().__init__()
        if model.spec.family != "vit":
            raise ValueError(f"ViTBackbone needs a ViT; for the Swin {model.spec.name} use Encoder.feature_maps "
                             f"(its four stages are already strides 4-32)")
        self.model = model
        self.pyramid = SimpleFeaturePyramid(model.spec.embed_dim)

    def construct(self, images):
        g = self.model.spec.grid
        return self.pyramid([tokens_to_map(t[:, 1:], g) for t in vit_taps(self.model, images)])
