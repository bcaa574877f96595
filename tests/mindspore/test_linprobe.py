"""backends/mindspore/linprobe.py: LARS against hand-derived steps, the MAE head, a frozen encoder
that stays bit-identical, and a probe run on real handwritten digits through the shared loop."""
import json
import math
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
pytest.importorskip("sklearn")

from mindspore import Parameter, Tensor  # noqa: E402

from localmim.backends.mindspore import build_model  # noqa: E402
from localmim.backends.mindspore.features import Encoder  # noqa: E402
from localmim.backends.mindspore.linprobe import LARS, ProbeStep, build_probe, run_linprobe  # noqa: E402
from localmim.core.config import config_from_dict  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402
from localmim.tools.datasets import write_digits  # noqa: E402

W0 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
B0 = np.array([0.5, -1.0], np.float32)
GW = np.array([[0.1, 0.0], [0.0, -0.2]], np.float32)
GB = np.array([0.3, 0.4], np.float32)


def hand_lars(steps, lr, wd, momentum, trust):
    """MAE's LARS written out for a 2x2 weight (decayed, trust-scaled) and a bias (neither)."""
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    mu_w, mu_b = np.zeros_like(w), np.zeros_like(b)
    for _ in range(steps):
        d = GW + wd * w
        q = trust * math.sqrt((w * w).sum()) / math.sqrt((d * d).sum())
        mu_w = momentum * mu_w + q * d
        mu_b = momentum * mu_b + GB
        w, b = w - lr * mu_w, b - lr * mu_b
    return w, b


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lars_matches_two_hand_derived_steps(wd):
    w, b = Parameter(Tensor(W0), name="w"), Parameter(Tensor(B0), name="b")
    opt = LARS([w, b], lr=0.5, weight_decay=wd, momentum=0.9, trust_coefficient=0.001)
    for _ in range(2):
        opt([Tensor(GW), Tensor(GB)])
    ref_w, ref_b = hand_lars(2, 0.5, wd, 0.9, 0.001)
    np.testing.assert_allclose(w.asnumpy(), ref_w, rtol=1e-6)
    np.testing.assert_allclose(b.asnumpy(), ref_b, rtol=1e-6)
    assert sorted(opt.state(["w", "b"])) == ["mu.b", "mu.w"]


def test_lars_leaves_zero_norms_unscaled():
    w = Parameter(Tensor(np.zeros((2, 2), np.float32)), name="w")
    LARS([w], lr=1.0, momentum=0.0)([Tensor(GW)])
    np.testing.assert_allclose(w.asnumpy(), -GW)


def test_probe_head_is_maes():
    probe = build_probe(512, 10, seed=0)
    state = probe.export_state()
    assert set(state) == {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"}
    assert abs(state["head.1.weight"].std() - 0.01) < 0.001 and np.all(state["head.1.bias"] == 0)
    assert probe.head[0].eps == 1e-6 and not probe.head[0].affine


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real handwritten digits 0-2, 12 of each (train 30, val 6)."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(root, classes=3, per_class=12)
    return str(root)


def test_frozen_encoder_is_bit_identical_after_training(digits):
    from localmim.backends import labelled
    ms.set_seed(1)
    model = build_model(get_spec("vit_tiny_test"))
    model.set_train(False)
    encoder = Encoder(model)
    before = model.export_state()
    probe = build_probe(32, 3)
    head_before = probe.export_state()
    params = [p for _, p in probe.named_state() if p.requires_grad]
    step = ProbeStep(encoder, probe, LARS(params, lr=5.0), accum=2)
    train, _ = labelled.train_val_splits(digits)
    for i, (images, labels) in enumerate(labelled.eval_batches(train, labelled.EvalTransform(32), 5)):
        step.micro({"images": images, "labels": labels})
        if i % 2 == 1:
            step.apply()
    after = model.export_state()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    head = probe.export_state()
    assert not np.array_equal(head["head.1.weight"], head_before["head.1.weight"])
    assert not np.array_equal(head["head.0.running_mean"], head_before["head.0.running_mean"])


def test_run_logs_evaluates_checkpoints_the_head_and_resumes(digits, tmp_path):
    torch = pytest.importorskip("torch")
    from localmim.backends.mindspore.checkpoint import load_checkpoint
    from localmim.backends.torch import build_model as torch_build
    torch.manual_seed(0)
    torch.save({"model": torch_build(get_spec("vit_tiny_test")).state_dict()}, str(tmp_path / "tiny.pth"))
    out = str(tmp_path / "probe")
    cfg = config_from_dict({
        "model": {"checkpoint": str(tmp_path / "tiny.pth")},
        "data": {"path": digits, "batch_size": 10, "num_workers": 0, "crop_scale": [0.5, 1.0]},
        "optim": {"epochs": 4, "warmup_epochs": 1, "blr": 25.6},
        "train": {"device": "cpu", "output_dir": out, "log_every": 1, "save_every_epochs": 2, "progress": False,
                  "max_steps": 6},
        "eval": {"every_epochs": 2}}, kind="linprobe")
    first = run_linprobe(cfg)
    assert first["step"] == 6 and first["checkpoint"].endswith(".ckpt")
    payload = load_checkpoint(first["checkpoint"])
    assert set(payload["model"]) == {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"}
    assert set(payload["optimizer"]) == {"mu.head.1.weight", "mu.head.1.bias"}
    cfg.train.max_steps = None
    second = run_linprobe(cfg)
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert second["step"] == 12 and [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "val_acc1" in r] == [6, 12] and math.isfinite(second["val_loss"])
