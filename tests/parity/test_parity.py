"""PyTorch vs MindSpore parity (the contract in DESIGN.md), float32 on CPU.

One parity run per model family and target compares encoder taps, predictions, targets, losses,
gradients and parameters after 5 AdamW steps from the same canonical weights, images and core
masks (ViT) or grouping plans (Swin); the demo model's 50-step loss curve is compared once.
"""
import pytest

pytest.importorskip("torch")
pytest.importorskip("mindspore")

from localmim.core.specs import TargetSpec, get_spec  # noqa: E402
from localmim.tools import parity  # noqa: E402

HOG9 = TargetSpec(kind="hog", nbins=9, hog_bias=False)
HOG18_BIAS = TargetSpec(kind="hog", nbins=18, hog_bias=True)
PIXEL = TargetSpec(kind="pixel", norm_pix=True)
CASES = {
    "vit-hog": ("vit_tiny_test", HOG9),
    "vit-hog-bias": ("vit_tiny_test", HOG18_BIAS),
    "vit-pixel": ("vit_tiny_test", PIXEL),
    "swin-pixel": ("swin_tiny_test", PIXEL),
    "swin-hog-bias": ("swin_tiny_test", HOG18_BIAS),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def parity_rows(request):
    model, target = CASES[request.param]
    spec = get_spec(model, target=target)
    return request.param, parity.run_parity(spec, batch=2, seed=3, adam_steps=5)


def test_every_quantity_within_its_bound(parity_rows):
    name, rows = parity_rows
    report = parity.format_rows(name, rows)
    assert all(r.ok for r in rows), report
    quantities = {r.quantity for r in rows}
    assert {"encoder taps", "predictions", "loss", "gradients", "parameters after 5 AdamW steps"} <= quantities


def test_hog_bins_flip_rarely(parity_rows):
    name, rows = parity_rows
    if "hog" not in name:
        pytest.skip("pixel targets have no bins")
    share = next(r for r in rows if r.quantity.startswith("HOG cells"))
    assert share.worst <= parity.HOG_FLIP_TOL


def test_demo_model_loss_curves_agree_for_50_steps():
    spec = get_spec("vit_demo")
    state = parity.initial_state(spec)
    batches = [parity.make_inputs(spec, 2, 7, step) for step in range(50)]
    _, _, curve_err, (curve_t, curve_m) = parity.compare_training(
        spec, state, batches, lr=5e-4, warmup=5, epochs=50, steps_per_epoch=1, compile=True)
    assert curve_err <= parity.CURVE_TOL, (curve_t, curve_m)
    # The curve is a real training run: the loss moves.
    assert abs(curve_t[-1] - curve_t[0]) > 1e-3


def test_relative_error_is_scale_free_and_catches_differences():
    import numpy as np
    a = np.array([1.0, 2.0, 4.0])
    assert parity.relative_error(a, a) == 0.0
    assert parity.relative_error(a * 1e-6 * (1 + 1e-3), a * 1e-6) == pytest.approx(1e-3, rel=1e-6)
    rest, key = parity.split_key_bias({"blocks.0.attn.qkv.bias": np.arange(6.0), "x": a})
    np.testing.assert_array_equal(rest["blocks.0.attn.qkv.bias"], [0, 1, 4, 5])
    np.testing.assert_array_equal(key["blocks.0.attn.qkv.bias"], [2, 3])
