"""Transformer and head layers of the LocalMIM ViT in MindSpore (twin of backends/torch/layers.py).

Parameter names follow the canonical (PyTorch/timm) names of docs/internals.md so that a
MindSpore checkpoint needs no renaming: LayerNorms hold `weight`/`bias` (not gamma/beta), linear
layers hold `weight` (out, in) and `bias`, convolutions keep the PyTorch layouts (Conv
(out, in, kh, kw), ConvTranspose (in, out, kh, kw)).

CPU-friendly choices (MindSpore 2.10 on CPU):
- the stride-p patch convolution, the k2s2 transposed convolutions and the 1x1 convolutions are
  computed as reshapes plus one matmul on channels-last maps (same numbers, far faster than the
  CPU conv kernels);
- every projection (Linear, the patch, k2s2 and 1x1 convolutions) is one 2-D MatMul on the rows
  flattened from the leading axes, with the weight read in place (`transpose_b`): `ops.matmul` of
  a (B, N, C) tensor with a 2-D weight broadcasts the weight to a batch and runs BatchMatMul, whose
  backward then broadcasts and sums per batch (measured on vit_mini: BroadcastTo alone took 15%
  of the graph-mode step). Same forward and input gradient bit for bit; weight gradients
  summed in another order (~1e-7 relative). Reading the Parameter directly also lets
  `Cell.to_float` cast it under mixed precision (a transposed copy is not cast);
- GELU is the exact erf form (`nn.GELU(approximate=False)`; MindSpore's default is tanh);
- every LayerNorm passes eps explicitly (1e-6, docs/method.md#transformer-blocks).

Everything works in PyNative and under `ms.jit` (static shapes, no control flow on tensor values).
"""
from __future__ import annotations

import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

__all__ = [
    "LN_EPS", "LayerNorm", "LayerNorm2d", "Linear", "Mlp", "Attention", "DropPath", "Block",
    "PatchEmbed", "ConvTranspose2x2", "Conv1x1", "AvgPool2x2", "GELU", "Softmax",
]

LN_EPS = 1e-6

_matmul = ops.MatMul()
_matmul_nt = ops.MatMul(transpose_b=True)  # x @ w.T with w (out, in) as stored


def _project(x, weight, out_dim: int, transpose: bool = True):
    """x (..., in) @ weight.T (transpose: weight (out, in)) or @ weight ((in, out)) -> (..., out)
    as one 2-D MatMul (see the module docstring). `weight` is a Tensor computed in the calling
    cell (a reshape of its Parameter), never the Parameter itself (see Linear)."""
    rows = x.reshape(-1, x.shape[-1])
    y = _matmul_nt(rows, weight) if transpose else _matmul(rows, weight)
    return y.reshape(x.shape[:-1] + (out_dim,))


def _param(shape, name, fill=0.0, requires_grad=True):
    return Parameter(Tensor(np.full(shape, fill, dtype=np.float32)), name=name, requires_grad=requires_grad)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with parameters named `weight` and `bias`.

    x: (..., dim) -> (..., dim); biased variance, eps inside the sqrt (torch nn.LayerNorm).
    """

    def __init__(self, dim: int, eps: float = LN_EPS):
        super().__init__()
        self.dim = int(dim)
        self.eps = float(eps)
        self.weight = _param((self.dim,), "weight", 1.0)
        self.bias = _param((self.dim,), "bias", 0.0)
        self._ln = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)

    def construct(self, x):
        return self._ln(x, self.weight, self.bias)[0]

    def extend_repr(self):
        return f"{self.dim}, eps={self.eps}"


class LayerNorm2d(nn.Cell):
    """LayerNorm over the channel axis of a map (LayerNorm2d, docs/method.md#rescaling-heads).

    channels_last=False: x (B, C, H, W) -> (B, C, H, W) (the torch twin's layout).
    channels_last=True: x (B, H, W, C) -> (B, H, W, C), used inside the rescaling heads.
    """

    def __init__(self, num_channels: int, eps: float = LN_EPS, channels_last: bool = False):
        super().__init__()
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.channels_last = bool(channels_last)
        self.weight = _param((self.num_channels,), "weight", 1.0)
        self.bias = _param((self.num_channels,), "bias", 0.0)
        self._ln = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)

    def construct(self, x):
        if self.channels_last:
            return self._ln(x, self.weight, self.bias)[0]
        x = x.transpose(0, 2, 3, 1)
        x = self._ln(x, self.weight, self.bias)[0]
        return x.transpose(0, 3, 1, 2)

    def extend_repr(self):
        return f"{self.num_channels}, eps={self.eps}, channels_last={self.channels_last}"


class Linear(nn.Cell):
    """y = x @ weight.T + bias; weight (out, in), bias (out,) as torch nn.Linear. x: (..., in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.has_bias = bool(bias)
        self.weight = _param((self.out_features, self.in_features), "weight")
        self.bias = _param((self.out_features,), "bias") if self.has_bias else None

    def construct(self, x):
        # the Parameter is used here, not handed to _project: graph-mode mixed precision casts a
        # cell's Parameters where its own operators read them, not inside a called function
        y = _matmul_nt(x.reshape(-1, self.in_features), self.weight)
        if self.has_bias:
            # on the (rows, out) view: the bias gradient is then a sum over one axis, which
            # MindSpore's CPU ReduceSum does ~5x faster than over several leading axes
            y = y + self.bias
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def extend_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bias={self.has_bias}"


class GELU(nn.Cell):
    """Exact GELU, 0.5 x (1 + erf(x / sqrt(2))) (torch nn.GELU default)."""

    def construct(self, x):
        return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


class Softmax(nn.Cell):
    """Softmax over the last axis, as a Cell so that mixed precision can keep it in float32
    (backends/mindspore/amp.py)."""

    def construct(self, x):
        return ops.softmax(x, axis=-1)


class Mlp(nn.Cell):
    """fc1 -> exact (erf) GELU -> fc2 on (..., dim) tensors."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = GELU()
        self.fc2 = Linear(hidden_dim, dim)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Cell):
    """Multi-head self-attention with a fused qkv projection.

    qkv.weight is (3*dim, dim): rows [q | k | v], heads contiguous inside each block (timm).
    Softmax attention with scale head_dim**-0.5, no mask, no dropout.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(dim, 3 * dim)
        self.softmax = Softmax()
        self.proj = Linear(dim, dim)

    def construct(self, x):
        """x: (B, N, dim) -> (B, N, dim)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = ops.unstack(qkv, 0)  # one split; indexing qkv[i] copies slowly on CPU (same numbers)
        attn = ops.matmul(q * self.scale, k.transpose(0, 1, 3, 2))
        attn = self.softmax(attn)
        x = ops.matmul(attn, v).transpose(0, 2, 1, 3).reshape(b, n, c)
        return self.proj(x)


class DropPath(nn.Cell):
    """Stochastic depth per sample (fine-tuning only; identity when p == 0 or not training).

    MindSpore Cells start in eval mode: call `set_train(True)` to activate it. A sample is kept
    where floor(keep_prob + u) = 1 for its uniform draw u: `draws` (B,) from the caller (the
    fine-tuning step draws them on the host from (seed, epoch, batch), so a resumed run repeats the
    uninterrupted one; MindSpore's CPU kernels have no seedable generator), else ops.rand.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.keep_prob = 1.0 - self.drop_prob

    def construct(self, x, draws=None):
        if self.drop_prob == 0.0 or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if draws is None:
            draws = ops.rand(shape, dtype=x.dtype)
        keep = ops.floor(self.keep_prob + draws.reshape(shape).astype(x.dtype))
        return x * keep / self.keep_prob

    def extend_repr(self):
        return f"drop_prob={self.drop_prob}"


class Block(nn.Cell):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (timm `Block`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def construct(self, x, drop_draws=None):
        """x: (B, N, dim) -> (B, N, dim); drop_draws: None or (2, B) uniform draws of the two
        drop paths (DropPath)."""
        if drop_draws is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)), drop_draws[0])
        return x + self.drop_path(self.mlp(self.norm2(x)), drop_draws[1])


class _ConvWeights(nn.Cell):
    """Holder of a convolution's `weight` (PyTorch layout) and `bias`; used by PatchEmbed."""

    def __init__(self, weight_shape, bias_dim: int):
        super().__init__()
        self.weight = _param(tuple(weight_shape), "weight")
        self.bias = _param((bias_dim,), "bias")


class PatchEmbed(nn.Cell):
    """Non-overlapping p x p patches -> tokens: (B, 3, S, S) -> (B, (S/p)^2, dim), raster order.

    `proj.weight` is the conv weight (dim, 3, p, p) and `proj.bias` (dim,). The stride-p conv is
    computed as patchify in (c, kh, kw) order plus a matmul with weight.reshape(dim, -1).T.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.grid = self.img_size // self.patch_size
        self.num_patches = self.grid * self.grid
        self.proj = _ConvWeights((self.embed_dim, self.in_chans, self.patch_size, self.patch_size),
                                 self.embed_dim)

    def construct(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_size \
                or x.shape[3] != self.img_size:
            raise ValueError(
                f"PatchEmbed expected images of shape (B, {self.in_chans}, {self.img_size}, "
                f"{self.img_size}), got {x.shape}")
        b = x.shape[0]
        g, p = self.grid, self.patch_size
        x = x.reshape(b, self.in_chans, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        x = x.reshape(b, g * g, self.in_chans * p * p)
        w = self.proj.weight.reshape(self.embed_dim, self.in_chans * p * p)
        return _project(x, w, self.embed_dim) + self.proj.bias


class ConvTranspose2x2(nn.Cell):
    """ConvTranspose2d(k=2, s=2, bias) on channels-last maps: (B, H, W, in) -> (B, 2H, 2W, out).

    weight (in, out, 2, 2) as torch; out[b, 2i+a, 2j+c, o] = sum_ci x[b, i, j, ci] w[ci, o, a, c] + bias[o].
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.weight = _param((self.in_channels, self.out_channels, 2, 2), "weight")
        self.bias = _param((self.out_channels,), "bias")

    def construct(self, x):
        b, h, w, _ = x.shape
        o = self.out_channels
        y = _project(x, self.weight.reshape(self.in_channels, o * 4), o * 4, transpose=False)  # (B, H, W, O*2*2)
        y = y.reshape(b, h, w, o, 2, 2).transpose(0, 1, 4, 2, 5, 3)       # (B, H, 2, W, 2, O)
        return (y.reshape(-1, o) + self.bias).reshape(b, 2 * h, 2 * w, o)  # bias on rows: see Linear

    def extend_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel=2, stride=2"


class Conv1x1(nn.Cell):
    """1x1 Conv2d with bias on channels-last maps: (..., in) -> (..., out); weight (out, in, 1, 1)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.weight = _param((self.out_channels, self.in_channels, 1, 1), "weight")
        self.bias = _param((self.out_channels,), "bias")

    def construct(self, x):
        w = self.weight.reshape(self.out_channels, self.in_channels)
        y = _project(x, w, self.out_channels)
        return (y.reshape(-1, self.out_channels) + self.bias).reshape(y.shape)  # bias on rows: see Linear

    def extend_repr(self):
        return f"{self.in_channels}, {self.out_channels}, kernel=1"


class AvgPool2x2(nn.Cell):
    """2x2 average pooling, stride 2, on channels-last maps: (B, H, W, C) -> (B, H/2, W/2, C)."""

    def construct(self, x):
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
