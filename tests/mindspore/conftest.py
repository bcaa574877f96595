"""Fixtures of the MindSpore backend tests: the CPU context once per process, `mask_tensors` as
MindSpore tensors and float64 numpy references of the layers; the tiny specs, images, masks and
`h` are in tests/conftest.py."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from localmim.backends.mindspore import ensure_cpu_context  # noqa: E402

ensure_cpu_context()


@pytest.fixture(scope="session", autouse=True)
def _mindspore_cpu_context():
    """CPU device + PyNative mode, set once per process (MindSpore refuses a second device change)."""
    ensure_cpu_context()
    yield


@pytest.fixture(scope="module")
def mask_tensors():
    """VitMask -> the ViT models' masks argument {"ids_keep", "ids_restore", "mask"} as MindSpore tensors."""
    return lambda m: {k: ms.Tensor(v) for k, v in m.as_dict().items()}


# ------------------------------------------------------------------ float64 numpy references
# Written from the definitions in docs/method.md#vit-encoder and #vit-decoders, independent of the
# MindSpore code.

def np_layer_norm(x, w, b, eps=1e-6):
    """LayerNorm over the last axis: biased variance, eps inside the sqrt."""
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu(x):
    from scipy.special import erf
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_linear(x, w, b):
    return x @ np.asarray(w, np.float64).T + b


def np_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """Multi-head softmax attention, fused qkv rows [q | k | v] with heads contiguous."""
    bsz, n, c = x.shape
    hd = c // heads
    qkv = np_linear(x, qkv_w, qkv_b).reshape(bsz, n, 3, heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    logits = logits - logits.max(-1, keepdims=True)
    attn = np.exp(logits)
    attn = attn / attn.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, n, c)
    return np_linear(out, proj_w, proj_b)


def np_block(x, st, prefix, heads):
    """timm pre-norm Block from canonical state entries `prefix + 'norm1.weight'` etc."""
    g = lambda k: np.asarray(st[prefix + k], np.float64)  # noqa: E731
    y = np_layer_norm(x, g("norm1.weight"), g("norm1.bias"))
    x = x + np_attention(y, g("attn.qkv.weight"), g("attn.qkv.bias"), g("attn.proj.weight"),
                         g("attn.proj.bias"), heads)
    y = np_layer_norm(x, g("norm2.weight"), g("norm2.bias"))
    y = np_linear(np_gelu(np_linear(y, g("mlp.fc1.weight"), g("mlp.fc1.bias"))), g("mlp.fc2.weight"),
                  g("mlp.fc2.bias"))
    return x + y


def np_conv_stride(x, w, b, p):
    """Conv2d(kernel = stride = p, bias) on NCHW by summing strided slices: (B,C,H,W) -> (B,O,H/p,W/p)."""
    out = 0.0
    for a in range(p):
        for e in range(p):
            out = out + np.einsum("bcij,oc->boij", x[:, :, a::p, e::p], w[:, :, a, e])
    return out + b.reshape(1, -1, 1, 1)


def np_conv_transpose2x2(x, w, b):
    """ConvTranspose2d(k=2, s=2, bias) on NCHW, w (in, out, 2, 2): each input pixel paints a 2x2 block."""
    bsz, _, hh, ww = x.shape
    out = np.zeros((bsz, w.shape[1], 2 * hh, 2 * ww))
    for a in range(2):
        for e in range(2):
            out[:, :, a::2, e::2] = np.einsum("bcij,co->boij", x, w[:, :, a, e])
    return out + b.reshape(1, -1, 1, 1)


def np_conv1x1(x, w, b):
    """1x1 Conv2d on NCHW, w (out, in, 1, 1)."""
    return np.einsum("bcij,oc->boij", x, w[:, :, 0, 0]) + b.reshape(1, -1, 1, 1)


def np_avgpool2x2(x):
    bsz, c, hh, ww = x.shape
    return x.reshape(bsz, c, hh // 2, 2, ww // 2, 2).mean(axis=(3, 5))


def np_layer_norm2d(x, w, b, eps=1e-6):
    """LayerNorm over the channel axis of NCHW."""
    return np_layer_norm(x.transpose(0, 2, 3, 1), w, b, eps).transpose(0, 3, 1, 2)


class NumpyRef:
    layer_norm = staticmethod(np_layer_norm)
    gelu = staticmethod(np_gelu)
    linear = staticmethod(np_linear)
    attention = staticmethod(np_attention)
    block = staticmethod(np_block)
    conv_stride = staticmethod(np_conv_stride)
    conv_transpose2x2 = staticmethod(np_conv_transpose2x2)
    conv1x1 = staticmethod(np_conv1x1)
    avgpool2x2 = staticmethod(np_avgpool2x2)
    layer_norm2d = staticmethod(np_layer_norm2d)


@pytest.fixture(scope="session")
def npref():
    return NumpyRef
