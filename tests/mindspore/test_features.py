"""backends/mindspore/features.py: the unmasked encoder against the model's own masked forward with
nothing hidden, map shapes, the pyramid, and the torch-semantics BatchNorm against numpy."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import Tensor  # noqa: E402

from localmim.backends.mindspore import build_model  # noqa: E402
from localmim.backends.mindspore.features import BatchNorm, Encoder, ViTBackbone, load_encoder  # noqa: E402
from localmim.backends.mindspore.swin import plan_tensors  # noqa: E402
from localmim.core.features import feature_map_shapes, full_vit_ids, pyramid_shapes, unmasked_swin_plan  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402


def _images(size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - x), x * y * 2 - 1])[None]
    return (base + rng.normal(0.0, 0.5, (batch, 3, size, size))).astype(np.float32)


def _model(name, seed=0, **kw):
    ms.set_seed(seed)
    model = build_model(get_spec(name, **kw))
    state = model.export_state()
    rng = np.random.default_rng(seed)
    for k in state:  # non-trivial norms and biases
        if ("norm" in k or k.endswith(".bias")) and not k.startswith("hog_enc"):
            state[k] = (state[k] + 0.1 * rng.standard_normal(state[k].shape)).astype(np.float32)
    model.import_state(state)
    model.set_train(False)
    return model


def test_vit_features_are_the_normed_taps_of_an_all_visible_forward():
    model = _model("vit_tiny_test", 1)
    imgs = _images(32)
    latents = model.forward_encoder(Tensor(imgs), {"ids_keep": Tensor(full_vit_ids(2, 16))})  # branch-normed
    last = latents[-1].asnumpy()
    np.testing.assert_allclose(Encoder(model, "avg").encode(imgs), last[:, 1:].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(Encoder(model, "cls").encode(imgs), last[:, 0], rtol=1e-5, atol=1e-6)
    maps = Encoder(model).feature_maps(imgs)
    assert [m.shape for m in maps] == feature_map_shapes(model.spec, 2)
    for k, (m, z) in enumerate(zip(maps, latents)):  # norm.k of the raw map's tokens is the latent
        tokens = Tensor(m.reshape(2, 32, 16).transpose(0, 2, 1).copy())
        np.testing.assert_allclose(model.norm[k](tokens).asnumpy(), z.asnumpy()[:, 1:], rtol=1e-4, atol=1e-5)


def test_swin_embedding_is_the_mean_of_the_last_latent_and_maps_have_stage_shapes():
    model = _model("swin_tiny_test", 2)
    imgs = _images(64, batch=1)
    plan = unmasked_swin_plan(model.spec)
    last = model.forward_encoder(Tensor(imgs), plan_tensors(plan))[-1].asnumpy()  # stage 3, normed
    enc = Encoder(model)
    np.testing.assert_allclose(enc.encode(imgs), last.mean(1), rtol=1e-5, atol=1e-6)
    maps = enc.feature_maps(imgs)
    assert [m.shape for m in maps] == feature_map_shapes(model.spec, 1)
    # the last stage has one token per mask cell, so cell-major order is raster order already
    np.testing.assert_allclose(model.encoder.norm[3](Tensor(maps[3].reshape(1, 128, 16).transpose(0, 2, 1).copy()))
                               .asnumpy(), last, rtol=1e-4, atol=1e-5)


def test_maps_at_another_input_size_and_the_pyramid(tmp_path):
    model = _model("vit_tiny_test", 3, img_size=64)
    backbone = ViTBackbone(model)
    backbone.set_train(False)
    out = backbone(Tensor(_images(64)))
    assert [tuple(o.shape) for o in out] == pyramid_shapes(model.spec, 2)
    maps = Encoder(model).feature_maps(_images(64))
    np.testing.assert_allclose(out[2].asnumpy(), maps[2], rtol=1e-6, atol=1e-6)  # fpn3: identity
    pooled = maps[3].reshape(2, 32, 4, 2, 4, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(out[3].asnumpy(), pooled, rtol=1e-5, atol=1e-6)  # fpn4: 2x2 average
    swin = _model("swin_tiny_test", 4, img_size=96)  # 48 tokens a side: windows of 4, a 6x6 mask grid
    assert [m.shape for m in Encoder(swin).feature_maps(_images(96, 1))] == feature_map_shapes(swin.spec, 1)


def test_batchnorm_follows_torch_semantics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype(np.float32) * 3 + 1
    bn = BatchNorm(4, eps=1e-6, momentum=0.1, affine=False)
    bn.set_train(True)
    y = bn(Tensor(x)).asnumpy()
    mean, var = x.mean(0), x.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean.asnumpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.asnumpy(), 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-5)
    bn.set_train(False)
    y = bn(Tensor(x)).asnumpy()
    np.testing.assert_allclose(y, (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * x.var(0, ddof=1) + 1e-6), rtol=1e-5)
    assert not any(p.requires_grad for p in bn.get_parameters())


def test_load_encoder_and_errors(tmp_path):
    torch = pytest.importorskip("torch")
    from localmim.backends.torch import build_model as torch_build
    torch.manual_seed(0)
    path = tmp_path / "ours.pth"
    torch.save({"model": torch_build(get_spec("vit_tiny_test")).state_dict()}, str(path))
    enc = load_encoder(str(path), img_size=64)
    assert enc.spec.img_size == 64 and enc.encode(_images(64, 1)).shape == (1, 32)
    with pytest.raises(ValueError, match="no cls token"):
        Encoder(_model("swin_tiny_test"), "cls")
