"""Frozen-encoder features of a LocalMIM model for evaluation and dense tasks (PyTorch; twin of
backends/mindspore/features.py, docs/method.md#feature-maps and docs/evaluation.md).

The encoder runs unmasked: a ViT keeps every patch (ids_keep 0..N-1), a Swin runs on the plan of
an all-visible cell mask (core.features.unmasked_swin_plan: the plain shifted-window Swin). What
comes out (shapes in core.features):

- `Encoder(model, pool).encode(images)`: (B, E) pooled embedding. ViT: the last tap's branch
  LayerNorm (`norm.{last}`, the encoder's final norm) on every token, then the mean of the patch
  tokens (pool "avg") or the cls token (pool "cls"). Swin: the last stage's branch LayerNorm, then
  the mean over tokens;
- `Encoder.feature_maps(images)`: ViT: the patch tokens after each tapped block, cls dropped and no
  norm, as (B, D, g, g); Swin: each stage's output before its patch merging, (B, C_i, r_i, r_i);
- `ViTBackbone(model)`: an nn.Module whose forward(images) returns the tuple of four maps of the
  simple feature pyramid (strides p/4, p/2, p, 2p), the way mmdetection / mmsegmentation backbones
  do; its pyramid layers are new (trained by the downstream task).

`encode` and `feature_maps` take numpy arrays (-> numpy, float32) or tensors (-> tensors), run
without gradients and leave the model's train/eval mode as it is (LocalMIM encoders have no
dropout or batch norm, so the mode does not change their output).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from localmim.backends.torch.swin import plan_tensors, window_inputs
from localmim.core.features import POOLS, full_vit_ids, swin_raster_orders, unmasked_swin_plan

__all__ = ["Encoder", "load_encoder", "random_encoder", "vit_taps", "vit_embedding", "swin_stages", "swin_embedding",
           "tokens_to_map", "SimpleFeaturePyramid", "ViTBackbone"]


def tokens_to_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side*side, C) raster-ordered tokens -> (B, C, side, side)."""
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def vit_taps(model, imgs: torch.Tensor) -> List[torch.Tensor]:
    """The unmasked ViT encoder: (B, 1+N, D) output of each tapped block (cls first, no norm).

    The same arithmetic as LocalMIMViT.forward_encoder with every patch kept, stopping at the last tap
    (later blocks are not trained by LocalMIM).
    """
    ids = torch.as_tensor(full_vit_ids(imgs.shape[0], model.spec.num_patches), device=imgs.device)
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    taps = []
    for i, blk in enumerate(model.blocks[: model.taps[-1] + 1]):
        x = blk(x)
        if i in model.taps:
            taps.append(x)
    return taps


def vit_embedding(model, last_tap: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1+N, D) last tap -> (B, D): its branch LayerNorm, then the patch mean or the cls token."""
    x = model.norm[len(model.taps) - 1](last_tap)
    return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)


def swin_stages(model, imgs: torch.Tensor, plan, orders: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The unmasked Swin encoder: each stage's (B, r_i^2, C_i) output before its merging, raster order.

    plan: the tensors of core.features.unmasked_swin_plan; orders: core.features.swin_raster_orders.
    """
    enc = model.encoder
    x = enc.patch_embed(imgs).index_select(1, plan["patch_index"])
    outs = []
    for i, stage in enumerate(enc.layers):
        windows = tuple(window_inputs(plan, i, j) for j in range(stage.num_windows))
        for b, blk in enumerate(stage.blocks):
            x = blk(x, windows[b % len(windows)])
        outs.append(x.index_select(1, orders[i]))
        if stage.downsample is not None:
            x = stage.downsample(x, plan[f"stage{i}.merge_index"])
    return outs


def swin_embedding(model, last_stage: torch.Tensor) -> torch.Tensor:
    """(B, N, C) last stage output -> (B, C): its branch LayerNorm, then the mean over tokens."""
    return model.encoder.norm[len(model.encoder.norm) - 1](last_stage).mean(dim=1)


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
        self._plan: Optional[dict] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _swin_inputs(self):
        if self._plan is None:
            plan = unmasked_swin_plan(self.spec)
            self._plan = (plan_tensors(plan, self.device),
                          [torch.as_tensor(o, device=self.device) for o in swin_raster_orders(plan)])
        return self._plan

    def _run(self, images) -> Tuple[List[torch.Tensor], torch.Tensor, bool]:
        """(four (B, N_k, C_k) raw tokens of the maps, (B, E) embedding, whether the input was numpy)."""
        as_numpy = not torch.is_tensor(images)
        imgs = torch.as_tensor(np.asarray(images, np.float32)) if as_numpy else images
        imgs = imgs.to(self.device, torch.float32)
        with torch.no_grad():
            if self.spec.family == "swin":
                plan, orders = self._swin_inputs()
                maps = swin_stages(self.model, imgs, plan, orders)
                return maps, swin_embedding(self.model, maps[-1]), as_numpy
            taps = vit_taps(self.model, imgs)
            return [t[:, 1:] for t in taps], vit_embedding(self.model, taps[-1], self.pool), as_numpy

    def encode(self, images):
        """(B, 3, S, S) ImageNet-normalised images -> (B, E) pooled embeddings."""
        _, emb, as_numpy = self._run(images)
        return emb.float().cpu().numpy() if as_numpy else emb

    def feature_maps(self, images) -> list:
        """(B, 3, S, S) -> four (B, C_k, H_k, W_k) maps (ViT: tapped blocks; Swin: stages before merging)."""
        tokens, _, as_numpy = self._run(images)
        maps = [tokens_to_map(t, int(round(t.shape[1] ** 0.5))) for t in tokens]
        return [m.float().cpu().numpy() for m in maps] if as_numpy else maps


def load_encoder(path: str, layout: Optional[str] = None, pool: str = "avg", **arch) -> Encoder:
    """An Encoder from a checkpoint of any supported layout (inference.load_pretrained: this package's
    .pth / .ckpt / .safetensors, official LocalMIM, MAE, timm); arch as load_pretrained takes it
    (img_size resamples the position tables)."""
    from localmim.backends.torch.inference import load_pretrained
    return Encoder(load_pretrained(path, layout, **arch), pool)


def random_encoder(spec, pool: str = "avg", seed: int = 0) -> Encoder:
    """The baseline: an Encoder of a freshly initialised model of `spec` (torch's generator seeded
    with `seed`, the pretraining initialisation of docs/method.md#initialisation)."""
    from localmim.backends.torch import build_model
    torch.manual_seed(int(seed))
    return Encoder(build_model(spec).eval(), pool)


class SimpleFeaturePyramid(nn.Module):
    """Four stride-p maps -> (stride p/4, p/2, p, 2p) maps of the same width (the reference's
    segmentation neck, docs/method.md#feature-maps): fpn1 ConvT 2x2 . BatchNorm . GELU . ConvT 2x2,
    fpn2 ConvT 2x2, fpn3 identity, fpn4 2x2 average pooling. Map k goes through fpn k+1."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.AvgPool2d(2, 2)

    def forward(self, maps: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """maps: four (B, D, g, g) -> ((B, D, 4g, 4g), (B, D, 2g, 2g), (B, D, g, g), (B, D, g/2, g/2))."""
        return tuple(f(m) for f, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps))


class ViTBackbone(nn.Module):
    """A ViT LocalMIM encoder as a dense-prediction backbone: forward(images (B, 3, S, S)) -> the
    tuple of the four simple-feature-pyramid maps (finest first), as mmdetection / mmsegmentation
    backbones return. Gradients flow (the downstream task trains encoder and pyramid)."""

    def __init__(self, model):
        super().__init__()
        if model.spec.family != "vit":
            raise ValueError(f"ViTBackbone needs a ViT; for the Swin {model.spec.name} use Encoder.feature_maps "
                             f"(its four stages are already strides 4-32)")
        self.model = model
        self.pyramid = SimpleFeaturePyramid(model.spec.embed_dim)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        g = self.model.spec.grid
        return self.pyramid([tokens_to_map(t[:, 1:], g) for t in vit_taps(self.model, images)])
