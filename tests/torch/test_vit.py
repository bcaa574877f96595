"""LocalMIMViT (PyTorch) against an independent float64 numpy forward, core targets/loss, the
initialisation and shapes (docs/method.md#initialisation, #vit-shapes) and the canonical-state contract."""
import math

import numpy as np
import pytest
import torch

from localmim.backends.torch import LocalMIMViT, build_model
from localmim.core import targets as C
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import ViTSpec
from localmim.core.state import StateError, vit_canonical_shapes

_erf = np.vectorize(math.erf)


# ---------------------------------------------------------------- independent numpy forward (float64)
def np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_ln(x, w, b, axis=-1, eps=1e-6):
    mu = x.mean(axis, keepdims=True)
    var = ((x - mu) ** 2).mean(axis, keepdims=True)
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - mu) / np.sqrt(var + eps) * w.reshape(shape) + b.reshape(shape)


def np_block(x, s, pre, heads):
    b, n, c = x.shape
    hd = c // heads
    y = np_ln(x, s[pre + "norm1.weight"], s[pre + "norm1.bias"])
    qkv = (y @ s[pre + "attn.qkv.weight"].T + s[pre + "attn.qkv.bias"]).reshape(b, n, 3, heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
    x = x + o @ s[pre + "attn.proj.weight"].T + s[pre + "attn.proj.bias"]
    y = np_ln(x, s[pre + "norm2.weight"], s[pre + "norm2.bias"])
    y = np_gelu(y @ s[pre + "mlp.fc1.weight"].T + s[pre + "mlp.fc1.bias"])
    return x + y @ s[pre + "mlp.fc2.weight"].T + s[pre + "mlp.fc2.bias"]


def np_encoder(s, spec, imgs, ids_keep):
    b = imgs.shape[0]
    p, g, d = spec.patch_size, spec.grid, spec.embed_dim
    patches = imgs.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    x = patches @ s["patch_embed.proj.weight"].reshape(d, -1).T + s["patch_embed.proj.bias"]
    x = x + s["pos_embed"][:, 1:]
    x = np.take_along_axis(x, ids_keep[:, :, None], axis=1)
    cls = np.broadcast_to(s["cls_token"] + s["pos_embed"][:, :1], (b, 1, d))
    x = np.concatenate([cls, x], axis=1)
    out = []
    for i in range(spec.depth):
        x = np_block(x, s, f"blocks.{i}.", spec.num_heads)
        if i in spec.taps:
            k = spec.taps.index(i)
            out.append(np_ln(x, s[f"norm.{k}.weight"], s[f"norm.{k}.bias"]))
    return out


def np_convt2(x, w, bias):
    """ConvTranspose2d k2 s2: out[b, o, 2i+u, 2j+v] = sum_c x[b,c,i,j] w[c,o,u,v] + bias[o]."""
    b, _, hh, ww = x.shape
    o = w.shape[1]
    y = np.einsum("bcij,couv->boiujv", x, w).reshape(b, o, 2 * hh, 2 * ww)
    return y + bias[None, :, None, None]


def np_conv1(x, w, bias):
    return np.einsum("bchw,oc->bohw", x, w[:, :, 0, 0]) + bias[None, :, None, None]


def np_head(x, s, pre, scale):
    if scale == 4.0:
        x = np_convt2(x, s[pre + "0.weight"], s[pre + "0.bias"])
        x = np_gelu(np_ln(x, s[pre + "1.weight"], s[pre + "1.bias"], axis=1))
        x = np_convt2(x, s[pre + "3.weight"], s[pre + "3.bias"])
        return np_conv1(x, s[pre + "4.weight"], s[pre + "4.bias"])
    if scale == 2.0:
        return np_conv1(np_convt2(x, s[pre + "0.weight"], s[pre + "0.bias"]), s[pre + "1.weight"], s[pre + "1.bias"])
    if scale == 1.0:
        return np_conv1(x, s[pre + "0.weight"], s[pre + "0.bias"])
    b, c, hh, ww = x.shape
    pooled = x.reshape(b, c, hh // 2, 2, ww // 2, 2).mean(axis=(3, 5))
    return np_conv1(pooled, s[pre + "1.weight"], s[pre + "1.bias"])


def np_decoder(s, spec, k, z, ids_restore):
    pre = f"decoder.{k}."
    b, n = ids_restore.shape
    x = z @ s[pre + "embed.weight"].T + s[pre + "embed.bias"]
    dd = x.shape[-1]
    tokens = np.concatenate([x[:, 1:], np.broadcast_to(s[pre + "mask_token"], (b, n + 1 - x.shape[1], dd))], 1)
    tokens = np.take_along_axis(tokens, ids_restore[:, :, None], axis=1)
    x = np.concatenate([x[:, :1], tokens], 1) + s[pre + "pos_embed"]
    for j in range(spec.decoder_depth):
        x = np_block(x, s, pre + f"blocks.{j}.", spec.decoder_heads)
    x = np_ln(x, s[pre + "norm.weight"], s[pre + "norm.bias"])
    fmap = x[:, 1:].transpose(0, 2, 1).reshape(b, dd, spec.grid, spec.grid)
    y = np_head(fmap, s, pre + "pred.", spec.scales[k])
    return y.reshape(b, y.shape[1], -1).transpose(0, 2, 1)


def _perturb(model, seed=0):
    """Random values on every trainable parameter so that zero biases / unit norms test nothing by luck."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _f64(state):
    return {k: v.astype(np.float64) for k, v in state.items()}


def _canonical_keys(spec):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    sub = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
           for p in ("weight", "bias")]
    keys += [f"blocks.{i}.{n}" for i in range(spec.depth) for n in sub]
    keys += [f"norm.{k}.{p}" for k in range(4) for p in ("weight", "bias")]
    heads = {4.0: (0, 1, 3, 4), 2.0: (0, 1), 1.0: (0,), 0.5: (1,)}
    for k, s in enumerate(spec.scales):
        keys += [f"decoder.{k}.{n}" for n in ("mask_token", "pos_embed", "embed.weight", "embed.bias",
                                              "norm.weight", "norm.bias")]
        keys += [f"decoder.{k}.blocks.{j}.{n}" for j in range(spec.decoder_depth) for n in sub]
        keys += [f"decoder.{k}.pred.{i}.{p}" for i in heads[s] for p in ("weight", "bias")]
        if spec.target.kind == "hog":
            keys.append(f"hog_enc.{k}.conv.weight")
            if spec.target.hog_bias:
                keys.append(f"hog_enc.{k}.conv.bias")
    return keys


# ---------------------------------------------------------------- tests
def test_state_keys_are_canonical(tiny_spec, tiny_bias_spec, tiny_pixel_spec):
    for spec in (tiny_spec, tiny_bias_spec, tiny_pixel_spec):
        model = build_model(spec)
        assert isinstance(model, LocalMIMViT)
        assert sorted(model.state_dict()) == sorted(_canonical_keys(spec))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == vit_canonical_shapes(spec)


def test_vit_base_geometry_shapes(h):
    """The shapes of docs/method.md#vit-shapes with ViT-B geometry (224 px, patch 16, 12 blocks) at a tiny width."""
    spec = ViTSpec("vitb_geometry", patch_size=16, embed_dim=32, depth=12, num_heads=2, decoder_dim=16,
                   decoder_heads=2)
    assert spec.taps == (1, 3, 9, 11)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    masks = h.mask_tensors(h.make_mask(spec, 1))
    imgs = torch.from_numpy(h.make_images(1, 224))
    with torch.no_grad():
        lat = model.forward_encoder(imgs, masks)
        preds = model.forward_decoders(lat, masks)
        tgts = model.forward_targets(imgs)
    assert [tuple(z.shape) for z in lat] == [(1, 50, 32)] * 4
    want = [(1, 3136, 27), (1, 784, 27), (1, 196, 27), (1, 49, 27)]
    assert [tuple(p.shape) for p in preds] == want and [tuple(t.shape) for t in tgts] == want
    assert [tuple(m.shape) for m in model.branch_masks(masks, 1)] == [(1, 3136), (1, 784), (1, 196), (1, 49)]
    assert tuple(model.decoder[0].pred[0].weight.shape) == (16, 8, 2, 2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 224, 224\)"):
        model.forward_encoder(torch.zeros(1, 3, 64, 64), masks)


@pytest.mark.parametrize("spec_name", ["tiny_spec", "tiny64_spec"])
def test_forward_matches_numpy(spec_name, request, h):
    spec = request.getfixturevalue(spec_name)
    torch.manual_seed(0)
    model = build_model(spec)
    _perturb(model)
    s = _f64(model.export_state())
    vm = h.make_mask(spec, 2)
    masks = h.mask_tensors(vm)
    imgs = h.make_images(2, spec.img_size)
    with torch.no_grad():
        lat = model.forward_encoder(torch.from_numpy(imgs), masks)
        preds = model.forward_decoders(lat, masks)
    want_lat = np_encoder(s, spec, imgs.astype(np.float64), vm.ids_keep)
    assert len(lat) == 4
    for got, want in zip(lat, want_lat):
        assert h.rel_err(got, want) < 1e-5
    for k, got in enumerate(preds):
        want = np_decoder(s, spec, k, want_lat[k], vm.ids_restore)
        assert got.shape == want.shape
        assert h.rel_err(got, want) < 1e-5


def test_targets_and_loss_match_core(tiny64_spec, h):
    torch.manual_seed(0)
    model = build_model(tiny64_spec)
    vm = h.make_mask(tiny64_spec, 2)
    imgs = h.make_images(2, 64, seed=3)
    tgts = model.forward_targets(torch.from_numpy(imgs))
    want_t = C.hog_targets(imgs, [2, 4, 8, 16], 9)
    for g, w in zip(tgts, want_t):
        assert g.dtype == torch.float32 and not g.requires_grad
        assert (np.abs(g.numpy() - w).max(-1) > 1e-5).mean() < 0.01
    loss, branch = model(torch.from_numpy(imgs), h.mask_tensors(vm))
    with torch.no_grad():
        preds = model.forward_decoders(model.forward_encoder(torch.from_numpy(imgs), h.mask_tensors(vm)),
                                       h.mask_tensors(vm))
    masks = C.scale_masks(vm.mask, tiny64_spec.grid, tiny64_spec.scales)
    want_total, want_branch = C.localmim_loss([p.numpy() for p in preds], [t.numpy() for t in tgts], masks)
    assert loss.dtype == torch.float32 and branch.shape == (4,)
    assert abs(loss.item() - want_total) / want_total < 1e-5
    assert np.allclose(branch.detach().numpy(), want_branch, rtol=1e-5)


def test_hog_bias_targets_use_stored_biases(tiny_bias_spec, h):
    torch.manual_seed(0)
    model = build_model(tiny_bias_spec)
    biases = np.stack([model.export_state()[f"hog_enc.{k}.conv.bias"] for k in range(4)])
    assert np.all(np.abs(biases) <= 1 / 3) and len(np.unique(biases)) == 8  # one draw per scale
    assert all(not p.requires_grad for p in model.hog_enc.parameters())
    imgs = h.make_images(2, 64, seed=6)
    imgs[:, :, :16, :16] = 0.5  # flat corner: the bias decides its orientation
    tgts = model.forward_targets(torch.from_numpy(imgs))
    want = C.hog_targets(imgs, [2, 4, 8, 16], 18, biases=biases)
    for g, w in zip(tgts, want):
        assert g.shape[-1] == 54
        assert (np.abs(g.numpy() - w).max(-1) > 1e-5).mean() < 0.01
    unbiased = C.hog_targets(imgs, [2, 4, 8, 16], 18)
    assert np.abs(tgts[0].numpy() - unbiased[0]).max() > 0.1


def test_pixel_targets_model(tiny_pixel_spec, h):
    torch.manual_seed(0)
    model = build_model(tiny_pixel_spec)
    assert not hasattr(model, "hog_enc")
    imgs = h.make_images(2, 32, seed=7)
    tgts = model.forward_targets(torch.from_numpy(imgs))
    want = C.pixel_targets(imgs, [2, 4, 8, 16], True)
    assert [t.shape[-1] for t in tgts] == [12, 48, 192, 768] == list(tiny_pixel_spec.out_dims())
    for g, w in zip(tgts, want):
        assert h.rel_err(g, w) < 1e-5
    loss, _ = model(torch.from_numpy(imgs), h.mask_tensors(h.make_mask(tiny_pixel_spec, 2)))
    assert torch.isfinite(loss)


def test_initialisation_follows_spec():
    spec = ViTSpec("init_stats", patch_size=8, embed_dim=256, depth=4, num_heads=4, img_size=32,
                   taps=(0, 1, 2, 3), decoder_dim=128, decoder_heads=4)
    torch.manual_seed(0)
    model = build_model(spec)
    sd = dict(model.named_parameters())
    d, dd = 256, 128

    def check_uniform(name, bound):
        w = sd[name].detach().abs()
        assert w.max() <= bound * (1 + 1e-6), name
        assert w.max() > 0.9 * bound, name  # thousands of draws reach close to the bound

    check_uniform("blocks.0.attn.qkv.weight", math.sqrt(6 / (4 * d)))  # fused qkv as one matrix
    check_uniform("blocks.2.mlp.fc1.weight", math.sqrt(6 / (5 * d)))
    check_uniform("blocks.3.attn.proj.weight", math.sqrt(6 / (2 * d)))
    check_uniform("decoder.1.embed.weight", math.sqrt(6 / (d + dd)))
    check_uniform("decoder.2.blocks.0.attn.qkv.weight", math.sqrt(6 / (4 * dd)))
    check_uniform("patch_embed.proj.weight", math.sqrt(6 / (d + 3 * 64)))  # xavier on (D, 3*p*p)
    check_uniform("patch_embed.proj.bias", 1 / math.sqrt(3 * 64))  # PyTorch default
    # pred heads keep PyTorch defaults: bound 1/sqrt(fan_in), ConvT fan_in = weight.shape[1] * k * k
    check_uniform("decoder.0.pred.0.weight", 1 / math.sqrt((dd // 2) * 4))
    check_uniform("decoder.0.pred.0.bias", 1 / math.sqrt((dd // 2) * 4))
    check_uniform("decoder.0.pred.3.weight", 1 / math.sqrt((dd // 4) * 4))
    check_uniform("decoder.0.pred.4.weight", 1 / math.sqrt(dd // 4))
    check_uniform("decoder.2.pred.0.weight", 1 / math.sqrt(dd))
    check_uniform("decoder.3.pred.1.weight", 1 / math.sqrt(dd))
    for name, p in sd.items():
        is_linear_bias = name.endswith(".bias") and any(t in name for t in ("qkv", "proj.", "fc1", "fc2", "embed."))
        if is_linear_bias and not name.startswith("patch_embed"):
            assert torch.all(p == 0), name
        if any(name.endswith(f"{n}.weight") for n in ("norm1", "norm2", "norm", "pred.1")) or \
                name.startswith("norm.") and name.endswith("weight"):
            if p.ndim == 1:
                assert torch.all(p == 1), name
    for k in range(4):
        assert torch.all(sd[f"norm.{k}.bias"] == 0) and torch.all(sd[f"decoder.{k}.norm.bias"] == 0)
    assert torch.all(sd["decoder.0.pred.1.weight"] == 1) and torch.all(sd["decoder.0.pred.1.bias"] == 0)
    tokens = torch.cat([sd["cls_token"].flatten()] + [sd[f"decoder.{k}.mask_token"].flatten() for k in range(4)])
    assert abs(tokens.std().item() - 0.02) < 0.003 and abs(tokens.mean().item()) < 0.003
    # frozen sin-cos tables
    assert not sd["pos_embed"].requires_grad and not sd["decoder.1.pos_embed"].requires_grad
    np.testing.assert_array_equal(sd["pos_embed"].detach().numpy()[0], sincos_2d(d, 4, cls_token=True))
    np.testing.assert_array_equal(sd["decoder.3.pos_embed"].detach().numpy()[0], sincos_2d(dd, 4, cls_token=True))
    for k in range(4):
        np.testing.assert_array_equal(model.hog_enc[k].conv.weight.numpy(), C.sobel_kernel())


def test_export_import_round_trip_and_errors(tiny_bias_spec):
    torch.manual_seed(0)
    src = build_model(tiny_bias_spec)
    _perturb(src, seed=1)
    state = src.export_state()
    assert all(v.dtype == np.float32 and isinstance(v, np.ndarray) for v in state.values())
    torch.manual_seed(1)
    dst = build_model(tiny_bias_spec)
    dst.import_state(state)
    back = dst.export_state()
    assert sorted(back) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    # exported arrays are copies: editing them does not touch the model
    state["cls_token"][...] = 7.0
    assert not torch.any(dst.cls_token == 7.0) and not torch.any(src.cls_token == 7.0)

    missing = dict(back)
    del missing["decoder.2.mask_token"]
    with pytest.raises(StateError, match=r"missing key\(s\): decoder\.2\.mask_token"):
        dst.import_state(missing)
    extra = dict(back, **{"head.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(StateError, match=r"unexpected key\(s\): head\.weight"):
        dst.import_state(extra)
    wrong = dict(back, **{"blocks.1.attn.qkv.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(StateError, match=r"blocks\.1\.attn\.qkv\.weight expected \(96, 32\) found \(32, 32\)"):
        dst.import_state(wrong)
    not_sobel = dict(back, **{"hog_enc.1.conv.weight": np.ones((2, 1, 3, 3), np.float32)})
    with pytest.raises(StateError, match=r"hog_enc\.1\.conv\.weight is not the fixed Sobel kernel"):
        dst.import_state(not_sobel)
    # a failed import leaves the model unchanged
    for k, v in dst.export_state().items():
        np.testing.assert_array_equal(v, back[k])


def test_gradients_reach_every_trainable_parameter(tiny_spec, h):
    torch.manual_seed(0)
    model = build_model(tiny_spec)
    loss, branch = model(torch.from_numpy(h.make_images(2, 32)), h.mask_tensors(h.make_mask(tiny_spec, 2)))
    assert torch.allclose(loss, branch.sum())
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(["pos_embed"] + [f"decoder.{k}.pos_embed" for k in range(4)]
                            + [f"hog_enc.{k}.conv.weight" for k in range(4)])


def test_bf16_autocast_forward(tiny64_spec, h):
    torch.manual_seed(0)
    model = build_model(tiny64_spec)
    imgs = torch.from_numpy(h.make_images(2, 64))
    masks = h.mask_tensors(h.make_mask(tiny64_spec, 2))
    ref_loss, _ = model(imgs, masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model.forward_decoders(model.forward_encoder(imgs, masks), masks)
        tgts = model.forward_targets(imgs)
        loss, branch = model(imgs, masks)
    assert preds[2].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in tgts)
    assert loss.dtype == torch.float32 and branch.dtype == torch.float32
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.05
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
