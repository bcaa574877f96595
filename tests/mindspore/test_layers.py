"""MindSpore layers against float64 numpy references (docs/method.md#vit-encoder, #vit-decoders)."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from localmim.backends.mindspore import layers as L

RTOL = 1e-5


def _rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _fill(cell, seed=0, scale=0.3):
    """Give every parameter of `cell` random values (LayerNorm weights around 1)."""
    rng = np.random.default_rng(seed)
    for name, p in cell.parameters_and_names():
        v = rng.standard_normal(p.shape) * scale
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "weight" and len(p.shape) == 1:
            v = 1.0 + v
        p.set_data(Tensor(v.astype(np.float32)))
    return {n: p.asnumpy().astype(np.float64) for n, p in cell.parameters_and_names()}


def test_layer_norm_names_eps_and_values(h, npref):
    ln = L.LayerNorm(12)
    assert [n for n, _ in ln.parameters_and_names()] == ["weight", "bias"]
    assert ln.eps == 1e-6
    st = _fill(ln, 1)
    # small-variance rows make the eps visible: 1e-6 vs MindSpore's 1e-7 default differs by >1e-5
    x = _rand((2, 5, 12), 2, scale=1e-2)
    out = ln(Tensor(x))
    assert h.rel_err(out, npref.layer_norm(x, st["weight"], st["bias"], 1e-6)) < RTOL
    assert h.rel_err(out, npref.layer_norm(x, st["weight"], st["bias"], 1e-7)) > 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm2d(h, npref, channels_last):
    ln = L.LayerNorm2d(6, channels_last=channels_last)
    np.testing.assert_array_equal(ln.weight.asnumpy(), np.ones(6))
    np.testing.assert_array_equal(ln.bias.asnumpy(), np.zeros(6))
    st = _fill(ln, 3)
    x = _rand((2, 6, 4, 5), 4)
    ref = npref.layer_norm2d(x, st["weight"], st["bias"])
    if channels_last:
        out = ln(Tensor(x.transpose(0, 2, 3, 1))).asnumpy().transpose(0, 3, 1, 2)
    else:
        out = ln(Tensor(x)).asnumpy()
    assert h.rel_err(out, ref) < RTOL


def test_gelu_is_exact_erf(h, npref):
    x = np.linspace(-6, 6, 2001).astype(np.float32)
    out = L.GELU()(Tensor(x))
    assert h.rel_err(out, npref.gelu(x.astype(np.float64))) < 2e-6
    # the tanh approximation differs by ~5e-4 near |x| = 2: make sure we are not it
    tanh_approx = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    assert np.abs(out.asnumpy() - tanh_approx).max() > 1e-4


def test_linear_and_mlp(h, npref):
    mlp = L.Mlp(8, 32)
    assert sorted(n for n, _ in mlp.parameters_and_names()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert mlp.fc1.weight.shape == (32, 8)
    st = _fill(mlp, 5)
    x = _rand((3, 7, 8), 6)
    ref = npref.linear(npref.gelu(npref.linear(x, st["fc1.weight"], st["fc1.bias"])), st["fc2.weight"], st["fc2.bias"])
    assert h.rel_err(mlp(Tensor(x)), ref) < RTOL


def test_attention(h, npref):
    attn = L.Attention(16, 4)
    assert attn.qkv.weight.shape == (48, 16) and attn.scale == pytest.approx(0.5)
    st = _fill(attn, 7)
    x = _rand((2, 9, 16), 8)
    ref = npref.attention(x, st["qkv.weight"], st["qkv.bias"], st["proj.weight"], st["proj.bias"], 4)
    assert h.rel_err(attn(Tensor(x)), ref) < RTOL


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="not divisible"):
        L.Attention(10, 3)


def test_block(h, npref):
    blk = L.Block(16, 2, mlp_ratio=4.0)
    names = sorted(n for n, _ in blk.parameters_and_names())
    assert names == sorted(f"{m}.{k}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                           for k in ("weight", "bias"))
    st = _fill(blk, 9)
    x = _rand((2, 5, 16), 10)
    assert h.rel_err(blk(Tensor(x)), npref.block(x, st, "", 2)) < RTOL


def test_drop_path():
    x = Tensor(np.ones((64, 3, 4), np.float32))
    dp = L.DropPath(0.5)
    np.testing.assert_array_equal(dp(x).asnumpy(), x.asnumpy())  # Cells start in eval mode
    dp.set_train(True)
    ms.set_seed(0)
    out = dp(x).asnumpy()
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # whole samples dropped or kept
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    assert L.DropPath(0.0).set_train(True)(x).asnumpy().sum() == x.asnumpy().sum()


def test_patch_embed_conv_layout(h, npref):
    pe = L.PatchEmbed(img_size=16, patch_size=4, in_chans=3, embed_dim=10)
    assert pe.proj.weight.shape == (10, 3, 4, 4) and pe.proj.bias.shape == (10,)
    assert [n for n, _ in pe.parameters_and_names()] == ["proj.weight", "proj.bias"]
    st = _fill(pe, 11)
    x = _rand((2, 3, 16, 16), 12)
    ref = npref.conv_stride(x, st["proj.weight"], st["proj.bias"], 4)   # (B, D, 4, 4)
    ref = ref.reshape(2, 10, 16).transpose(0, 2, 1)                       # raster tokens
    assert h.rel_err(pe(Tensor(x)), ref) < RTOL


def test_patch_embed_rejects_wrong_size():
    pe = L.PatchEmbed(img_size=16, patch_size=4, embed_dim=8)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 16, 16\)"):
        pe(Tensor(np.zeros((1, 3, 20, 20), np.float32)))


def test_conv_transpose2x2(h, npref):
    ct = L.ConvTranspose2x2(6, 4)
    assert ct.weight.shape == (6, 4, 2, 2)
    st = _fill(ct, 13)
    x = _rand((2, 6, 3, 5), 14)
    ref = npref.conv_transpose2x2(x, st["weight"], st["bias"])
    out = ct(Tensor(x.transpose(0, 2, 3, 1))).asnumpy().transpose(0, 3, 1, 2)
    assert h.rel_err(out, ref) < RTOL


def test_conv_transpose2x2_matches_mindspore_conv_transpose(h):
    """The matmul form equals MindSpore's own Conv2dTranspose (k2 s2 valid) with the same weight."""
    ct = L.ConvTranspose2x2(5, 3)
    _fill(ct, 15)
    ref_cell = ms.nn.Conv2dTranspose(5, 3, 2, 2, pad_mode="valid", has_bias=True)
    ref_cell.weight.set_data(ct.weight.value())
    ref_cell.bias.set_data(ct.bias.value())
    x = _rand((2, 5, 4, 4), 16)
    out = ct(Tensor(x.transpose(0, 2, 3, 1))).asnumpy().transpose(0, 3, 1, 2)
    assert h.rel_err(out, ref_cell(Tensor(x))) < RTOL


def test_conv1x1_and_avgpool(h, npref):
    conv = L.Conv1x1(6, 5)
    assert conv.weight.shape == (5, 6, 1, 1)
    st = _fill(conv, 17)
    x = _rand((2, 6, 4, 6), 18)
    out = conv(Tensor(x.transpose(0, 2, 3, 1))).asnumpy().transpose(0, 3, 1, 2)
    assert h.rel_err(out, npref.conv1x1(x, st["weight"], st["bias"])) < RTOL
    pooled = L.AvgPool2x2()(Tensor(x.transpose(0, 2, 3, 1))).asnumpy().transpose(0, 3, 1, 2)
    assert h.rel_err(pooled, npref.avgpool2x2(x.astype(np.float64))) < RTOL
    assert pooled[0, 0, 0, 0] == pytest.approx(x[0, 0, :2, :2].mean(), rel=1e-6)


def test_block_under_jit_matches_pynative(h):
    blk = L.Block(16, 2)
    _fill(blk, 19)
    x = Tensor(_rand((2, 5, 16), 20))
    eager = blk(x).asnumpy()

    def run(t):
        return blk(t)

    graph = ms.jit(run)(x).asnumpy()
    assert h.rel_err(graph, eager) < RTOL
