"""LocalMIM Swin for pretraining in MindSpore (twin of backends/torch/swin.py; spec §2).

A Swin encoder that attends among the visible tokens only (GreenMIM "group window attention",
§2.4), four branch LayerNorms (`encoder.norm.{k}`) on the stage outputs after patch merging
(§2.6), four transformer decoders (`decoder.{k}`, §2.7) and, for HOG targets, frozen gradient
filters (`hog_enc.{k}`). MindSpore parameter names are the canonical names of docs/internals.md,
so `export_state()` is a plain name -> numpy map.

Every integer of the masked forward comes from `core.swin_plan.build_swin_plan` (built by the data
loader) and is passed in as `plan`: a `SwinPlan`, its `to_arrays()` dict, or that dict with
MindSpore Tensors (`plan_tensors(plan)`; the form to pass under `ms.jit`). The model only gathers
and scatters with it:

    tokens   = patch_embed(imgs)[:, patch_index]                      (B, N0, C), cell-major
    block    = x + proj(attn(group(LN(x))))  then  x + MLP(LN(x))       group/ungroup with the plan
    merge    = Linear(LN(concat(x[:, merge_index])))                  (B, N_next, 2C), TL BL TR BR
    latent_k = encoder.norm.k(stage k output after its merging)        (B, N_{k+1}, in_k)
    pred_k   = pred(norm(blocks(scatter(embed(latent_k)) + pos_embed)))   (B, g_k^2, out_k), raster

Defects D1 (scrambled coordinates after merging) and D2 (TL, TR, BL, BR merge order) of the
reference are fixed by the plan (true coordinates, Swin order TL, BL, TR, BR). With a plan built
with fixed `pad_groups_to` and `group_size` every shape is static, so `construct` compiles under
`ms.jit` (spec O2).
"""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, TruncatedNormal, Uniform, initializer

from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import SwinSpec
from localmim.core.state import StateError  # re-exported
from localmim.core.swin_plan import SwinPlan
from localmim.backends.mindspore import targets as T
from localmim.backends.mindspore.model import LocalMIMModel
from localmim.backends.mindspore.layers import LN_EPS, Block, LayerNorm, Linear, Mlp, PatchEmbed

__all__ = [
    "WindowAttention", "SwinBlock", "PatchMerging", "SwinPatchEmbed", "SwinStage", "SwinEncoder",
    "SwinDecoder", "LocalMIMSwin", "build_swin", "plan_tensors", "StateError",
]


def plan_tensors(plan) -> Dict[str, Tensor]:
    """The plan as a dict of MindSpore Tensors (the keys of `SwinPlan.to_arrays()`).

    plan: a `core.swin_plan.SwinPlan`, or a dict of numpy arrays / Tensors with those keys.
    Index arrays become int64 Tensors, masks keep their dtype (float32 / bool).
    """
    if isinstance(plan, SwinPlan):
        plan = plan.to_arrays()
    if not isinstance(plan, dict):
        raise TypeError(f"a Swin plan must be a SwinPlan or a dict of arrays, got {type(plan).__name__}")
    out = {}
    for key, value in plan.items():
        if isinstance(value, Tensor):
            out[key] = value
        else:
            arr = np.asarray(value)
            if arr.dtype.kind in "iu":
                arr = arr.astype(np.int64)
            out[key] = Tensor(arr)
    return out


def _require_keys(plan: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in plan]
    if missing:
        raise KeyError(f"Swin plan for {where} lacks keys {missing[:6]} (build it with "
                       f"core.swin_plan.build_swin_plan for this spec)")


class WindowAttention(nn.Cell):
    """Multi-head attention inside groups of visible tokens with Swin's relative position bias.

    qkv.weight (3*dim, dim) rows [q | k | v], heads contiguous; relative_position_bias_table
    ((2w-1)^2, heads). No relative_position_index buffer: indices come from the plan.
    """

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = int(dim)
        self.window = int(window)
        self.num_heads = int(num_heads)
        self.head_dim = self.dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.relative_position_bias_table = Parameter(
            Tensor(np.zeros(((2 * self.window - 1) ** 2, self.num_heads), np.float32)),
            name="relative_position_bias_table")
        self.qkv = Linear(self.dim, 3 * self.dim)
        self.proj = Linear(self.dim, self.dim)

    def construct(self, x, attn_mask, rel_index):
        """x: (B, G, S, dim) grouped tokens; attn_mask (G, S, S) float32 0 / -100; rel_index (G, S, S)
        int64. Returns (B, G, S, dim). Logits: q k^T * scale + table[rel] * (mask == 0), then + mask."""
        b, g, s, c = x.shape
        h, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(b, g, s, 3, h, hd).transpose(3, 0, 1, 4, 2, 5)   # (3, B, G, h, S, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ops.matmul(q * self.scale, k.swapaxes(-1, -2))                       # (B, G, h, S, S)
        bias = ops.gather(self.relative_position_bias_table, rel_index.reshape(-1), 0)
        bias = bias.reshape(g, s, s, h).transpose(0, 3, 1, 2)                       # (G, h, S, S)
        keep = (attn_mask == 0).astype(bias.dtype).reshape(g, 1, s, s)
        attn = attn + (bias * keep).expand_dims(0)
        attn = attn + attn_mask.reshape(1, g, 1, s, s)
        attn = ops.softmax(attn, axis=-1)
        out = ops.matmul(attn, v).transpose(0, 1, 3, 2, 4).reshape(b, g, s, c)       # (B, G, S, dim)
        return self.proj(out)

    def extend_repr(self):
        return f"dim={self.dim}, window={self.window}, num_heads={self.num_heads}"


def group_tokens(x, group_index):
    """(B, N, C) -> (B, G, S, C): slot (g, s) holds x[:, group_index[g, s]], a zero row where it is -1."""
    b, n, c = x.shape
    g, s = group_index.shape
    padded = ops.concat((x, ops.zeros((b, 1, c), x.dtype)), axis=1)
    index = ops.where(group_index < 0, ops.full_like(group_index, n), group_index)
    return ops.gather(padded, index.reshape(-1), 1).reshape(b, g, s, c)


def ungroup_tokens(x, ungroup_index):
    """(B, G, S, C) -> (B, N, C): token i is slot ungroup_index[i] of the flattened groups (pads dropped)."""
    b, g, s, c = x.shape
    return ops.gather(x.reshape(b, g * s, c), ungroup_index, 1)


class SwinBlock(nn.Cell):
    """Swin block on visible tokens: x + Attn(group(LN(x))), then x + MLP(LN(x)); LN eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.window = int(window)
        self.norm1 = LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def construct(self, x, group_index, ungroup_index, attn_mask, rel_index):
        """x: (B, N, dim) visible tokens of the stage -> (B, N, dim)."""
        b, n, c = x.shape
        g, s = group_index.shape
        if n <= 2 * self.window * self.window and g == 1 and s == n:
            # masking mode (§2.4): one group holding the sequence in order, no gathers needed
            y = self.attn(self.norm1(x).reshape(b, 1, n, c), attn_mask, rel_index).reshape(b, n, c)
        else:
            y = group_tokens(self.norm1(x), group_index)
            y = ungroup_tokens(self.attn(y, attn_mask, rel_index), ungroup_index)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Cell):
    """2x2 merging of visible tokens: gather (N', 4) sources TL, BL, TR, BR -> LN(4C) -> Linear(4C, 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)
        self.norm = LayerNorm(4 * self.dim, eps=LN_EPS)
        self.reduction = Linear(4 * self.dim, 2 * self.dim, bias=False)

    def construct(self, x, merge_index):
        """x (B, N, C), merge_index (N', 4) int64 -> (B, N', 2C)."""
        b, _, c = x.shape
        m = merge_index.shape[0]
        x = ops.gather(x, merge_index.reshape(-1), 1).reshape(b, m, 4 * c)
        return self.reduction(self.norm(x))


class SwinPatchEmbed(PatchEmbed):
    """Patch embedding (conv as patchify + matmul, `proj.weight` (C, 3, p, p)) then LayerNorm `norm`.

    (B, 3, S, S) -> (B, (S/p)^2, C) in raster order of the patch grid.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int = 96):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.norm = LayerNorm(embed_dim, eps=LN_EPS)

    def construct(self, x):
        return self.norm(super().construct(x))


class SwinStage(nn.Cell):
    """One stage (`encoder.layers.{s}`): blocks alternating plain / shifted windows, then merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, num_windows: int,
                 downsample: bool, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_windows = int(num_windows)
        self.blocks = nn.CellList([SwinBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def construct(self, x, windows, merge_index):
        """x (B, N, C); windows: tuple over window configurations of (group_index, ungroup_index,
        attn_mask, rel_index); merge_index (N', 4) or None -> (B, N', 2C) (or (B, N, C) without merging)."""
        for b in range(len(self.blocks)):
            gi, ui, am, ri = windows[b % self.num_windows]
            x = self.blocks[b](x, gi, ui, am, ri)
        if self.downsample is not None:
            x = self.downsample(x, merge_index)
        return x


class SwinEncoder(nn.Cell):
    """The `encoder.` subtree: patch_embed, layers.{s}, norm.{k} (branch LayerNorms)."""

    def __init__(self, spec: SwinSpec):
        super().__init__()
        self.spec = spec
        self.num_stages = spec.num_stages
        self.patch_embed = SwinPatchEmbed(spec.img_size, spec.patch_size, 3, spec.embed_dim)
        self.layers = nn.CellList([
            SwinStage(spec.stage_dim(i), spec.depths[i], spec.num_heads[i], spec.stage_window(i),
                      2 if spec.stage_shift(i) > 0 else 1, i < spec.num_stages - 1, spec.mlp_ratio)
            for i in range(spec.num_stages)])
        self.norm = nn.CellList([LayerNorm(b.in_dim, eps=LN_EPS) for b in spec.branches()])

    def construct(self, imgs, plan):
        """imgs (B, 3, S, S), plan dict of Tensors -> list of branch latents (B, N_{k+1}, in_k)."""
        x = ops.gather(self.patch_embed(imgs), plan["patch_index"], 1)
        latents = []
        for i in range(self.num_stages):
            stage = self.layers[i]
            windows = tuple(
                (plan[f"stage{i}.win{j}.group_index"], plan[f"stage{i}.win{j}.ungroup_index"],
                 plan[f"stage{i}.win{j}.attn_mask"], plan[f"stage{i}.win{j}.rel_index"])
                for j in range(stage.num_windows))
            merge = plan[f"stage{i}.merge_index"] if i < self.num_stages - 1 else None
            x = stage(x, windows, merge)
            latents.append(self.norm[i](x))
        return latents


class SwinDecoder(nn.Cell):
    """Decoder k (`decoder.{k}`, spec §2.7): embed, mask tokens, scatter to raster, pos-embed, blocks, norm, pred.

    latent (B, N, in_dim) visible tokens (cell-major) -> (B, g*g, out_dim) in raster order.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int, out_dim: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.dim = int(dim)
        self.grid = int(grid)
        self.num_tokens = self.grid * self.grid
        self.embed = Linear(in_dim, dim)
        self.mask_token = Parameter(Tensor(np.zeros((1, 1, dim), np.float32)), name="mask_token")
        self.pos_embed = Parameter(Tensor(sincos_2d(dim, self.grid, cls_token=False)[None]),
                                   name="pos_embed", requires_grad=False)
        self.blocks = nn.CellList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(dim, LN_EPS)
        self.pred = Linear(dim, out_dim)

    def construct(self, latent, scatter, mask):
        """scatter (N,) int64 raster positions of the visible tokens; mask (g*g,) float32, 1 = masked."""
        x = self.embed(latent)
        b, n, d = x.shape
        length = self.num_tokens
        # positions not in `scatter` stay 0 and receive the mask token through `mask`
        full = ops.scatter_nd(scatter.reshape(n, 1), x.transpose(1, 0, 2), (length, b, d)).transpose(1, 0, 2)
        full = full + self.mask_token * mask.astype(x.dtype).reshape(1, length, 1)
        x = full + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class LocalMIMSwin(LocalMIMModel):
    """LocalMIM Swin pretraining model built from a `core.specs.SwinSpec`.

    Public methods (same names as the torch twin): forward_encoder(imgs, plan),
    forward_decoders(latents, plan), forward_targets(imgs), construct(imgs, plan) (the torch
    `forward`) -> (loss, branch_losses), export_state(), import_state(state).
    """

    def __init__(self, spec: SwinSpec):
        if not isinstance(spec, SwinSpec):
            raise TypeError(f"LocalMIMSwin needs a core.specs.SwinSpec, got {type(spec).__name__}")
        super().__init__(spec)
        self.num_stages = spec.num_stages

        self.encoder = SwinEncoder(spec)
        self.decoder = nn.CellList([
            SwinDecoder(b.in_dim, b.decoder_dim, b.decoder_depth, b.decoder_heads, b.grid, out, spec.mlp_ratio)
            for b, out in zip(self.branch_specs, self.out_dims)])
        if self.target_kind == "hog":
            self.hog_enc = nn.CellList([T.HOGLayer(bias=self.hog_bias) for _ in range(self.num_branches)])
        else:
            self.hog_enc = None
        self._init_weights()

    # ---------------------------------------------------------------- initialisation (§2.10, §2.7)

    @staticmethod
    def _set(param: Parameter, init):
        param.set_data(initializer(init, param.shape, ms.float32))

    def _init_weights(self):
        """Xavier linears with zero bias, LN 1/0 (as built), trunc_normal(0.02) bias tables,
        normal(0.02) mask tokens, patch embed xavier on its 2-D view + U(+-1/sqrt(3 p^2)) bias."""
        w = self.encoder.patch_embed.proj.weight
        fan_out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))
        self._set(w, Uniform(math.sqrt(6.0 / (fan_in + fan_out))))
        self._set(self.encoder.patch_embed.proj.bias, Uniform(1.0 / math.sqrt(fan_in)))
        for _, cell in self.cells_and_names():
            if isinstance(cell, Linear):
                out_f, in_f = cell.weight.shape
                self._set(cell.weight, Uniform(math.sqrt(6.0 / (in_f + out_f))))
                if cell.has_bias:
                    self._set(cell.bias, "zeros")
            elif isinstance(cell, WindowAttention):
                self._set(cell.relative_position_bias_table, TruncatedNormal(0.02))
        for dec in self.decoder:
            self._set(dec.mask_token, Normal(0.02))

    # ---------------------------------------------------------------- forward passes

    def _plan(self, plan):
        """Tensors of the plan; a SwinPlan or numpy dict is converted (PyNative only)."""
        if isinstance(plan, SwinPlan):
            return plan_tensors(plan)
        if isinstance(plan, dict):
            return plan
        raise TypeError(f"a Swin plan must be a SwinPlan or a dict of arrays, got {type(plan).__name__}")

    def check_plan(self, plan) -> Dict[str, Tensor]:
        """Convert `plan` to Tensors and check it has every key this spec's forward reads (PyNative)."""
        plan = plan_tensors(plan)
        keys = ["patch_index"]
        for i in range(self.num_stages):
            n_win = self.encoder.layers[i].num_windows
            keys += [f"stage{i}.win{j}.{a}" for j in range(n_win)
                     for a in ("group_index", "ungroup_index", "attn_mask", "rel_index")]
            if i < self.num_stages - 1:
                keys.append(f"stage{i}.merge_index")
        keys += [f"branch{k}.{a}" for k in range(self.num_branches) for a in ("scatter", "mask")]
        _require_keys(plan, keys, self.spec.name)
        return plan

    def forward_encoder(self, imgs, plan) -> List[Tensor]:
        """imgs (B, 3, S, S) -> branch-normed latents, k-th (B, N_vis of stage min(k+1, last), in_k)."""
        return self.encoder(imgs, self._plan(plan))

    def forward_decoders(self, latents, plan) -> List[Tensor]:
        """Branch k decodes latents[k] -> (B, g_k^2, out_k) in raster order of its grid."""
        plan = self._plan(plan)
        return [self.decoder[k](latents[k], plan[f"branch{k}.scatter"], plan[f"branch{k}.mask"])
                for k in range(self.num_branches)]

    def branch_masks(self, plan, batch: int) -> List[Tensor]:
        """Per-branch float32 masks (B, g_k^2), 1 = masked: the plan's branch masks over the batch."""
        plan = self._plan(plan)
        out = []
        for k in range(self.num_branches):
            m = plan[f"branch{k}.mask"].astype(ms.float32)
            out.append(ops.broadcast_to(m.reshape(1, -1), (batch, m.shape[0])))
        return out

    def construct(self, imgs, plan):
        """Pretraining loss: (loss scalar, branch_losses (num_branches,)), both float32."""
        plan = self._plan(plan)
        latents = self.encoder(imgs, plan)
        preds = self.forward_decoders(latents, plan)
        targets = self.forward_targets(imgs)
        masks = self.branch_masks(plan, imgs.shape[0])
        return T.localmim_loss(preds, targets, masks)


def build_swin(spec: SwinSpec) -> LocalMIMSwin:
    """The LocalMIM Swin for a spec (PyNative Cell; wrap calls in ms.jit for graph mode)."""
    return LocalMIMSwin(spec)
