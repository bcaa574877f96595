"""LocalMIM ViT for pretraining in MindSpore (twin of backends/torch/vit.py; docs/method.md#vit-encoder).

An MAE-style ViT encoder on the visible patches with taps after the blocks in `spec.taps`, each
tap normalised by its own branch LayerNorm (`norm.{k}`), four independent local decoders
(`decoder.{k}`) with rescaling heads for scales 4, 2, 1, 0.5, and frozen HOG gradient filters
(`hog_enc.{k}`, HOG targets only). MindSpore parameter names are the canonical names of
docs/internals.md, so `export_state()` is a plain name -> numpy map and a `.ckpt` of this
model needs no renaming.

Masks come from `localmim.core.masking` (numpy) and are passed in as one dict, `model(imgs, masks)`:
ids_keep (B, K) int64, ids_restore (B, N) int64, mask (B, N) float32 with 1 = masked.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Uniform, initializer

from localmim.core.pos_embed import sincos_2d
from localmim.core.state import StateError  # re-exported
from localmim.core.specs import ViTSpec
from localmim.backends.mindspore import targets as T
from localmim.backends.mindspore.model import LocalMIMModel
from localmim.backends.mindspore.layers import (
    LN_EPS, AvgPool2x2, Block, Conv1x1, ConvTranspose2x2, GELU, LayerNorm, LayerNorm2d, Linear, PatchEmbed,
)

__all__ = ["LocalDecoder", "LocalMIMViT", "build_pred_head", "StateError"]


def build_pred_head(scale: float, dim: int, out_dim: int) -> nn.SequentialCell:
    """The rescaling head of one branch on channels-last maps (B, g, g, dim) -> (B, s*g, s*g, out_dim).

    Indices follow docs/internals.md: scale 4 -> [ConvT(d, d/2), LayerNorm2d(d/2), GELU,
    ConvT(d/2, d/4), Conv1x1(d/4, out)]; scale 2 -> [ConvT(d, d/2), Conv1x1(d/2, out)];
    scale 1 -> [Conv1x1(d, out)]; scale 0.5 -> [AvgPool 2x2, Conv1x1(d, out)].
    """
    if scale == 4.0:
        layers = [ConvTranspose2x2(dim, dim // 2), LayerNorm2d(dim // 2, LN_EPS, channels_last=True), GELU(),
                  ConvTranspose2x2(dim // 2, dim // 4), Conv1x1(dim // 4, out_dim)]
    elif scale == 2.0:
        layers = [ConvTranspose2x2(dim, dim // 2), Conv1x1(dim // 2, out_dim)]
    elif scale == 1.0:
        layers = [Conv1x1(dim, out_dim)]
    elif scale == 0.5:
        layers = [AvgPool2x2(), Conv1x1(dim, out_dim)]
    else:
        raise ValueError(f"no rescaling head for scale {scale}; supported scales are 4, 2, 1 and 0.5")
    return nn.SequentialCell(layers)


class LocalDecoder(nn.Cell):
    """One branch's decoder (docs/method.md#vit-decoders): embed, mask tokens, un-shuffle, pos-embed,
    blocks, norm, head.

    Input latent (B, 1+K, in_dim) (cls first, visible tokens in shuffled order) and ids_restore
    (B, N); output (B, (s*g)^2, out_dim) in raster order of the branch grid.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int, scale: float,
                 out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim = int(dim)
        self.grid = int(grid)
        self.num_patches = self.grid * self.grid
        self.out_dim = int(out_dim)
        self.out_grid = int(self.grid * scale)
        self.embed = Linear(in_dim, dim)
        self.mask_token = Parameter(Tensor(np.zeros((1, 1, dim), np.float32)), name="mask_token")
        self.pos_embed = Parameter(Tensor(sincos_2d(dim, self.grid, cls_token=True)[None]),
                                   name="pos_embed", requires_grad=False)
        self.blocks = nn.CellList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(dim, LN_EPS)
        self.pred = build_pred_head(scale, dim, out_dim)

    def construct(self, latent, ids_restore):
        x = self.embed(latent)
        b, length, d = x.shape
        n = self.num_patches
        mask_tokens = ops.broadcast_to(self.mask_token, (b, n + 1 - length, d))
        x_ = ops.concat((x[:, 1:, :], mask_tokens), axis=1)
        index = ops.broadcast_to(ids_restore.expand_dims(-1), (b, n, d))
        x_ = ops.gather_elements(x_, 1, index)
        x = ops.concat((x[:, :1, :], x_), axis=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = x[:, 1:, :].reshape(b, self.grid, self.grid, d)
        x = self.pred(x)
        return x.reshape(b, self.out_grid * self.out_grid, self.out_dim)


class LocalMIMViT(LocalMIMModel):
    """LocalMIM ViT pretraining model built from a `core.specs.ViTSpec`.

    Public methods (same names as the torch twin): forward_encoder, forward_decoders,
    forward_targets, construct (the torch `forward`), export_state, import_state.
    """

    def __init__(self, spec: ViTSpec):
        if not isinstance(spec, ViTSpec):
            raise TypeError(f"LocalMIMViT needs a core.specs.ViTSpec, got {type(spec).__name__}")
        super().__init__(spec)
        self.grid = spec.grid
        self.num_patches = spec.num_patches
        self.scales = tuple(b.scale for b in self.branch_specs)
        d = spec.embed_dim
        # tap_branch[i] = branch fed by block i, or -1 (a compile-time constant under ms.jit)
        self.tap_branch = tuple(spec.taps.index(i) if i in spec.taps else -1 for i in range(spec.depth))
        self.last_tap = max(spec.taps)

        self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, 3, d)
        self.cls_token = Parameter(Tensor(np.zeros((1, 1, d), np.float32)), name="cls_token")
        self.pos_embed = Parameter(Tensor(sincos_2d(d, self.grid, cls_token=True)[None]),
                                   name="pos_embed", requires_grad=False)
        self.blocks = nn.CellList([Block(d, spec.num_heads, spec.mlp_ratio) for _ in range(spec.depth)])
        self.norm = nn.CellList([LayerNorm(d, LN_EPS) for _ in range(self.num_branches)])
        self._init_encoder()

        self.decoder = nn.CellList([
            LocalDecoder(b.in_dim, b.decoder_dim, b.decoder_depth, b.decoder_heads, self.grid, b.scale, out,
                         spec.mlp_ratio)
            for b, out in zip(self.branch_specs, self.out_dims)])
        self._init_decoders()
        if self.target_kind == "hog":
            self.hog_enc = nn.CellList([T.HOGLayer(bias=self.hog_bias) for _ in range(self.num_branches)])
        else:
            self.hog_enc = None

    # ------------------------------------------------ initialisation (docs/method.md#initialisation)

    @staticmethod
    def _set(param: Parameter, init):
        param.set_data(initializer(init, param.shape, ms.float32))

    def _init_linear(self, layer: Linear):
        fan_out, fan_in = layer.weight.shape
        self._set(layer.weight, Uniform(math.sqrt(6.0 / (fan_in + fan_out))))
        if layer.has_bias:
            self._set(layer.bias, "zeros")

    def _init_encoder(self):
        """MAE initialize_weights: xavier linears (fused qkv as one matrix), normal(0.02) cls token."""
        w = self.patch_embed.proj.weight
        fan_out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))
        self._set(w, Uniform(math.sqrt(6.0 / (fan_in + fan_out))))
        self._set(self.patch_embed.proj.bias, Uniform(1.0 / math.sqrt(fan_in)))
        self._set(self.cls_token, Normal(0.02))
        for _, cell in self.blocks.cells_and_names():
            if isinstance(cell, Linear):
                self._init_linear(cell)

    def _init_decoders(self):
        """Decoder linears xavier, mask tokens normal(0.02); pred-head convs PyTorch default."""
        for dec in self.decoder:
            self._set(dec.mask_token, Normal(0.02))
            for _, cell in dec.cells_and_names():
                if isinstance(cell, Linear):
                    self._init_linear(cell)
                elif isinstance(cell, (Conv1x1, ConvTranspose2x2)):
                    # kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)); torch's fan_in is
                    # weight.shape[1] * k * k for both Conv (in) and ConvTranspose (out) layouts.
                    w = cell.weight
                    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
                    bound = 1.0 / math.sqrt(fan_in)
                    self._set(w, Uniform(bound))
                    self._set(cell.bias, Uniform(bound))

    # ---------------------------------------------------------------- forward passes

    def forward_encoder(self, imgs, masks) -> List[Tensor]:
        """imgs (B, 3, S, S), masks["ids_keep"] (B, K) -> list of branch-normed taps, each (B, 1+K, D)."""
        ids_keep = masks["ids_keep"]
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        b, _, d = x.shape
        k = ids_keep.shape[1]
        index = ops.broadcast_to(ids_keep.expand_dims(-1), (b, k, d))
        x = ops.gather_elements(x, 1, index)
        cls = ops.broadcast_to(self.cls_token + self.pos_embed[:, :1, :], (b, 1, d))
        x = ops.concat((cls, x), axis=1)
        latents = []
        for i in range(self.last_tap + 1):
            x = self.blocks[i](x)
            branch = self.tap_branch[i]
            if branch >= 0:
                latents.append(self.norm[branch](x))
        return latents

    def forward_decoders(self, latents, masks) -> List[Tensor]:
        """Branch k decodes latents[k] -> (B, L_k, out_k) in raster order of its grid."""
        return [self.decoder[k](latents[k], masks["ids_restore"]) for k in range(self.num_branches)]

    def branch_masks(self, masks, batch: int) -> List[Tensor]:
        """Per-branch float32 masks (B, L_k) from the patch mask masks["mask"] (B, N) (nearest
        repeat / 2x2 average)."""
        return T.scale_masks(masks["mask"], self.grid, self.scales)
