"""LocalMIM Swin for pretraining (docs/method.md#swin-variant): a Swin encoder that runs on visible
tokens only (GreenMIM group window attention, docs/method.md#swin-window-attention), four branch
LayerNorms on the stage outputs after merging (docs/method.md#swin-branches), four ViT-block
decoders (#swin-decoders) and HOG or pixel targets. Twin of backends/mindspore/swin.py: the same
functions and classes, in the same order.

All integer bookkeeping of a batch's mask lives in a plan built on the CPU by
`core.swin_plan.build_swin_plan(spec, cell_mask)`; the model takes it as `masks`, the dict
`plan.to_arrays()` of torch tensors on its device (`plan_tensors` converts), and only gathers and
scatters with it: no Python loops over windows or groups and no host sync in the forward pass.
Only `SwinEncoder` and `LocalMIMSwin` read plan keys (`window_inputs` names them); stages,
blocks and attention take tensors. Grouping into windows happens inside `WindowAttention`,
around the attention proper, so qkv and proj run on the N visible tokens, not on the padded
groups:

    tokens   = patch_embed(imgs)[:, patch_index]                       (B, N0, C), cell-major
    block    = x + proj(ungroup(attn(group(qkv(LN(x))))))  then  x + MLP(LN(x))
    merge    = Linear(LN(concat(x[:, merge_index])))                   (B, N_next, 2C), TL BL TR BR
    latent_k = encoder.norm.k(stage k output after its merging)         (B, N_{k+1}, in_k)
    pred_k   = pred(norm(blocks(scatter(embed(latent_k)) + pos_embed)))    (B, g_k^2, out_k), raster

Token order inside the encoder is cell-major (docs/method.md#swin-token-order) and every coordinate
is the true one (defect D1 fixed); patch merging concatenates its 2x2 sources in Swin's order TL,
BL, TR, BR (defect D2 fixed), so the encoder weights load into a standard Swin for fine-tuning.

`model.state_dict()` keys are the canonical Swin names of docs/internals.md (the official
`encoder.` layout); there is no `relative_position_index` buffer.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localmim.backends.torch import targets as T
from localmim.backends.torch.layers import LN_EPS, Block, DropPath, Mlp, PatchEmbed
from localmim.backends.torch.model import LocalMIMModel, init_linear_and_norm
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import SwinSpec
from localmim.core.swin_plan import SwinPlan

__all__ = [
    "plan_tensors", "window_inputs", "group_tokens", "ungroup_tokens", "WindowAttention", "SwinBlock",
    "PatchMerging", "SwinPatchEmbed", "SwinStage", "SwinEncoder", "SwinDecoder", "LocalMIMSwin",
]

PlanLike = Union[SwinPlan, Mapping[str, object]]
# One window configuration of a stage: (group_index, ungroup_index, attn_mask, rel_index).
Window = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
WINDOW_KEYS = ("group_index", "ungroup_index", "attn_mask", "rel_index")


def plan_tensors(plan: PlanLike, device=None) -> Dict[str, torch.Tensor]:
    """A Swin plan as the dict of torch tensors the model reads (the keys of `SwinPlan.to_arrays()`).

    plan: a core.swin_plan.SwinPlan or its `to_arrays()` dict (numpy arrays or tensors).
    Integer arrays become int64, masks keep their dtype (bool / float32); all go to `device`.
    """
    arrays = plan.to_arrays() if isinstance(plan, SwinPlan) else plan
    return {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(device)
            for k, v in arrays.items()}


def _require_keys(plan: Mapping[str, object], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in plan]
    if missing:
        raise KeyError(f"Swin plan for {where} lacks keys {missing[:6]} (build it with "
                       f"core.swin_plan.build_swin_plan for this spec)")


def window_inputs(masks: Mapping[str, torch.Tensor], stage: int, config: int) -> Window:
    """Window configuration `config` (0 plain, 1 shifted) of `stage` as the plan holds it.

    Returns (group_index (G, S) int64 rows of the visible sequence, -1 for a pad slot;
    ungroup_index (N,) int64 slot of each token in the flattened groups; attn_mask (G, S, S)
    float32, 0 within a window, -100 across windows and for pads; rel_index (G, S, S) int64
    relative-position index, 0 where masked).
    """
    prefix = f"stage{stage}.win{config}."
    return (masks[prefix + "group_index"], masks[prefix + "ungroup_index"], masks[prefix + "attn_mask"],
            masks[prefix + "rel_index"])


def _masking_mode(group_index: torch.Tensor, num_tokens: int, window: int) -> bool:
    """Masking mode (N <= 2 w^2, docs/method.md#swin-window-attention): one group holding the
    sequence in order, so grouping and ungrouping are the identity and are skipped."""
    return num_tokens <= 2 * window * window and tuple(group_index.shape) == (1, num_tokens)


def group_tokens(x: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, G, S, C): slot (g, s) holds x[:, group_index[g, s]], a zero row where it is -1."""
    b, n, c = x.shape
    g, s = group_index.shape
    padded = torch.cat([x, x.new_zeros(b, 1, c)], dim=1)
    index = torch.where(group_index < 0, torch.full_like(group_index, n), group_index)
    return padded.index_select(1, index.reshape(-1)).view(b, g, s, c)


def ungroup_tokens(x: torch.Tensor, ungroup_index: torch.Tensor) -> torch.Tensor:
    """(B, G, S, C) -> (B, N, C): token i is slot ungroup_index[i] of the flattened groups (pads dropped)."""
    b, g, s, c = x.shape
    return x.reshape(b, g * s, c).index_select(1, ungroup_index)


class WindowAttention(nn.Module):
    """Window attention among visible tokens with Swin's relative position bias (docs/method.md#swin-window-attention).

    dim: channels C; window: w (table ((2w-1)^2, heads)); qkv fused (3C, C) with bias, rows
    [q | k | v], heads contiguous. Within a group of S slots:
    softmax(q k^T * hd^-0.5 + table[rel_index] * (attn_mask == 0) + attn_mask) v.
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

    def relative_bias(self, attn_mask: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
        """(G, heads, S, S) float32: the table's bias on same-window pairs (attn_mask == 0), else 0."""
        g, s, _ = rel_index.shape
        bias = self.relative_position_bias_table[rel_index.reshape(-1)].view(g, s, s, self.num_heads)
        keep = (attn_mask == 0).to(bias.dtype)
        return (bias * keep.unsqueeze(-1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, win: Window) -> torch.Tensor:
        """x: (B, N, C) normed visible tokens; win: `window_inputs(...)` of this block -> (B, N, C)."""
        group_index, ungroup_index, attn_mask, rel_index = win
        b, n, c = x.shape
        g, s = group_index.shape
        one_group = _masking_mode(group_index, n, self.window)
        qkv = self.qkv(x)
        # Pad slots hold a zero row; their keys sit behind the -100 mask and their query rows
        # are dropped by ungrouping, so what they hold does not matter.
        qkv = qkv.view(b, 1, n, 3 * c) if one_group else group_tokens(qkv, group_index)
        # Groups share the head axis so one broadcast (1, G*h, S, S) mask serves every sample.
        qkv = qkv.view(b, g, s, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.reshape(3, b, g * self.num_heads, s, self.head_dim).unbind(0)
        bias = self.relative_bias(attn_mask, rel_index) + attn_mask.unsqueeze(1)
        bias = bias.reshape(1, g * self.num_heads, s, s).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(b, g, self.num_heads, s, self.head_dim).permute(0, 1, 3, 2, 4).reshape(b, g, s, c)
        out = out.view(b, n, c) if one_group else ungroup_tokens(out, ungroup_index)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window={self.window}, num_heads={self.num_heads}"


class SwinBlock(nn.Module):
    """Pre-norm Swin block on visible tokens: x + WA(LN(x)), then x + MLP(LN(x)); LN eps 1e-6;
    stochastic depth `drop_path` on both branches (fine-tuning; pretraining uses 0).

    LayerNorm and MLP are per token, so they run on the ungrouped (B, N, C) sequence; only the
    attention sees groups.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, win: Window) -> torch.Tensor:
        """x: (B, N, C) visible tokens of the stage; win: `window_inputs(...)` -> (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), win))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 merging of visible tokens: gather (N', 4) sources TL, BL, TR, BR -> LN(4C) -> Linear(4C, 2C, no bias)."""

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


class SwinPatchEmbed(PatchEmbed):
    """p x p conv patches + LayerNorm (patch_norm on, docs/method.md#model-configurations):
    (B, 3, S, S) -> (B, (S/p)^2, C) raster."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int = 128):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class SwinStage(nn.Module):
    """One stage (`encoder.layers.{s}`): blocks alternating plain / shifted windows, then merging.

    window: the stage's window side (the resolution when smaller); shifted: whether odd blocks use
    shifted windows (plan config 1), so the stage reads `num_windows` (1 or 2) configurations;
    drop_path: each block's stochastic-depth rate (empty: none).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, shifted: bool,
                 mlp_ratio: float = 4.0, downsample: bool = True, drop_path: Sequence[float] = ()):
        super().__init__()
        self.num_windows = 2 if shifted else 1
        rates = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([SwinBlock(dim, num_heads, window, mlp_ratio, rates[b]) for b in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, windows: Sequence[Window],
                merge_index: Union[torch.Tensor, None]) -> torch.Tensor:
        """x: (B, N, C) visible tokens; windows: the stage's `window_inputs` per configuration;
        merge_index: (N', 4) int64, None without merging -> (B, N', 2C) (or (B, N, C) as is)."""
        for b, blk in enumerate(self.blocks):
            x = blk(x, windows[b % len(windows)])
        if self.downsample is not None:
            x = self.downsample(x, merge_index)
        return x


class SwinEncoder(nn.Module):
    """The masked Swin encoder (`encoder.*`): patch_embed, layers.{s}, norm.{k} (branch LayerNorms)."""

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

    def forward(self, imgs: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        """imgs (B, 3, S, S), masks: the plan's tensors -> one branch-normed (B, N_{k+1}, in_k)
        latent per stage (cell-major)."""
        x = self.patch_embed(imgs).index_select(1, masks["patch_index"])
        latents = []
        for i, stage in enumerate(self.layers):
            windows = tuple(window_inputs(masks, i, j) for j in range(stage.num_windows))
            merge_index = masks[f"stage{i}.merge_index"] if stage.downsample is not None else None
            x = stage(x, windows, merge_index)
            latents.append(self.norm[i](x))
        return latents


def _frozen_table(dim: int, grid: int) -> nn.Parameter:
    """Fixed 2-D sin-cos table (1, grid^2, dim) without a cls row, not trainable (docs/method.md#swin-decoders)."""
    table = torch.from_numpy(np.asarray(sincos_2d(dim, grid, cls_token=False), dtype=np.float32))
    return nn.Parameter(table.unsqueeze(0), requires_grad=False)


class SwinDecoder(nn.Module):
    """One branch decoder (`decoder.{k}`, docs/method.md#swin-decoders): embed, mask tokens at the masked raster
    positions, sin-cos pos, ViT blocks (qkv bias), LayerNorm, Linear d -> out. No cls token, no
    rescaling head.

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
        """x: (B, N_vis, in_dim) latent, cell-major; scatter: (N_vis,) int64 raster position of each
        token -> (B, g*g, out_dim) in raster order."""
        x = self.embed(x)
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, self.grid * self.grid, d)
        x = full.index_copy(1, scatter, x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class LocalMIMSwin(LocalMIMModel):
    """LocalMIM Swin pretraining model built from a `core.specs.SwinSpec` (docs/method.md#swin-variant).

    `masks` of every method (and of `forward(imgs, masks)` -> (loss, branch_losses), from
    LocalMIMModel) is the batch's plan: `plan_tensors(build_swin_plan(spec, cell_mask))` on the
    model's device, one plan for the whole batch (docs/method.md#swin-masking); a SwinPlan is converted.
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
        """xavier on the patch conv's 2-D view (bias keeps PyTorch's default), Linear/LN as
        docs/method.md#initialisation.

        Relative-position tables were drawn trunc_normal(0.02) at construction.
        """
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        self.encoder.apply(init_linear_and_norm)

    # ------------------------------------------------------------------ forward passes
    def _plan(self, masks: PlanLike) -> Mapping[str, torch.Tensor]:
        """The plan's tensors; a SwinPlan is converted onto the model's device."""
        if isinstance(masks, SwinPlan):
            return plan_tensors(masks, next(self.parameters()).device)
        if isinstance(masks, Mapping):
            return masks
        raise TypeError(f"a Swin plan must be a SwinPlan or a dict of arrays, got {type(masks).__name__}")

    def check_plan(self, masks: PlanLike) -> Dict[str, torch.Tensor]:
        """`plan_tensors(masks)`, checked to hold every key this spec's forward reads (KeyError
        naming the missing ones)."""
        plan = plan_tensors(masks, next(self.parameters()).device)
        keys = ["patch_index"]
        for i, stage in enumerate(self.encoder.layers):
            keys += [f"stage{i}.win{j}.{a}" for j in range(stage.num_windows) for a in WINDOW_KEYS]
            if stage.downsample is not None:
                keys.append(f"stage{i}.merge_index")
        keys += [f"branch{k}.{a}" for k in range(len(self.branches)) for a in ("scatter", "mask")]
        _require_keys(plan, keys, self.spec.name)
        return plan

    def forward_encoder(self, imgs: torch.Tensor, masks: PlanLike) -> List[torch.Tensor]:
        """imgs (B, 3, S, S) -> per branch k a branch-normed (B, N_vis of stage min(k+1, last), in_k)
        latent, cell-major."""
        return self.encoder(imgs, self._plan(masks))

    def forward_decoders(self, latents: Sequence[torch.Tensor], masks: PlanLike) -> List[torch.Tensor]:
        """Branch k decodes latents[k] -> (B, g_k^2, out_k) in raster order of its grid."""
        masks = self._plan(masks)
        return [self.decoder[k](latents[k], masks[f"branch{k}.scatter"]) for k in range(len(self.branches))]

    def branch_masks(self, masks: PlanLike, batch: int) -> List[torch.Tensor]:
        """Per-branch float32 masks (B, g_k^2), 1 = masked: the plan's branch masks over the batch."""
        masks = self._plan(masks)
        return [masks[f"branch{k}.mask"].float().unsqueeze(0).expand(batch, -1)
                for k in range(len(self.branches))]
