"""LocalMIM Swin for pretraining (spec §2): a Swin encoder that runs on visible tokens only
(GreenMIM group window attention), four ViT-block decoders and HOG or pixel targets.

All integer bookkeeping of a batch's mask lives in a plan built on the CPU by
`core.swin_plan.build_swin_plan(spec, cell_mask)`; the model takes `plan.to_arrays()` as a dict
of torch tensors on its device (`plan_tensors` converts) and only gathers and scatters with it:
no Python loops over windows or groups and no host sync in the forward pass.

Token order inside the encoder is cell-major (§2.3) and every coordinate is the true one (defect
D1 fixed); patch merging concatenates its 2x2 sources in Swin's order TL, BL, TR, BR (defect D2
fixed), so the encoder weights load into a standard Swin for fine-tuning.

`model.state_dict()` keys are the canonical Swin names of docs/internals.md (the official
`encoder.` layout); there is no `relative_position_index` buffer.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localmim.backends.torch import targets as T
from localmim.backends.torch.layers import LN_EPS, Block, Mlp, PatchEmbed
from localmim.backends.torch.model import LocalMIMModel, init_linear_and_norm
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import SwinSpec
from localmim.core.swin_plan import SwinPlan

__all__ = [
    "LocalMIMSwin", "SwinEncoder", "SwinStage", "SwinBlock", "WindowAttention", "PatchMerging",
    "SwinPatchEmbed", "SwinDecoder", "WindowInputs", "window_inputs", "plan_tensors", "build_swin",
]

PlanLike = Union[SwinPlan, Mapping[str, object]]


def plan_tensors(plan: PlanLike, device=None) -> Dict[str, torch.Tensor]:
    """A Swin plan as the dict of torch tensors the model reads.

    plan: a core.swin_plan.SwinPlan or its `to_arrays()` dict (numpy arrays or tensors).
    Integer arrays become int64, masks keep their dtype (bool / float32); all go to `device`.
    """
    arrays = plan.to_arrays() if isinstance(plan, SwinPlan) else plan
    return {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(device)
            for k, v in arrays.items()}


def _plan_get(plan: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in plan:
        raise KeyError(f"Swin plan lacks key {key!r}; build it with core.swin_plan.build_swin_plan "
                       f"for this model's spec and pass plan_tensors(plan)")
    return plan[key]


class WindowInputs(NamedTuple):
    """One stage's window configuration, ready for `WindowAttention` (see `window_inputs`).

    gather: (G*S,) int64 rows of the visible sequence padded with one zero row at index N, or
        None in masking mode (one group = the whole sequence in order).
    ungather: (N,) int64 positions in the flattened grouped sequence (None in masking mode).
    keep: (G, S, S) float, 1 where the attention mask is 0 (same window), else 0.
    mask: (G, S, S) float32 additive mask, 0 or -100.
    rel_index: (G, S, S) int64 relative-position index (0 where masked).
    """
    gather: Union[torch.Tensor, None]
    ungather: Union[torch.Tensor, None]
    keep: torch.Tensor
    mask: torch.Tensor
    rel_index: torch.Tensor


def window_inputs(plan: Mapping[str, torch.Tensor], stage: int, config: int, num_tokens: int,
                  window: int) -> WindowInputs:
    """Prepare window configuration `config` (0 plain, 1 shifted) of `stage` once per forward.

    num_tokens: N, visible tokens at the stage; window: the stage's window side w. The masking
    mode (N <= 2 w^2, §2.4) is one group holding the sequence in order, so it needs no gathers.
    """
    prefix = f"stage{stage}.win{config}."
    group_index = _plan_get(plan, prefix + "group_index")
    attn_mask = _plan_get(plan, prefix + "attn_mask").float()
    rel_index = _plan_get(plan, prefix + "rel_index")
    keep = (attn_mask == 0).to(attn_mask.dtype)
    masking = num_tokens <= 2 * window * window and tuple(group_index.shape) == (1, num_tokens)
    if masking:
        return WindowInputs(None, None, keep, attn_mask, rel_index)
    gather = torch.where(group_index < 0, torch.full_like(group_index, num_tokens), group_index)
    ungather = _plan_get(plan, prefix + "ungroup_index")
    return WindowInputs(gather.reshape(-1), ungather, keep, attn_mask, rel_index)


class WindowAttention(nn.Module):
    """Window attention among visible tokens with Swin's relative position bias (§2.4).

    dim: channels C; window: w (table ((2w-1)^2, heads)); qkv fused (3C, C) with bias.
    Within a group of S slots: softmax(q k^T * hd^-0.5 + table[rel_index] * keep + mask) v.
    """

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window = window
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def attention_bias(self, win: WindowInputs) -> torch.Tensor:
        """(G, heads, S, S) float32 additive term: relative bias on same-window pairs + mask."""
        g, s, _ = win.rel_index.shape
        bias = self.relative_position_bias_table[win.rel_index.reshape(-1)].view(g, s, s, self.num_heads)
        bias = bias * win.keep.unsqueeze(-1)
        return bias.permute(0, 3, 1, 2) + win.mask.unsqueeze(1)

    def forward(self, x: torch.Tensor, win: WindowInputs) -> torch.Tensor:
        """x: (B, N, C) normed visible tokens -> (B, N, C)."""
        b, n, c = x.shape
        qkv = self.qkv(x)
        if win.gather is not None:
            # Pad slots read a zero row; their keys sit behind the -100 mask and their query rows
            # are dropped by `ungather`, so what they hold does not matter.
            pad = qkv.new_zeros(b, 1, 3 * c)
            qkv = torch.cat([qkv, pad], dim=1).index_select(1, win.gather)
        g, s, _ = win.rel_index.shape
        # Groups share the head axis so one broadcast (1, G*h, S, S) mask serves every sample.
        qkv = qkv.view(b, g, s, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.reshape(3, b, g * self.num_heads, s, self.head_dim).unbind(0)
        bias = self.attention_bias(win).reshape(1, g * self.num_heads, s, s).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(b, g, self.num_heads, s, self.head_dim).permute(0, 1, 3, 2, 4).reshape(b, g * s, c)
        if win.ungather is not None:
            out = out.index_select(1, win.ungather)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={self.window}, num_heads={self.num_heads}"


class SwinBlock(nn.Module):
    """Pre-norm Swin block on visible tokens: x + WA(LN(x)), then x + MLP(LN(x)).

    LayerNorm and MLP are per token, so they run on the ungrouped (B, N, C) sequence; only the
    attention sees groups.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, win: WindowInputs) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        x = x + self.attn(self.norm1(x), win)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 merging of visible tokens: gather (N', 4) sources (TL, BL, TR, BR) -> LN(4C) -> 4C->2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, merge_index: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C), merge_index: (N', 4) int64 -> (B, N', 2C)."""
        b, _, c = x.shape
        n_next = merge_index.shape[0]
        x = x.index_select(1, merge_index.reshape(-1)).reshape(b, n_next, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """One stage (`encoder.layers.{s}`): blocks alternating plain / shifted windows, then merging.

    window: the stage's window side (the resolution when smaller); shifted: whether odd blocks use
    shifted windows (plan config 1).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, shifted: bool,
                 mlp_ratio: float = 4.0, downsample: bool = True):
        super().__init__()
        self.window = window
        self.shifted = shifted
        self.blocks = nn.ModuleList([SwinBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, plan: Mapping[str, torch.Tensor], index: int) -> torch.Tensor:
        """x: (B, N_s, C) visible tokens of stage `index` -> (B, N_{s+1}, 2C) after merging (or as is)."""
        n = x.shape[1]
        configs = [window_inputs(plan, index, j, n, self.window) for j in range(2 if self.shifted else 1)]
        for b, blk in enumerate(self.blocks):
            x = blk(x, configs[b % len(configs)])
        if self.downsample is not None:
            x = self.downsample(x, _plan_get(plan, f"stage{index}.merge_index"))
        return x


class SwinPatchEmbed(PatchEmbed):
    """p x p conv patches + LayerNorm (patch_norm on, §2.1): (B, 3, S, S) -> (B, (S/p)^2, C) raster."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int = 128):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class SwinEncoder(nn.Module):
    """The masked Swin encoder (`encoder.*`): patch embed, stages, one branch norm per decoder."""

    def __init__(self, spec: SwinSpec):
        super().__init__()
        self.spec = spec
        last = spec.num_stages - 1
        self.patch_embed = SwinPatchEmbed(spec.img_size, spec.patch_size, 3, spec.embed_dim)
        self.layers = nn.ModuleList([
            SwinStage(spec.stage_dim(i), spec.depths[i], spec.num_heads[i], spec.stage_window(i),
                      spec.stage_shift(i) > 0, spec.mlp_ratio, downsample=i < last)
            for i in range(spec.num_stages)])
        self.norm = nn.ModuleList([nn.LayerNorm(br.in_dim, eps=LN_EPS) for br in spec.branches()])

    def forward(self, imgs: torch.Tensor, plan: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        """imgs (B, 3, S, S) -> one branch-normed (B, N_vis_k, C_k) latent per stage (cell-major)."""
        x = self.patch_embed(imgs)
        x = x.index_select(1, _plan_get(plan, "patch_index"))
        latents = []
        for i, layer in enumerate(self.layers):
            x = layer(x, plan, i)
            latents.append(self.norm[i](x))
        return latents


def _frozen_table(dim: int, grid: int) -> nn.Parameter:
    """Fixed 2-D sin-cos table (1, grid^2, dim) without a cls row, not trainable (§2.7)."""
    table = torch.from_numpy(np.asarray(sincos_2d(dim, grid, cls_token=False), dtype=np.float32))
    return nn.Parameter(table.unsqueeze(0), requires_grad=False)


class SwinDecoder(nn.Module):
    """One branch decoder (§2.7): embed, mask tokens at the masked raster positions, sin-cos pos,
    ViT blocks (qkv bias), LayerNorm, Linear d -> out. No cls token, no rescaling head.

    in_dim: latent width; dim: decoder width d; grid: output tokens per side g.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int, out_dim: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = _frozen_table(dim, grid)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        """x: (B, N_vis, in_dim); scatter: (N_vis,) raster index of each token -> (B, g*g, out)."""
        x = self.embed(x)
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, self.grid * self.grid, d)
        x = full.index_copy(1, scatter, x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class LocalMIMSwin(LocalMIMModel):
    """LocalMIM Swin pretraining model built from a `core.specs.SwinSpec` (spec §2).

    Every forward takes `plan`: `plan_tensors(build_swin_plan(spec, cell_mask))` on the model's
    device, one plan for the whole batch (§2.2).
    """

    def __init__(self, spec: SwinSpec):
        super().__init__()
        if not isinstance(spec, SwinSpec):
            raise TypeError(f"LocalMIMSwin needs a core.specs.SwinSpec, got {type(spec).__name__}")
        self.spec = spec
        self.branches = spec.branches()
        self.encoder = SwinEncoder(spec)
        self._init_encoder()
        self.decoder = nn.ModuleList([
            SwinDecoder(br.in_dim, br.decoder_dim, br.decoder_depth, br.decoder_heads, br.grid, out,
                        spec.mlp_ratio)
            for br, out in zip(self.branches, spec.out_dims())])
        for dec in self.decoder:
            nn.init.normal_(dec.mask_token, std=0.02)
            dec.apply(init_linear_and_norm)
        if spec.target.kind == "hog":
            self.hog_enc = nn.ModuleList([T.HOGLayer(bias=spec.target.hog_bias) for _ in self.branches])

    def _init_encoder(self) -> None:
        """xavier on the patch conv's 2-D view (bias keeps PyTorch's default), Linear/LN as §2.10.

        Relative-position tables were drawn trunc_normal(0.02) at construction.
        """
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        self.encoder.apply(init_linear_and_norm)

    # ------------------------------------------------------------------ forward passes
    def forward_encoder(self, imgs: torch.Tensor, plan: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        """imgs (B, 3, S, S) -> per branch k a branch-normed (B, N_vis_k, C_k) latent, cell-major."""
        return self.encoder(imgs, plan)

    def forward_decoders(self, latents: Sequence[torch.Tensor],
                         plan: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        """One (B, g_k^2, out_k) prediction per branch, raster order of the branch grid."""
        return [dec(z, _plan_get(plan, f"branch{k}.scatter"))
                for k, (dec, z) in enumerate(zip(self.decoder, latents))]

    def branch_masks(self, plan: Mapping[str, torch.Tensor], batch: int) -> List[torch.Tensor]:
        """Per-branch float32 (B, g_k^2) binary masks (1 = masked), the batch's one mask repeated."""
        return [_plan_get(plan, f"branch{k}.mask").float().unsqueeze(0).expand(batch, -1)
                for k in range(len(self.branches))]

    def forward(self, imgs: torch.Tensor, plan: Mapping[str, torch.Tensor]):
        """-> (loss, branch_losses): float32 scalar and (num_branches,) float32 (§2.9)."""
        latents = self.forward_encoder(imgs, plan)
        preds = self.forward_decoders(latents, plan)
        targets = self.forward_targets(imgs)
        return T.localmim_loss(preds, targets, self.branch_masks(plan, imgs.shape[0]))


def build_swin(spec: SwinSpec) -> LocalMIMSwin:
    """The LocalMIM Swin for `spec` (a core.specs.SwinSpec)."""
    return LocalMIMSwin(spec)
