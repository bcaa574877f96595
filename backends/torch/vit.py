"""LocalMIM ViT for pretraining (docs/method.md#vit-encoder): MAE-style encoder on visible tokens, four local decoders
with rescaling heads, HOG or pixel targets and the multi-scale masked MSE loss.

`model.state_dict()` keys are exactly the canonical names of docs/internals.md, so the
canonical state is a float32 numpy copy of the state dict.

Masks are sampled outside the model (core.masking) and passed in as one dict, `model(imgs, masks)`:
`ids_keep` (B, K) int64, `ids_restore` (B, N) int64 and `mask` (B, N) float (1 = masked, raster
order).
"""
from __future__ import annotations

from typing import List, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from localmim.backends.torch import targets as T
from localmim.backends.torch.layers import LN_EPS, Block, LayerNorm2d, PatchEmbed
from localmim.backends.torch.model import LocalMIMModel, init_linear_and_norm
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import ViTSpec

__all__ = ["LocalMIMViT", "LocalDecoder", "build_pred_head"]


def _frozen_table(dim: int, grid: int) -> nn.Parameter:
    """Fixed 2-D sin-cos table (1, 1+grid^2, dim) with a zero cls row, not trainable
    (docs/method.md#sin-cos-position-tables)."""
    table = torch.from_numpy(np.asarray(sincos_2d(dim, grid, cls_token=True), dtype=np.float32))
    return nn.Parameter(table.unsqueeze(0), requires_grad=False)


def build_pred_head(scale: float, dim: int, out_dim: int) -> nn.Sequential:
    """Rescaling head of one branch; index layout fixed by docs/internals.md.

    (B, dim, g, g) -> (B, out_dim, s*g, s*g). Scale 4: ConvT(d, d/2) . LN2d . GELU . ConvT(d/2, d/4)
    . 1x1; scale 2: ConvT(d, d/2) . 1x1; scale 1: 1x1; scale 0.5: AvgPool 2x2 . 1x1. All convs keep
    PyTorch's default init.
    """
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
            nn.Conv2d(dim // 4, out_dim, kernel_size=1),
        )
    if scale == 2.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
            nn.Conv2d(dim // 2, out_dim, kernel_size=1),
        )
    if scale == 1.0:
        return nn.Sequential(nn.Conv2d(dim, out_dim, kernel_size=1))
    if scale == 0.5:
        return nn.Sequential(nn.AvgPool2d(kernel_size=2, stride=2), nn.Conv2d(dim, out_dim, kernel_size=1))
    raise ValueError(f"no rescaling head for scale {scale}; supported scales are 4, 2, 1, 0.5")


class LocalDecoder(nn.Module):
    """One branch decoder (docs/method.md#vit-decoders): embed, mask tokens + unshuffle, pos add,
    blocks, norm, pred head.

    in_dim: encoder width D; dim: decoder width d; grid: patch grid side g (N = g^2);
    out_dim: features per output token; the output grid is scale * g.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int, scale: float,
                 out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = grid
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = _frozen_table(dim, grid)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        # Linear/LayerNorm init before the head exists, so the head's convs keep PyTorch defaults.
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)
        self.pred = build_pred_head(scale, dim, out_dim)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: (B, 1+K, D) tapped latent (cls first); ids_restore: (B, N) -> (B, (s*g)^2, out_dim)."""
        x = self.embed(x)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        fmap = x[:, 1:].transpose(1, 2).reshape(b, self.dim, self.grid, self.grid)
        return self.pred(fmap).flatten(2).transpose(1, 2)


class LocalMIMViT(LocalMIMModel):
    """LocalMIM ViT pretraining model built from a `core.specs.ViTSpec` (docs/method.md#vit-encoder)."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        if not isinstance(spec, ViTSpec):
            raise TypeError(f"LocalMIMViT needs a core.specs.ViTSpec, got {type(spec).__name__}")
        self.spec = spec
        self.branches = spec.branches()
        self.taps = tuple(spec.taps)
        d = spec.embed_dim

        # Encoder, initialised before the decoders exist (docs/method.md#initialisation).
        self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, 3, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = _frozen_table(d, spec.grid)
        self.blocks = nn.ModuleList([Block(d, spec.num_heads, spec.mlp_ratio) for _ in range(spec.depth)])
        self.norm = nn.ModuleList([nn.LayerNorm(d, eps=LN_EPS) for _ in self.taps])
        self._init_encoder()

        out_dims = spec.out_dims()
        self.decoder = nn.ModuleList([
            LocalDecoder(d, br.decoder_dim, br.decoder_depth, br.decoder_heads, spec.grid, br.scale,
                         out, spec.mlp_ratio)
            for br, out in zip(self.branches, out_dims)])
        if spec.target.kind == "hog":
            self.hog_enc = nn.ModuleList([T.HOGLayer(bias=spec.target.hog_bias) for _ in self.branches])

    def _init_encoder(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("patch_embed"):
                continue
            init_linear_and_norm(module)

    # ------------------------------------------------------------------ forward passes
    def forward_encoder(self, imgs: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        """imgs (B, 3, S, S), masks["ids_keep"] (B, K) -> one branch-normed (B, 1+K, D) tap per branch.

        Blocks after the last tap do not influence the loss and are not run.
        """
        ids_keep = masks["ids_keep"]
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        latents = []
        for i, blk in enumerate(self.blocks[: self.taps[-1] + 1]):
            x = blk(x)
            if i in self.taps:
                latents.append(self.norm[self.taps.index(i)](x))
        return latents

    def forward_decoders(self, latents: Sequence[torch.Tensor],
                         masks: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        """One (B, L_k, out_k) prediction per branch, L_k = (scale_k * grid)^2, raster order."""
        return [dec(z, masks["ids_restore"]) for dec, z in zip(self.decoder, latents)]

    def branch_masks(self, masks: Mapping[str, torch.Tensor], batch: int) -> List[torch.Tensor]:
        """Per-branch float32 masks (B, L_k) from the patch mask masks["mask"] (B, N)."""
        return T.scale_masks(masks["mask"], self.spec.grid, self.spec.scales)
