"""backends/torch/features.py: the unmasked encoder's embeddings and feature maps against timm's
plain ViT / Swin on the same weights, and the map shapes of every registered model."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from localmim.backends.torch import build_model  # noqa: E402
from localmim.backends.torch.features import Encoder, ViTBackbone, load_encoder  # noqa: E402
from localmim.core import keymaps as K  # noqa: E402
from localmim.core.features import (feature_map_shapes, feature_strides, pyramid_shapes,  # noqa: E402
                                    swin_raster_orders, unmasked_swin_plan)
from localmim.core.specs import SWIN_SPECS, VIT_SPECS, get_spec  # noqa: E402
from localmim.core.swin_plan import build_swin_plan  # noqa: E402


def perturbed_state(state, seed):
    """Non-trivial norms and biases (fresh ones are 1 and 0), HOG filters untouched."""
    rng = np.random.default_rng(seed)
    return {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            if ("norm" in k or k.endswith(".bias")) and not k.startswith("hog_enc") else v for k, v in state.items()}


def _model(spec, seed=0):
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    model.import_state(perturbed_state(model.export_state(), seed))
    return model


def _images(size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - x), x * y * 2 - 1])[None]
    return (base + rng.normal(0.0, 0.5, (batch, 3, size, size))).astype(np.float32)


def test_vit_embeddings_and_maps_match_timm_vit():
    spec = get_spec("vit_tiny_test")  # taps 0..3: the last tap is the last block, as in timm
    model = _model(spec, 1)
    net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=4, num_heads=2).eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in K.to_timm(model.export_state(), spec).items()})
    imgs = _images(32)
    x = torch.from_numpy(imgs)
    with torch.no_grad():
        tokens = net.forward_features(x)                  # final norm on every token
        t = net._pos_embed(net.patch_embed(x))
        taps = []
        for blk in net.blocks:
            t = blk(t)
            taps.append(t[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4).numpy())
    np.testing.assert_allclose(Encoder(model, "avg").encode(imgs), tokens[:, 1:].mean(1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Encoder(model, "cls").encode(imgs), tokens[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    for ours, ref in zip(Encoder(model).feature_maps(imgs), taps):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_swin_embeddings_and_stage_maps_match_timm_swin():
    spec = get_spec("swin_tiny_test")
    model = _model(spec, 2)
    kw = K.timm_swin_kwargs(spec)
    net = timm.create_model(kw.pop("model_name"), norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                            **kw).eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in K.to_timm_swin(model.export_state(), spec).items()})
    imgs = _images(64)
    x = torch.from_numpy(imgs)
    with torch.no_grad():
        emb = net.forward_features(x).mean(dim=(1, 2)).numpy()   # NHWC after the final norm
        t, stages = net.patch_embed(x), []
        for stage in net.layers:  # timm merges at the start of a stage: its output is ours before merging
            t = stage(t)
            stages.append(t.permute(0, 3, 1, 2).numpy())
    enc = Encoder(model)
    np.testing.assert_allclose(enc.encode(imgs), emb, rtol=1e-4, atol=1e-5)
    for ours, ref in zip(enc.feature_maps(imgs), stages):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_tensor_in_tensor_out_and_mode_kept():
    model = _model(get_spec("vit_tiny_test"), 3).train()
    out = Encoder(model).encode(torch.from_numpy(_images(32)))
    assert torch.is_tensor(out) and out.shape == (2, 32) and not out.requires_grad and model.training


def _meta_model(spec):
    with torch.device("meta"):
        model = build_model(spec)
    return model.to("meta")  # the sin-cos tables are made from numpy on the CPU


@pytest.mark.parametrize("name", sorted(VIT_SPECS) + sorted(SWIN_SPECS))
def test_map_shapes_of_every_registered_model_at_two_sizes(name):
    """Shapes on PyTorch's meta device: the real forward code, no arithmetic (ViT-L and Swin-L in seconds)."""
    other = 384 if name in VIT_SPECS else 256  # 256: Swin windows of 7 do not divide 64 / 32 / 16
    for size in (224, other):
        spec = get_spec(name, img_size=size)
        model = _meta_model(spec)
        x = torch.empty(1, 3, size, size, device="meta")
        maps = Encoder(model).feature_maps(x)
        assert [tuple(m.shape) for m in maps] == feature_map_shapes(spec, 1)
        assert tuple(Encoder(model).encode(x).shape) == (1, maps[-1].shape[1])
        if spec.family == "vit":
            with torch.device("meta"):
                backbone = ViTBackbone(model)
            pyramid = backbone(x)
            assert [tuple(p.shape) for p in pyramid] == pyramid_shapes(spec, 1)
            assert [size // p.shape[-1] for p in pyramid] == feature_strides(spec)
        else:
            assert [size // m.shape[-1] for m in maps] == feature_strides(spec)
            assert feature_strides(spec) == [spec.patch_size * 2 ** i for i in range(4)]


def test_vit_b_shapes_are_the_reference_segmentation_layout():
    spec = get_spec("vit_base_patch16")
    assert feature_map_shapes(spec, 2) == [(2, 768, 14, 14)] * 4
    assert pyramid_shapes(spec, 2) == [(2, 768, 56, 56), (2, 768, 28, 28), (2, 768, 14, 14), (2, 768, 7, 7)]
    assert feature_strides(spec) == [4, 8, 16, 32]
    assert feature_map_shapes(get_spec("swin_base_patch4_win7"), 1) == [
        (1, 128, 56, 56), (1, 256, 28, 28), (1, 512, 14, 14), (1, 1024, 7, 7)]


def test_pyramid_rescales_each_map_and_trains():
    spec = get_spec("vit_tiny_test", img_size=64)
    backbone = ViTBackbone(_model(spec, 4)).train()
    out = backbone(torch.from_numpy(_images(64)))
    assert [tuple(o.shape) for o in out] == pyramid_shapes(spec, 2)
    sum(o.square().mean() for o in out).backward()
    assert backbone.pyramid.fpn1[0].weight.grad is not None and backbone.model.blocks[0].attn.qkv.weight.grad is not None
    with torch.no_grad():  # fpn3 is the identity, fpn4 a 2x2 average of the last tap's map
        maps = Encoder(backbone.model).feature_maps(torch.from_numpy(_images(64)))
    np.testing.assert_allclose(out[2].detach().numpy(), maps[2].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[3].detach().numpy(), torch.nn.functional.avg_pool2d(maps[3], 2).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_raster_orders_need_a_fully_visible_plan():
    spec = get_spec("swin_tiny_test")
    orders = swin_raster_orders(unmasked_swin_plan(spec))
    assert [len(o) for o in orders] == [spec.stage_resolution(i) ** 2 for i in range(4)]
    masked = np.zeros(spec.mask_grid ** 2, bool)
    masked[0] = True
    with pytest.raises(ValueError, match="not fully visible"):
        swin_raster_orders(build_swin_plan(spec, masked))


def test_load_encoder_reads_a_checkpoint_at_another_size(tmp_path):
    spec = get_spec("vit_tiny_test")
    model = _model(spec, 5)
    path = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict()}, str(path))
    enc = load_encoder(str(path), img_size=64)
    assert enc.spec.img_size == 64 and enc.encode(_images(64, 1)).shape == (1, 32)
    with pytest.raises(ValueError, match="pool"):
        Encoder(model, "max")
    with pytest.raises(ValueError, match="no cls token"):
        Encoder(_model(get_spec("swin_tiny_test")), "cls")
