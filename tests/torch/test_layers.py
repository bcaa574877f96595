"""Layers of the PyTorch backend against timm and against hand-written numpy formulas."""
import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from localmim.backends.torch.layers import Attention, Block, DropPath, LayerNorm2d, Mlp, PatchEmbed

_erf = np.vectorize(math.erf)


def np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_layernorm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    b, n, c = x.shape
    hd = c // heads
    qkv = (x @ qkv_w.T + qkv_b).reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = s / s.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
    return o @ proj_w.T + proj_b


def _np(t):
    return t.detach().double().numpy()


def _randomise(module, seed=0):
    """Give every parameter (LayerNorm affine included) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + offset)


@pytest.mark.parametrize("fused", [True, False])
def test_block_matches_timm(fused, h):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from timm.layers import set_fused_attn
    torch.manual_seed(0)
    ours = Block(48, 4, mlp_ratio=4.0)
    _randomise(ours)
    ref = timm_vit.Block(48, 4, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ref.load_state_dict(ours.state_dict(), strict=True)
    set_fused_attn(fused)
    try:
        ref_fused = timm_vit.Block(48, 4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        ref_fused.load_state_dict(ours.state_dict(), strict=True)
    finally:
        set_fused_attn(True)
    x = torch.randn(3, 11, 48)
    with torch.no_grad():
        out, want = ours(x), ref_fused(x)
    assert ref_fused.attn.fused_attn is fused
    assert h.rel_err(out, want) < 1e-6
    with torch.no_grad():
        assert h.rel_err(out, ref(x)) < 1e-6


def test_block_matches_numpy():
    torch.manual_seed(1)
    blk = Block(32, 2, mlp_ratio=2.0)
    _randomise(blk, seed=1)
    x = torch.randn(2, 7, 32)
    s = {k: _np(v) for k, v in blk.state_dict().items()}
    xn = _np(x)
    y = xn + np_attention(np_layernorm(xn, s["norm1.weight"], s["norm1.bias"]), s["attn.qkv.weight"],
                          s["attn.qkv.bias"], s["attn.proj.weight"], s["attn.proj.bias"], 2)
    hdn = np_gelu(np_layernorm(y, s["norm2.weight"], s["norm2.bias"]) @ s["mlp.fc1.weight"].T + s["mlp.fc1.bias"])
    want = y + hdn @ s["mlp.fc2.weight"].T + s["mlp.fc2.bias"]
    with torch.no_grad():
        got = _np(blk(x))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6
    assert set(blk.state_dict()) == {f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                         "mlp.fc2") for p in ("weight", "bias")}


def test_mlp_uses_exact_gelu():
    mlp = Mlp(4, 8)
    _randomise(mlp, seed=2)
    x = torch.linspace(-4, 4, 24).reshape(2, 3, 4)
    s = {k: _np(v) for k, v in mlp.state_dict().items()}
    want = np_gelu(_np(x) @ s["fc1.weight"].T + s["fc1.bias"]) @ s["fc2.weight"].T + s["fc2.bias"]
    with torch.no_grad():
        got = _np(mlp(x))
    # The tanh approximation differs by up to ~5e-4 on this range; exact erf agrees to float precision.
    assert np.abs(got - want).max() < 2e-6


def test_attention_matches_numpy_and_rejects_bad_heads():
    att = Attention(24, 3)
    _randomise(att, seed=3)
    x = torch.randn(2, 5, 24)
    s = {k: _np(v) for k, v in att.state_dict().items()}
    want = np_attention(_np(x), s["qkv.weight"], s["qkv.bias"], s["proj.weight"], s["proj.bias"], 3)
    with torch.no_grad():
        got = _np(att(x))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6
    assert att.qkv.weight.shape == (72, 24)
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        Attention(24, 5)


def test_layernorm2d_matches_formula():
    ln = LayerNorm2d(6)
    assert torch.equal(ln.weight, torch.ones(6)) and torch.equal(ln.bias, torch.zeros(6))
    with torch.no_grad():
        ln.weight.copy_(torch.arange(1.0, 7.0))
        ln.bias.copy_(torch.linspace(-1, 1, 6))
    x = torch.randn(2, 6, 3, 5) * 3 + 1
    xn = _np(x)
    mu = xn.mean(1, keepdims=True)
    var = ((xn - mu) ** 2).mean(1, keepdims=True)
    want = (xn - mu) / np.sqrt(var + 1e-6) * np.arange(1.0, 7.0)[None, :, None, None] \
        + np.linspace(-1, 1, 6)[None, :, None, None]
    with torch.no_grad():
        got = _np(ln(x))
    assert got.shape == (2, 6, 3, 5)
    assert np.abs(got - want).max() < 1e-5
    # eps sits inside the sqrt: a constant map normalises to exactly the bias.
    with torch.no_grad():
        flat = _np(ln(torch.full((1, 6, 2, 2), 5.0)))
    assert np.allclose(flat, np.linspace(-1, 1, 6)[None, :, None, None], atol=1e-6)


def test_patch_embed_matches_matmul_and_checks_size():
    pe = PatchEmbed(16, 4, 3, 10)
    _randomise(pe, seed=4)
    x = torch.randn(2, 3, 16, 16)
    w = _np(pe.proj.weight).reshape(10, -1)
    patches = _np(x).reshape(2, 3, 4, 4, 4, 4).transpose(0, 2, 4, 1, 3, 5).reshape(2, 16, 48)
    want = patches @ w.T + _np(pe.proj.bias)
    with torch.no_grad():
        got = _np(pe(x))
    assert got.shape == (2, 16, 10)
    assert np.abs(got - want).max() < 1e-5
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        pe(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="expected images"):
        pe(torch.randn(2, 1, 16, 16))


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 2)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    per_sample = y.reshape(64, -1)
    # each sample is either dropped (0) or kept and rescaled by 1/keep (2), as a whole
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    blk = Block(8, 2, drop_path=0.1)
    assert isinstance(blk.drop_path, DropPath) and isinstance(Block(8, 2).drop_path, nn.Identity)
