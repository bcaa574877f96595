"""backends.{torch,mindspore}.inference.load_pretrained: any readable layout -> a ready model, the same
numbers in both backends."""
import argparse
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from localmim.backends.torch.inference import load_pretrained as torch_load  # noqa: E402
from localmim.core import keymaps as K  # noqa: E402
from localmim.core import state as S  # noqa: E402
from localmim.core.pos_embed import sincos_2d  # noqa: E402
from localmim.core.specs import TargetSpec, ViTSpec, get_spec  # noqa: E402
from localmim.core.state import StateError  # noqa: E402
from localmim.tools import convert as C  # noqa: E402

TINY = get_spec("vit_tiny_test")
SWIN = get_spec("swin_tiny_test")


def ms_load():
    pytest.importorskip("mindspore")
    from localmim.backends.mindspore.inference import load_pretrained
    return load_pretrained


def model_state(spec, seed):
    from localmim.backends.torch import build_model
    torch.manual_seed(seed)
    state = build_model(spec).export_state()
    rng = np.random.default_rng(seed)
    for k in state:  # non-trivial norms and biases
        if ("norm" in k or k.endswith(".bias")) and not k.startswith("hog_enc"):
            state[k] = (state[k] + 0.1 * rng.standard_normal(state[k].shape)).astype(np.float32)
    return state


def save_pth(path, state, **extra):
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, **extra}, str(path))
    return str(path)


def test_torch_loader_reads_an_mae_encoder_and_keeps_fresh_decoders(tmp_path):
    state = model_state(TINY, 1)
    path = save_pth(tmp_path / "mae.pth", K.to_timm(state, TINY), args=argparse.Namespace(norm_pix_loss=True))
    model = torch_load(path)
    assert model.spec == TINY and not model.training
    got = model.export_state()
    for k in S.vit_encoder_shapes(TINY, branch_norms=False):
        np.testing.assert_array_equal(got[k], state[k])
    np.testing.assert_array_equal(got["norm.3.weight"], state["norm.3.weight"])  # MAE's final norm
    np.testing.assert_array_equal(got["norm.0.weight"], np.ones(32, np.float32))  # fresh LayerNorm
    assert set(got) == set(S.vit_canonical_shapes(TINY))
    imgs = torch.from_numpy(C._check_images(None, TINY))
    from localmim.core.masking import mask_rng, vit_mask
    masks = {k: torch.from_numpy(v) for k, v in vit_mask(mask_rng(0, 0, 0, 0), 2, 16, 0.75).as_dict().items()}
    with torch.no_grad():
        loss, _ = model(imgs, masks)
    assert np.isfinite(float(loss))


def test_loader_is_strict_about_shapes_and_names(tmp_path):
    state = model_state(TINY, 2)
    wrong = dict(state, **{"decoder.1.mask_token": np.zeros((1, 1, 17), np.float32)})
    with pytest.raises(StateError, match=r"decoder.1.mask_token expected \(1, 1, 16\) found \(1, 1, 17\)"):
        torch_load(save_pth(tmp_path / "wrong.pth", wrong))
    extra = dict(state, **{"decoder.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(StateError, match=r"unexpected key\(s\): decoder.0.extra.weight"):
        torch_load(save_pth(tmp_path / "extra.pth", extra))
    with pytest.raises(C.ConvertError, match="unknown architecture option"):
        torch_load(save_pth(tmp_path / "ok.pth", state), heads=3)


def test_unregistered_vit_needs_heads_then_loads_in_both_backends(tmp_path):
    odd = ViTSpec("odd", patch_size=16, embed_dim=48, depth=8, num_heads=4, img_size=64, decoder_dim=24,
                  decoder_heads=3, target=TargetSpec(kind="hog", nbins=9))
    state = model_state(odd, 3)
    path = save_pth(tmp_path / "odd.pth", state)
    with pytest.raises(StateError, match="cannot tell num_heads, decoder_heads"):
        torch_load(path)
    model = torch_load(path, num_heads=4, decoder_heads=3)
    assert model.spec == odd.with_(name="vit_p16_d48_depth8")
    ms_model = ms_load()(path, num_heads=4, decoder_heads=3)
    ours, theirs = model.export_state(), ms_model.export_state()
    for k in state:
        np.testing.assert_array_equal(ours[k], state[k])
        np.testing.assert_array_equal(theirs[k], state[k])


def test_both_backends_resample_to_the_same_numbers(tmp_path):
    """img_size / window_size resample in the core: the two backends load identical tables."""
    vit = model_state(TINY, 4)
    vit_path = save_pth(tmp_path / "vit.pth", vit)
    swin = model_state(SWIN, 5)
    swin_path = save_pth(tmp_path / "official_swin.pth", K.to_official_swin(swin, SWIN), args=argparse.Namespace())
    load_ms = ms_load()
    for path, kw in ((vit_path, {"img_size": 48}), (swin_path, {"window_size": 8, "img_size": 128})):
        a, b = torch_load(path, **kw).export_state(), load_ms(path, **kw).export_state()
        resampled = [k for k in a if "pos_embed" in k or "relative_position_bias_table" in k]
        assert resampled
        for k in resampled:
            np.testing.assert_array_equal(a[k], b[k])
    big = torch_load(vit_path, img_size=48)
    assert big.spec.img_size == 48
    np.testing.assert_array_equal(big.export_state()["pos_embed"][0], sincos_2d(32, 6, cls_token=True))
    wide = torch_load(swin_path, window_size=8, img_size=128)
    assert (wide.spec.window_size, wide.spec.img_size) == (8, 128)
    # merges came back in Swin order: equal to our state, not the official file's
    np.testing.assert_array_equal(wide.export_state()["encoder.layers.1.downsample.reduction.weight"],
                                  swin["encoder.layers.1.downsample.reduction.weight"])


def test_features_agree_across_backends_after_loading_a_swin_encoder(tmp_path):
    swin = model_state(SWIN, 6)
    enc, _ = K.convert_state(swin, "localmim-swin", "swin-encoder", SWIN)
    path = str(tmp_path / "swin_enc.safetensors")
    C.write_state(path, enc, "safetensors", {})
    t_model, m_model = torch_load(path), ms_load()(path)
    assert t_model.spec == SWIN == m_model.spec
    from localmim.core.masking import mask_rng, swin_cell_mask
    from localmim.core.swin_plan import build_swin_plan
    plan = build_swin_plan(SWIN, swin_cell_mask(mask_rng(0, 0, 0, 0), SWIN.mask_grid, 0.75)).to_arrays()
    imgs = C._check_images(None, SWIN)
    import mindspore as ms
    with torch.no_grad():
        ours = t_model.forward_encoder(torch.from_numpy(imgs), {k: torch.from_numpy(v) for k, v in plan.items()})[-1]
    theirs = m_model.forward_encoder(ms.Tensor(imgs), {k: ms.Tensor(v) for k, v in plan.items()})[-1]
    np.testing.assert_allclose(theirs.asnumpy(), ours.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(t_model.export_state()["encoder.norm.3.bias"], swin["encoder.norm.3.bias"])


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_loader_never_runs_pickled_code(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "args": _Evil(str(tmp_path / "pwned"))}, path)
    with pytest.raises(C.ConvertError, match="refusing to load it"):
        torch_load(path)
    assert not (tmp_path / "pwned").exists()
