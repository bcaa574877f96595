"""Fine-tuning parity (docs/method.md#parity-contract): the same classifier weights, images and
soft targets, drop path off, give the same logits and loss (1e-5), gradients (1e-4) and parameters
after 5 AdamW steps with layer-wise lr decay (1e-4) in both backends, each through its own step
object, for the ViT and the Swin classifier."""
import pytest

pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from localmim.tools.parity import finetune_rows  # noqa: E402


@pytest.mark.parametrize("model,pool", [("vit_tiny_test", "avg"), ("vit_tiny_test", "token"),
                                        ("swin_tiny_test", "avg")])
def test_finetune_steps_agree(photo_paths, model, pool):
    rows = finetune_rows(model, pool=pool, photos=photo_paths)
    assert {r.quantity for r in rows} >= {"logits", "loss", "gradients (first batch)",
                                          "parameters after 5 AdamW steps (layer decay 0.75)"}
    bad = [r for r in rows if not r.ok]
    assert not bad, bad


def test_finetune_rows_catch_a_different_head():
    rows = finetune_rows("vit_tiny_test", perturb_head=True)
    assert not next(r for r in rows if r.quantity == "logits").ok


@pytest.fixture(scope="module")
def photo_paths(sample_dir):
    import os
    from localmim.tools import parity
    return parity.bundled_photo_paths(os.path.dirname(sample_dir))
