"""LocalMIM Swin for pretraining in MindSpore (docs/method.md#swin-variant): a Swin encoder that
attends among the visible tokens only (GreenMIM "group window attention",
docs/method.md#swin-window-attention), four branch LayerNorms (`encoder.norm.{k}`) on the stage
outputs after patch merging (#swin-branches), four transformer decoders (`decoder.{k}`,
#swin-decoders) and, for HOG targets, frozen gradient filters (`hog_enc.{k}`). Twin of
backends/torch/swin.py: the same functions and classes, in the same order.

All integer bookkeeping of a batch's mask lives in a plan built on the CPU by
`core.swin_plan.build_swin_plan(spec, cell_mask)` (the data loader); the model takes it as
`masks`: a `SwinPlan` (PyNative only) or its `to_arrays()` dict as MindSpore Tensors
(`plan_tensors` converts; the form to pass under `ms.jit`), and only gathers and scatters with it.
Only `SwinEncoder` and `LocalMIMSwin` read plan keys (`window_inputs` names them); stages,
blocks and attention take tensors. Grouping into windows happens inside `WindowAttention`,
around the attention proper, so qkv and proj run on the N visible tokens, not on the padded
groups:

    tokens   = patch_embed(imgs)[:, patch_index]                       (B, N0, C), cell-major
    block    = x + proj(ungroup(attn(group(qkv(LN(x))))))  then  x + MLP(LN(x))
    merge    = Linear(LN(concat(x[:, merge_index])))                   (B, N_next, 2C), TL BL TR BR
    latent_k = encoder.norm.k(stage k output after its merging)         (B, N_{k+1}, in_k)
    pred_k   = pred(norm(blocks(scatter(embed(latent_k)) + pos_embed)))    (B, g_k^2, out_k), raster

Defects D1 (scrambled coordinates after merging) and D2 (TL, TR, BL, BR merge order) of the
reference are fixed by the plan (true coordinates, Swin order TL, BL, TR, BR). With a plan built
with fixed `pad_groups_to` and `group_size` every shape is static, so `construct` compiles under
`ms.jit` (docs/method.md#o2). Under ms.jit the plan's keys are compile-time strings (loop indices over
stages and configurations are unrolled), and a window configuration travels as a plain tuple:
a NamedTuple passed between Cells under ms.jit silently got zero gradients (MindSpore 2.10).
MindSpore parameter names are the canonical names of docs/internals.md, so `export_state()` is a
plain name -> numpy map; there is no `relative_position_index` buffer.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, TruncatedNormal, Uniform, initializer

from localmim.backends.mindspore import targets as T
from localmim.backends.mindspore.layers import LN_EPS, Block, DropPath, LayerNorm, Linear, Mlp, PatchEmbed, Softmax
from localmim.backends.mindspore.model import LocalMIMModel
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import SwinSpec
from localmim.core.swin_plan import SwinPlan

__all__ = [
    "plan_tensors", "window_inputs", "group_tokens", "ungroup_tokens", "WindowAttention", "SwinBlock",
    "PatchMerging", "SwinPatchEmbed", "SwinStage", "SwinEncoder", "SwinDecoder", "LocalMIMSwin",
]

PlanLike = Union[SwinPlan, Mapping[str, object]]
# One window configuration of a stage: (group_index, ungroup_index, attn_mask, rel_index).
Window = Tuple[Tensor, Tensor, Tensor, Tensor]
WINDOW_KEYS = ("group_index", "ungroup_index", "attn_mask", "rel_index")


def plan_tensors(plan: PlanLike) -> Dict[str, Tensor]:
    """A Swin plan as the dict of MindSpore Tensors the model reads (the keys of `SwinPlan.to_arrays()`).

    plan: a core.swin_plan.SwinPlan or its `to_arrays()` dict (numpy arrays or Tensors).
    Integer arrays become int64, masks keep their dtype (bool / float32).
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


def _require_keys(plan: Mapping[str, object], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in plan]
    if missing:
        raise KeyError(f"Swin plan for {where} lacks keys {missing[:6]} (build it with "
                       f"core.swin_plan.build_swin_plan for this spec)")


def window_inputs(masks, stage: int, config: int) -> Window:
    """Window configuration `config` (0 plain, 1 shifted) of `stage` as the plan holds it.

    Returns (group_index (G, S) int64 rows of the visible sequence, -1 for a pad slot;
    ungroup_index (N,) int64 slot of each token in the flattened groups; attn_mask (G, S, S)
    float32, 0 within a window, -100 across windows and for pads; rel_index (G, S, S) int64
    relative-position index, 0 where masked).
    """
    prefix = f"stage{stage}.win{config}."
    return (masks[prefix + "group_index"], masks[prefix + "ungroup_index"], masks[prefix + "attn_mask"],
            masks[prefix + "rel_index"])


def _masking_mode(group_index, num_tokens: int, window: int) -> bool:
    """Masking mode (N <= 2 w^2, docs/method.md#swin-window-attention): one group holding the
    sequence in order, so grouping and ungrouping are the identity and are skipped. Shapes only: a
    constant under ms.jit."""
    return num_tokens <= 2 * window * window and tuple(group_index.shape) == (1, num_tokens)


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


class WindowAttention(nn.Cell):
    """Window attention among visible tokens with Swin's relative position bias (docs/method.md#swin-window-attention).

    dim: channels C; window: w (table ((2w-1)^2, heads)); qkv fused (3C, C) with bias, rows
    [q | k | v], heads contiguous. Within a group of S slots:
    softmax(q k^T * hd^-0.5 + table[rel_index] * (attn_mask == 0) + attn_mask) v.
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
        self.softmax = Softmax()
        self.proj = Linear(self.dim, self.dim)

    def relative_bias(self, attn_mask, rel_index):
        """(G, heads, S, S) float32: the table's bias on same-window pairs (attn_mask == 0), else 0."""
        g, s, _ = rel_index.shape
        bias = ops.gather(self.relative_position_bias_table, rel_index.reshape(-1), 0)
        bias = bias.reshape(g, s, s, self.num_heads).transpose(0, 3, 1, 2)
        keep = (attn_mask == 0).astype(bias.dtype).reshape(g, 1, s, s)
        return bias * keep

    def construct(self, x, win):
        """x: (B, N, C) normed visible tokens; win: `window_inputs(...)` of this block -> (B, N, C)."""
        group_index, ungroup_index, attn_mask, rel_index = win
        b, n, c = x.shape
        g, s = group_index.shape
        h, hd = self.num_heads, self.head_dim
        one_group = _masking_mode(group_index, n, self.window)
        qkv = self.qkv(x)
        # Pad slots hold a zero row; their keys sit behind the -100 mask and their query rows
        # are dropped by ungrouping, so what they hold does not matter.
        qkv = qkv.reshape(b, 1, n, 3 * c) if one_group else group_tokens(qkv, group_index)
        qkv = qkv.reshape(b, g, s, 3, h, hd).transpose(3, 0, 1, 4, 2, 5)            # (3, B, G, h, S, hd)
        q, k, v = ops.unstack(qkv, 0)  # one split (see layers.Attention)
        attn = ops.matmul(q * self.scale, k.swapaxes(-1, -2))                       # (B, G, h, S, S)
        attn = attn + self.relative_bias(attn_mask, rel_index).expand_dims(0)
        attn = attn + attn_mask.reshape(1, g, 1, s, s)
        attn = self.softmax(attn)
        out = ops.matmul(attn, v).transpose(0, 1, 3, 2, 4).reshape(b, g, s, c)       # (B, G, S, C)
        out = out.reshape(b, n, c) if one_group else ungroup_tokens(out, ungroup_index)
        return self.proj(out)

    def extend_repr(self):
        return f"dim={self.dim}, window={self.window}, num_heads={self.num_heads}"


class SwinBlock(nn.Cell):
    """Pre-norm Swin block on visible tokens: x + WA(LN(x)), then x + MLP(LN(x)); LN eps 1e-6;
    stochastic depth `drop_path` on both branches (fine-tuning; pretraining uses 0).

    LayerNorm and MLP are per token, so they run on the ungrouped (B, N, C) sequence; only the
    attention sees groups.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def construct(self, x, win, drop_draws=None):
        """x: (B, N, C) visible tokens of the stage; win: `window_inputs(...)` -> (B, N, C);
        drop_draws: None or (2, B) uniform draws of the two drop paths (layers.DropPath)."""
        if drop_draws is None:
            x = x + self.drop_path(self.attn(self.norm1(x), win))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x), win), drop_draws[0])
        return x + self.drop_path(self.mlp(self.norm2(x)), drop_draws[1])


class PatchMerging(nn.Cell):
    """2x2 merging of visible tokens: gather (N', 4) sources TL, BL, TR, BR -> LN(4C) -> Linear(4C, 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)
        self.norm = LayerNorm(4 * self.dim, eps=LN_EPS)
        self.reduction = Linear(4 * self.dim, 2 * self.dim, bias=False)

    def construct(self, x, merge_index):
        """x: (B, N, C), merge_index: (N', 4) int64 -> (B, N', 2C)."""
        b, _, c = x.shape
        n_next = merge_index.shape[0]
        x = ops.gather(x, merge_index.reshape(-1), 1).reshape(b, n_next, 4 * c)
        return self.reduction(self.norm(x))


class SwinPatchEmbed(PatchEmbed):
    """p x p conv patches + LayerNorm (patch_norm on, docs/method.md#model-configurations):
    (B, 3, S, S) -> (B, (S/p)^2, C) raster."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int = 128):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.norm = LayerNorm(embed_dim, eps=LN_EPS)

    def construct(self, x):
        return self.norm(super().construct(x))


class SwinStage(nn.Cell):
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
        self.blocks = nn.CellList([SwinBlock(dim, num_heads, window, mlp_ratio, rates[b]) for b in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def construct(self, x, windows, merge_index, drop_draws=None):
        """x: (B, N, C) visible tokens; windows: the stage's `window_inputs` per configuration;
        merge_index: (N', 4) int64, None without merging; drop_draws: None or (depth, 2, B)
        uniform draws -> (B, N', 2C) (or (B, N, C) as is)."""
        for b, blk in enumerate(self.blocks):
            if drop_draws is None:
                x = blk(x, windows[b % len(windows)])
            else:
                x = blk(x, windows[b % len(windows)], drop_draws[b])
        if self.downsample is not None:
            x = self.downsample(x, merge_index)
        return x


class SwinEncoder(nn.Cell):
    """The masked Swin encoder (`encoder.*`): patch_embed, layers.{s}, norm.{k} (branch LayerNorms)."""

    def __init__(self, spec: SwinSpec):
        super().__init__()
        self.spec = spec
        last = spec.num_stages - 1
        self.patch_embed = SwinPatchEmbed(spec.img_size, spec.patch_size, 3, spec.embed_dim)
        self.layers = nn.CellList([
            SwinStage(spec.stage_dim(i), spec.depths[i], spec.num_heads[i], spec.stage_window(i),
                      spec.stage_shift(i) > 0, spec.mlp_ratio, downsample=i < last)
            for i in range(spec.num_stages)])
        self.norm = nn.CellList([LayerNorm(br.in_dim, eps=LN_EPS) for br in spec.branches()])

    def construct(self, imgs, masks):
        """imgs (B, 3, S, S), masks: the plan's Tensors -> one branch-normed (B, N_{k+1}, in_k)
        latent per stage (cell-major)."""
        x = ops.gather(self.patch_embed(imgs), masks["patch_index"], 1)
        latents = []
        for i, stage in enumerate(self.layers):
            windows = tuple(window_inputs(masks, i, j) for j in range(stage.num_windows))
            merge_index = masks[f"stage{i}.merge_index"] if stage.downsample is not None else None
            x = stage(x, windows, merge_index)
            latents.append(self.norm[i](x))
        return latents


def _frozen_table(dim: int, grid: int) -> Parameter:
    """Fixed 2-D sin-cos table (1, grid^2, dim) without a cls row, not trainable (docs/method.md#swin-decoders)."""
    table = np.asarray(sincos_2d(dim, grid, cls_token=False), dtype=np.float32)[None]
    return Parameter(Tensor(table), name="pos_embed", requires_grad=False)


class SwinDecoder(nn.Cell):
    """One branch decoder (`decoder.{k}`, docs/method.md#swin-decoders): embed, mask tokens at the masked raster
    positions, sin-cos pos, ViT blocks (qkv bias), LayerNorm, Linear d -> out. No cls token, no
    rescaling head.

    in_dim: latent width; dim: decoder width d; grid: output tokens per side g.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int, out_dim: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = int(grid)
        self.embed = Linear(in_dim, dim)
        self.mask_token = Parameter(Tensor(np.zeros((1, 1, dim), np.float32)), name="mask_token")
        self.pos_embed = _frozen_table(dim, self.grid)
        self.blocks = nn.CellList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(dim, LN_EPS)
        self.pred = Linear(dim, out_dim)

    def construct(self, x, scatter):
        """x: (B, N_vis, in_dim) latent, cell-major; scatter: (N_vis,) int64 raster position of each
        token -> (B, g*g, out_dim) in raster order."""
        x = self.embed(x)
        b, n, d = x.shape
        full = ops.broadcast_to(self.mask_token.astype(x.dtype), (b, self.grid * self.grid, d))
        index = ops.broadcast_to(scatter.reshape(1, n, 1), (b, n, d))
        x = ops.tensor_scatter_elements(full, index, x, axis=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class LocalMIMSwin(LocalMIMModel):
    """LocalMIM Swin pretraining model built from a `core.specs.SwinSpec` (docs/method.md#swin-variant).

    `masks` of every method (and of `construct(imgs, masks)` -> (loss, branch_losses), from
    LocalMIMModel) is the batch's plan: `plan_tensors(build_swin_plan(spec, cell_mask))`, one plan
    for the whole batch (docs/method.md#swin-masking); a SwinPlan is converted (PyNative only).
    """

    def __init__(self, spec: SwinSpec):
        if not isinstance(spec, SwinSpec):
            raise TypeError(f"LocalMIMSwin needs a core.specs.SwinSpec, got {type(spec).__name__}")
        super().__init__(spec)
        self.encoder = SwinEncoder(spec)
        self.decoder = nn.CellList([
            SwinDecoder(b.in_dim, b.decoder_dim, b.decoder_depth, b.decoder_heads, b.grid, out, spec.mlp_ratio)
            for b, out in zip(self.branch_specs, self.out_dims)])
        if self.target_kind == "hog":
            self.hog_enc = nn.CellList([T.HOGLayer(bias=self.hog_bias) for _ in range(self.num_branches)])
        else:
            self.hog_enc = None
        self._init_weights()

    # ------------------------------------------------ initialisation (docs/method.md#initialisation)

    @staticmethod
    def _set(param: Parameter, init):
        param.set_data(initializer(init, param.shape, ms.float32))

    def _init_weights(self):
        """Xavier linears with zero bias, LN 1/0 (as built), trunc_normal(0.02) bias tables,
        normal(0.02) mask tokens, patch embed xavier on its 2-D view + U(+-1/sqrt(3 p^2)) bias
        (PyTorch's default conv bias; the torch twin draws these in its constructors)."""
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

    def _plan(self, masks: PlanLike):
        """The plan's Tensors; a SwinPlan is converted (PyNative only)."""
        if isinstance(masks, SwinPlan):
            return plan_tensors(masks)
        if isinstance(masks, dict):
            return masks
        raise TypeError(f"a Swin plan must be a SwinPlan or a dict of arrays, got {type(masks).__name__}")

    def check_plan(self, masks: PlanLike) -> Dict[str, Tensor]:
        """`plan_tensors(masks)`, checked to hold every key this spec's forward reads (KeyError
        naming the missing ones). PyNative only: under ms.jit a missing key fails compilation."""
        plan = plan_tensors(masks)
        keys = ["patch_index"]
        for i, stage in enumerate(self.encoder.layers):
            keys += [f"stage{i}.win{j}.{a}" for j in range(stage.num_windows) for a in WINDOW_KEYS]
            if stage.downsample is not None:
                keys.append(f"stage{i}.merge_index")
        keys += [f"branch{k}.{a}" for k in range(self.num_branches) for a in ("scatter", "mask")]
        _require_keys(plan, keys, self.spec.name)
        return plan

    def forward_encoder(self, imgs, masks: PlanLike) -> List[Tensor]:
        """imgs (B, 3, S, S) -> per branch k a branch-normed (B, N_vis of stage min(k+1, last), in_k)
        latent, cell-major."""
        return self.encoder(imgs, self._plan(masks))

    def forward_decoders(self, latents, masks: PlanLike) -> List[Tensor]:
        """Branch k decodes latents[k] -> (B, g_k^2, out_k) in raster order of its grid."""
        masks = self._plan(masks)
        return [self.decoder[k](latents[k], masks[f"branch{k}.scatter"]) for k in range(self.num_branches)]

    def branch_masks(self, masks: PlanLike, batch: int) -> List[Tensor]:
        """Per-branch float32 masks (B, g_k^2), 1 = masked: the plan's branch masks over the batch."""
        masks = self._plan(masks)
        out = []
        for k in range(self.num_branches):
            m = masks[f"branch{k}.mask"].astype(ms.float32)
            out.append(ops.broadcast_to(m.reshape(1, -1), (batch, m.shape[0])))
        return out
