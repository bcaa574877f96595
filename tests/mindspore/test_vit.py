"""MindSpore LocalMIM ViT: canonical names, initialisation, forward passes against a float64 numpy
forward, targets and loss against core, state round trip, gradients and graph mode."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from localmim.backends.mindspore import LocalMIMViT, build_model
from localmim.core import targets as C
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import get_spec
from localmim.core.state import StateError

RTOL = 1e-5


def expected_shapes(spec):
    """Canonical names and shapes written from docs/internals.md (docs/method.md#checkpoint-layouts), not
    from the model."""
    d, p, n = spec.embed_dim, spec.patch_size, spec.num_patches
    hid = int(d * spec.mlp_ratio)
    out = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d),
           "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)}

    def block(prefix, w):
        h = int(w * spec.mlp_ratio)
        return {f"{prefix}norm1.weight": (w,), f"{prefix}norm1.bias": (w,),
                f"{prefix}attn.qkv.weight": (3 * w, w), f"{prefix}attn.qkv.bias": (3 * w,),
                f"{prefix}attn.proj.weight": (w, w), f"{prefix}attn.proj.bias": (w,),
                f"{prefix}norm2.weight": (w,), f"{prefix}norm2.bias": (w,),
                f"{prefix}mlp.fc1.weight": (h, w), f"{prefix}mlp.fc1.bias": (h,),
                f"{prefix}mlp.fc2.weight": (w, h), f"{prefix}mlp.fc2.bias": (w,)}

    assert hid == 4 * d
    for i in range(spec.depth):
        out.update(block(f"blocks.{i}.", d))
    for k, scale in enumerate(spec.scales):
        out[f"norm.{k}.weight"] = (d,)
        out[f"norm.{k}.bias"] = (d,)
        e = spec.decoder_dim
        cell = int(spec.patch_size / scale)
        o = 3 * spec.target.nbins if spec.target.kind == "hog" else 3 * cell * cell
        pre = f"decoder.{k}."
        out.update({pre + "embed.weight": (e, d), pre + "embed.bias": (e,), pre + "mask_token": (1, 1, e),
                    pre + "pos_embed": (1, 1 + n, e), pre + "norm.weight": (e,), pre + "norm.bias": (e,)})
        for j in range(spec.decoder_depth):
            out.update(block(f"{pre}blocks.{j}.", e))
        if scale == 4.0:
            out.update({pre + "pred.0.weight": (e, e // 2, 2, 2), pre + "pred.0.bias": (e // 2,),
                        pre + "pred.1.weight": (e // 2,), pre + "pred.1.bias": (e // 2,),
                        pre + "pred.3.weight": (e // 2, e // 4, 2, 2), pre + "pred.3.bias": (e // 4,),
                        pre + "pred.4.weight": (o, e // 4, 1, 1), pre + "pred.4.bias": (o,)})
        elif scale == 2.0:
            out.update({pre + "pred.0.weight": (e, e // 2, 2, 2), pre + "pred.0.bias": (e // 2,),
                        pre + "pred.1.weight": (o, e // 2, 1, 1), pre + "pred.1.bias": (o,)})
        elif scale == 1.0:
            out.update({pre + "pred.0.weight": (o, e, 1, 1), pre + "pred.0.bias": (o,)})
        else:
            out.update({pre + "pred.1.weight": (o, e, 1, 1), pre + "pred.1.bias": (o,)})
        if spec.target.kind == "hog":
            out[f"hog_enc.{k}.conv.weight"] = (2, 1, 3, 3)
            if spec.target.hog_bias:
                out[f"hog_enc.{k}.conv.bias"] = (2,)
    return out


FROZEN_PREFIXES = ("pos_embed", "hog_enc.")


def _is_frozen(name):
    return name == "pos_embed" or name.endswith(".pos_embed") or name.startswith("hog_enc.")


# ------------------------------------------------------------------------------ numpy forward

def np_encoder(st, spec, imgs, ids_keep, npref):
    """float64 numpy encoder: patch conv + pos, gather visible, cls, blocks, branch norms at taps."""
    g = lambda k: np.asarray(st[k], np.float64)  # noqa: E731
    x = npref.conv_stride(imgs.astype(np.float64), g("patch_embed.proj.weight"), g("patch_embed.proj.bias"),
                          spec.patch_size)
    b, d = x.shape[:2]
    x = x.reshape(b, d, -1).transpose(0, 2, 1) + g("pos_embed")[:, 1:]
    x = np.take_along_axis(x, ids_keep[:, :, None], axis=1)
    cls = np.broadcast_to(g("cls_token") + g("pos_embed")[:, :1], (b, 1, d))
    x = np.concatenate([cls, x], axis=1)
    latents = []
    for i in range(spec.depth):
        x = npref.block(x, st, f"blocks.{i}.", spec.num_heads)
        if i in spec.taps:
            k = spec.taps.index(i)
            latents.append(npref.layer_norm(x, g(f"norm.{k}.weight"), g(f"norm.{k}.bias")))
    return latents


def np_decoder(st, spec, k, latent, ids_restore, npref):
    """float64 numpy decoder of branch k: embed, mask tokens + unshuffle, pos, blocks, norm, head."""
    pre = f"decoder.{k}."
    g = lambda key: np.asarray(st[pre + key], np.float64)  # noqa: E731
    x = npref.linear(latent, g("embed.weight"), g("embed.bias"))
    b, length, e = x.shape
    n = spec.num_patches
    seq = np.concatenate([x[:, 1:], np.broadcast_to(g("mask_token"), (b, n + 1 - length, e))], axis=1)
    seq = np.take_along_axis(seq, ids_restore[:, :, None], axis=1)
    x = np.concatenate([x[:, :1], seq], axis=1) + g("pos_embed")
    for j in range(spec.decoder_depth):
        x = npref.block(x, st, f"{pre}blocks.{j}.", spec.decoder_heads)
    x = npref.layer_norm(x, g("norm.weight"), g("norm.bias"))
    fmap = x[:, 1:].transpose(0, 2, 1).reshape(b, e, spec.grid, spec.grid)  # NCHW
    scale = spec.scales[k]
    if scale == 4.0:
        fmap = npref.conv_transpose2x2(fmap, g("pred.0.weight"), g("pred.0.bias"))
        fmap = npref.gelu(npref.layer_norm2d(fmap, g("pred.1.weight"), g("pred.1.bias")))
        fmap = npref.conv_transpose2x2(fmap, g("pred.3.weight"), g("pred.3.bias"))
        fmap = npref.conv1x1(fmap, g("pred.4.weight"), g("pred.4.bias"))
    elif scale == 2.0:
        fmap = npref.conv_transpose2x2(fmap, g("pred.0.weight"), g("pred.0.bias"))
        fmap = npref.conv1x1(fmap, g("pred.1.weight"), g("pred.1.bias"))
    elif scale == 1.0:
        fmap = npref.conv1x1(fmap, g("pred.0.weight"), g("pred.0.bias"))
    else:
        fmap = npref.conv1x1(npref.avgpool2x2(fmap), g("pred.1.weight"), g("pred.1.bias"))
    return fmap.reshape(b, fmap.shape[1], -1).transpose(0, 2, 1)


def _randomise(net, seed):
    """Random values for every trainable parameter (so zero-initialised biases get exercised)."""
    rng = np.random.default_rng(seed)
    state = net.export_state()
    for k, v in state.items():
        if not _is_frozen(k):
            state[k] = (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
    net.import_state(state)
    return net.export_state()


# ------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("which", ["tiny_spec", "tiny_bias_spec", "tiny_pixel_spec"])
def test_parameter_names_and_shapes(which, request):
    spec = request.getfixturevalue(which)
    net = build_model(spec)
    assert isinstance(net, LocalMIMViT)
    got = {n: tuple(p.shape) for n, p in net.parameters_and_names()}
    assert got == expected_shapes(spec)
    # the Parameter's own name (what a .ckpt stores) is the canonical name too
    assert {p.name for p in net.get_parameters()} == set(got)
    trainable = {p.name for p in net.trainable_params()}
    assert trainable == {n for n in got if not _is_frozen(n)}


def test_initialisation_statistics():
    ms.set_seed(0)
    spec = get_spec("vit_tiny_test", embed_dim=128, num_heads=4, decoder_dim=64, img_size=64)
    net = build_model(spec)
    st = net.export_state()
    d = spec.embed_dim

    def check_uniform(w, bound, name):
        w = np.asarray(w, np.float64).ravel()
        assert np.abs(w).max() <= bound * (1 + 1e-6), name
        assert np.abs(w).max() > 0.9 * bound, name
        assert abs(w.std() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3), name

    # fused qkv is one (3D, D) xavier matrix: bound sqrt(6 / (D + 3D))
    check_uniform(st["blocks.0.attn.qkv.weight"], math.sqrt(6 / (4 * d)), "qkv")
    check_uniform(st["blocks.1.mlp.fc1.weight"], math.sqrt(6 / (5 * d)), "fc1")
    check_uniform(st["decoder.0.embed.weight"], math.sqrt(6 / (d + 64)), "embed")
    fan_in = 3 * spec.patch_size ** 2
    check_uniform(st["patch_embed.proj.weight"], math.sqrt(6 / (fan_in + d)), "patch weight")
    assert np.abs(st["patch_embed.proj.bias"]).max() <= 1 / math.sqrt(fan_in)
    assert np.abs(st["patch_embed.proj.bias"]).max() > 0.5 / math.sqrt(fan_in)
    # pred heads: PyTorch default, bound 1/sqrt(fan_in), ConvTranspose fan_in = out * k * k
    check_uniform(st["decoder.0.pred.0.weight"], 1 / math.sqrt(32 * 4), "convT 64->32")
    check_uniform(st["decoder.0.pred.3.weight"], 1 / math.sqrt(16 * 4), "convT 32->16")
    check_uniform(st["decoder.2.pred.0.weight"], 1 / math.sqrt(64), "conv1x1 64->27")
    assert np.abs(st["decoder.0.pred.0.bias"]).max() <= 1 / math.sqrt(128)
    assert np.abs(st["decoder.2.pred.0.bias"]).max() <= 1 / math.sqrt(64)
    assert np.any(st["decoder.2.pred.0.bias"] != 0)
    for name in ("cls_token", "decoder.0.mask_token", "decoder.3.mask_token"):
        assert 0.012 < st[name].std() < 0.028, name
    for k, v in st.items():
        if k.endswith(".bias") and ("blocks." in k or "embed.bias" in k):
            assert np.all(v == 0), k
        if (k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.startswith("norm.")
                or k.endswith("norm.weight") or k.endswith("pred.1.weight") and k.startswith("decoder.0")):
            assert np.all(v == (1 if k.endswith("weight") else 0)), k


def test_pos_embeds_are_fixed_sincos(tiny64_spec):
    net = build_model(tiny64_spec)
    np.testing.assert_array_equal(net.pos_embed.asnumpy()[0],
                                  sincos_2d(tiny64_spec.embed_dim, tiny64_spec.grid, cls_token=True))
    assert net.pos_embed.requires_grad is False
    for k in range(4):
        p = net.decoder[k].pos_embed
        assert p.requires_grad is False
        np.testing.assert_array_equal(p.asnumpy()[0], sincos_2d(tiny64_spec.decoder_dim, tiny64_spec.grid, True))
        np.testing.assert_array_equal(net.hog_enc[k].conv.weight.asnumpy(), C.sobel_kernel())


@pytest.fixture(scope="module")
def run64(h):
    """One randomised 64-px tiny model and one forward pass, shared by the numeric tests below."""
    spec = get_spec("vit_tiny_test", img_size=64)
    ms.set_seed(1)
    net = build_model(spec)
    st = _randomise(net, 2)
    imgs = h.make_images(2, spec.img_size, seed=3)
    m = h.make_mask(spec, 2, ratio=0.6)
    masks = h.mask_tensors(m)
    latents = net.forward_encoder(Tensor(imgs), masks)
    preds = net.forward_decoders(latents, masks)
    targets = net.forward_targets(Tensor(imgs))
    loss, per = net(Tensor(imgs), masks)
    return dict(spec=spec, net=net, st=st, imgs=imgs, m=m, latents=latents, preds=preds, targets=targets,
                loss=loss, per=per)


def test_encoder_and_decoders_match_numpy(run64, h, npref):
    spec, st, m = run64["spec"], run64["st"], run64["m"]
    ref_latents = np_encoder(st, spec, run64["imgs"], m.ids_keep, npref)
    assert len(run64["latents"]) == 4
    for z, r in zip(run64["latents"], ref_latents):
        assert z.shape == (2, 1 + m.ids_keep.shape[1], spec.embed_dim)
        assert h.rel_err(z, r) < RTOL
    for k, (p, b) in enumerate(zip(run64["preds"], spec.branches())):
        ref = np_decoder(st, spec, k, ref_latents[k], m.ids_restore, npref)
        assert p.shape == (2, b.grid ** 2, spec.out_dims()[k]) == ref.shape
        assert h.rel_err(p, ref) < RTOL, k


def test_tiny32_encoder_and_decoders_match_numpy(tiny_spec, h, npref):
    """The 32-px spec: 4x4 patch grid, 0.5-scale branch on a 2x2 grid."""
    ms.set_seed(21)
    net = build_model(tiny_spec)
    st = _randomise(net, 22)
    imgs = h.make_images(1, 32, seed=23)
    m = h.make_mask(tiny_spec, 1)
    latents = net.forward_encoder(Tensor(imgs), h.mask_tensors(m))
    ref_latents = np_encoder(st, tiny_spec, imgs, m.ids_keep, npref)
    preds = net.forward_decoders(latents, h.mask_tensors(m))
    for k in range(4):
        assert h.rel_err(latents[k], ref_latents[k]) < RTOL
        assert h.rel_err(preds[k], np_decoder(st, tiny_spec, k, ref_latents[k], m.ids_restore, npref)) < RTOL


def _check_targets(ours, ref, pixel):
    for o, r in zip(ours, ref):
        assert o.dtype == ms.float32 and o.shape == r.shape
        a, b = o.asnumpy(), r
        close = np.isclose(a, b, rtol=1e-5, atol=2e-6).all(axis=-1)
        # a token may differ only where a pixel's orientation sits exactly on a bin edge
        assert 1.0 - close.mean() < 1e-3
        if pixel:
            assert close.all()
        np.testing.assert_allclose(a[close], b[close], rtol=1e-5, atol=2e-6)


def test_forward_targets_hog_match_core(run64):
    spec = run64["spec"]
    ref = C.hog_targets(run64["imgs"], [b.cell for b in spec.branches()], spec.target.nbins)
    _check_targets(run64["targets"], ref, pixel=False)


@pytest.mark.parametrize("which", ["tiny_bias_spec", "tiny_pixel_spec"])
def test_forward_targets_bias_and_pixel_match_core(which, request, h):
    spec = request.getfixturevalue(which)
    ms.set_seed(4)
    net = build_model(spec)
    imgs = h.make_images(2, spec.img_size, seed=5)
    ours = net.forward_targets(Tensor(imgs))
    cells = [b.cell for b in spec.branches()]
    if spec.target.kind == "hog":
        biases = np.stack([net.hog_enc[k].conv.bias.asnumpy() for k in range(4)])
        assert np.all(np.abs(biases) <= 1 / 3) and len(np.unique(biases)) == 8
        ref = C.hog_targets(imgs, cells, spec.target.nbins, biases)
    else:
        ref = C.pixel_targets(imgs, cells, spec.target.norm_pix)
    _check_targets(ours, ref, pixel=spec.target.kind == "pixel")


def test_loss_matches_core(run64, h):
    spec, m = run64["spec"], run64["m"]
    loss, per = run64["loss"], run64["per"]
    assert loss.dtype == ms.float32 and per.shape == (4,)
    preds = [p.asnumpy() for p in run64["preds"]]
    tgts = [t.asnumpy() for t in run64["targets"]]
    masks = C.scale_masks(m.mask, spec.grid, spec.scales)
    for ours, ref in zip(run64["net"].branch_masks(h.mask_tensors(m), 2), masks):
        np.testing.assert_array_equal(ours.asnumpy(), ref)
    ref_total, ref_per = C.localmim_loss(preds, tgts, masks)
    np.testing.assert_allclose(per.asnumpy(), ref_per, rtol=RTOL)
    assert float(loss.asnumpy()) == pytest.approx(ref_total, rel=RTOL)
    assert float(loss.asnumpy()) == pytest.approx(float(per.asnumpy().sum()), rel=1e-6)


def test_state_round_trip_is_bit_identical(tiny_bias_spec, h):
    ms.set_seed(9)
    a = build_model(tiny_bias_spec)
    ms.set_seed(10)
    b = build_model(tiny_bias_spec)
    sa = a.export_state()
    assert all(v.dtype == np.float32 for v in sa.values())
    assert not np.array_equal(sa["blocks.0.attn.qkv.weight"], b.export_state()["blocks.0.attn.qkv.weight"])
    b.import_state(sa)
    sb = b.export_state()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k
    sa["cls_token"][...] = 7.0  # export hands out copies
    assert not np.any(a.cls_token.asnumpy() == 7.0)


def test_import_state_errors_name_the_keys(tiny_spec):
    net = build_model(tiny_spec)
    good = net.export_state()
    before = net.export_state()
    bad = dict(good)
    del bad["decoder.2.pred.0.bias"]
    bad["decoder.9.embed.weight"] = np.zeros((3, 3), np.float32)
    bad["blocks.1.attn.qkv.weight"] = np.zeros((32, 32), np.float32)
    bad["cls_token"] = bad["cls_token"] + 1.0
    with pytest.raises(StateError) as err:
        net.import_state(bad)
    msg = str(err.value)
    assert "decoder.2.pred.0.bias" in msg and "missing" in msg
    assert "decoder.9.embed.weight" in msg and "unexpected" in msg
    assert "blocks.1.attn.qkv.weight" in msg and "(96, 32)" in msg and "(32, 32)" in msg
    assert isinstance(err.value, ValueError)
    after = net.export_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing written
    not_sobel = dict(good)
    not_sobel["hog_enc.1.conv.weight"] = np.ones((2, 1, 3, 3), np.float32)
    with pytest.raises(StateError, match=r"hog_enc\.1\.conv\.weight"):
        net.import_state(not_sobel)


def test_gradients_reach_every_trainable_parameter(tiny_bias_spec, h):
    ms.set_seed(12)
    net = build_model(tiny_bias_spec)
    params = net.trainable_params()
    frozen = {p.name for p in net.get_parameters()} - {p.name for p in params}
    assert frozen == {"pos_embed"} | {f"decoder.{k}.pos_embed" for k in range(4)} | \
        {f"hog_enc.{k}.conv.{w}" for k in range(4) for w in ("weight", "bias")}
    imgs = Tensor(h.make_images(2, 64, seed=13))
    masks = h.mask_tensors(h.make_mask(tiny_bias_spec, 2))

    def loss_fn(x, m):
        return net(x, m)[0]

    grad_fn = ms.value_and_grad(loss_fn, grad_position=None, weights=params)
    loss, grads = grad_fn(imgs, masks)
    assert np.isfinite(float(loss.asnumpy()))
    assert len(grads) == len(params)
    for p, g in zip(params, grads):
        g = g.asnumpy()
        assert g.shape == tuple(p.shape) and np.all(np.isfinite(g)), p.name
        assert np.abs(g).max() > 0, p.name


def test_construct_under_jit_matches_pynative(tiny_spec, h):
    ms.set_seed(14)
    net = build_model(tiny_spec)
    _randomise(net, 15)
    imgs = Tensor(h.make_images(2, 32, seed=16))
    masks = h.mask_tensors(h.make_mask(tiny_spec, 2))
    eager_loss, eager_per = net(imgs, masks)

    def step(x, m):
        return net(x, m)

    graph_loss, graph_per = ms.jit(step)(imgs, ms.mutable(masks))
    assert h.rel_err(graph_loss, eager_loss) < RTOL
    assert h.rel_err(graph_per, eager_per) < RTOL



def test_wrong_image_size_and_spec_type(tiny_spec, h):
    net = build_model(tiny_spec)
    m = h.make_mask(tiny_spec, 1)
    with pytest.raises(ValueError, match="expected images of shape"):
        net(Tensor(np.zeros((1, 3, 48, 48), np.float32)), h.mask_tensors(m))
    with pytest.raises(TypeError, match="ViTSpec"):
        LocalMIMViT(get_spec("swin_tiny_test"))


def test_mindspore_checkpoint_has_canonical_names(tiny_spec, tmp_path):
    """A plain ms.save_checkpoint of the Cell stores the canonical names, no renaming needed."""
    ms.set_seed(30)
    net = build_model(tiny_spec)
    path = str(tmp_path / "model.ckpt")
    ms.save_checkpoint(net, path)
    loaded = ms.load_checkpoint(path)
    state = net.export_state()
    assert set(loaded) == set(expected_shapes(tiny_spec)) == set(state)
    for k, v in loaded.items():
        assert np.array_equal(v.asnumpy(), state[k]), k
    ms.set_seed(31)
    other = build_model(tiny_spec)
    not_loaded, _ = ms.load_param_into_net(other, loaded, strict_load=True)
    assert not not_loaded
    assert np.array_equal(other.export_state()["blocks.2.mlp.fc2.weight"], state["blocks.2.mlp.fc2.weight"])
