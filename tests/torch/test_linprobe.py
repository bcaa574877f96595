"""backends/torch/linprobe.py: LARS against hand-derived steps, the MAE head, a frozen encoder that
stays bit-identical, and a probe run on real handwritten digits through the shared loop."""
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from localmim.backends.torch import build_model  # noqa: E402
from localmim.backends.torch.features import Encoder  # noqa: E402
from localmim.backends.torch.linprobe import LARS, ProbeStep, build_probe, run_linprobe  # noqa: E402
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
    w = torch.nn.Parameter(torch.tensor(W0))
    b = torch.nn.Parameter(torch.tensor(B0))
    opt = LARS([w, b], lr=0.5, weight_decay=wd, momentum=0.9, trust_coefficient=0.001)
    for _ in range(2):
        w.grad, b.grad = torch.tensor(GW), torch.tensor(GB)
        opt.step()
    ref_w, ref_b = hand_lars(2, 0.5, wd, 0.9, 0.001)
    np.testing.assert_allclose(w.detach().numpy(), ref_w, rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), ref_b, rtol=1e-6)


def test_lars_first_step_by_hand():
    # wd 0: d = g, q = 0.001 * |W| / |G| = 0.001 * sqrt(30) / sqrt(0.05); mu = q g; W -= 0.5 mu; b -= 0.5 g
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor(B0, dtype=torch.float64))
    opt = LARS([w, b], lr=0.5)
    w.grad, b.grad = torch.tensor(GW, dtype=torch.float64), torch.tensor(GB, dtype=torch.float64)
    opt.step()
    q = 0.001 * math.sqrt(30.0) / math.sqrt(0.1 ** 2 + 0.2 ** 2)
    assert w[0, 0].item() == pytest.approx(1.0 - 0.5 * q * 0.1, rel=1e-6)
    assert w[1, 1].item() == pytest.approx(4.0 + 0.5 * q * 0.2, rel=1e-6)
    assert w[0, 1].item() == 2.0 and b.tolist() == pytest.approx([0.5 - 0.15, -1.0 - 0.2])


def test_lars_leaves_zero_norms_unscaled():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=1.0, momentum=0.0)
    w.grad = torch.tensor(GW)
    opt.step()  # |w| = 0: q = 1, a plain SGD step
    np.testing.assert_allclose(w.detach().numpy(), -GW)


def test_probe_head_is_maes():
    probe = build_probe(512, 10, seed=0)
    bn, fc = probe.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    w = fc.weight.detach()
    assert abs(w.std().item() - 0.01) < 0.001 and float(w.abs().max()) < 0.06
    assert torch.all(fc.bias == 0)
    assert set(probe.export_state()) == {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real handwritten digits 0-2, 12 of each (train 30, val 6)."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(root, classes=3, per_class=12)
    return str(root)


def _encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder(build_model(get_spec("vit_tiny_test")).eval())


def test_frozen_encoder_is_bit_identical_after_training(digits):
    from localmim.backends import labelled
    encoder = _encoder(1)
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    probe = build_probe(32, 3)
    head_before = probe.export_state()
    step = ProbeStep(encoder, probe, LARS(probe.parameters(), lr=5.0), accum=2)
    train, _ = labelled.train_val_splits(digits)
    batches = labelled.eval_batches(train, labelled.EvalTransform(32), 5)
    for i, (images, labels) in enumerate(batches):
        step.micro({"images": images, "labels": labels}, sync=i % 2 == 1)
        if i % 2 == 1:
            step.apply()
    for k, v in encoder.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad and p.grad is None for p in encoder.model.parameters())
    after = probe.export_state()
    assert not np.array_equal(after["head.1.weight"], head_before["head.1.weight"])
    assert not np.array_equal(after["head.0.running_mean"], head_before["head.0.running_mean"])


def test_micro_batches_sum_to_the_full_batch_gradient():
    encoder = _encoder(2)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    grads = []
    for accum in (1, 2):
        probe = build_probe(32, 3, seed=3).eval()  # eval: fixed BN statistics, so the halves are exact
        step = ProbeStep(encoder, probe, LARS(probe.parameters()), accum=accum)
        probe.eval()
        for half in np.split(np.arange(8), accum):
            step.micro({"images": images[half], "labels": labels[half]})
        grads.append(probe.head[1].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def _cfg(digits, out, **optim):
    return config_from_dict({
        "model": {"checkpoint": os.path.join(out, "..", "tiny.pth")},
        "data": {"path": digits, "batch_size": 10, "num_workers": 0, "crop_scale": [0.5, 1.0]},
        "optim": {"epochs": 4, "warmup_epochs": 1, "blr": 25.6, **optim},
        "train": {"device": "cpu", "output_dir": out, "log_every": 1, "save_every_epochs": 2, "progress": False},
        "eval": {"every_epochs": 2}}, kind="linprobe")


def test_run_logs_evaluates_checkpoints_the_head_and_resumes(digits, tmp_path):
    torch.manual_seed(0)
    torch.save({"model": build_model(get_spec("vit_tiny_test")).state_dict()}, str(tmp_path / "tiny.pth"))
    out = str(tmp_path / "probe")
    cfg = _cfg(digits, out)
    cfg.train.max_steps = 6
    first = run_linprobe(cfg)
    assert first["step"] == 6 and first["classes"] == ["0", "1", "2"]
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    evals = [r for r in rows if "val_acc1" in r]
    assert [r["step"] for r in evals] == [6] and {"val_acc5", "val_loss"} <= set(evals[0])  # end of epoch 2
    payload = torch.load(first["checkpoint"], weights_only=True)
    assert set(payload["model"]) == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked",
                                     "head.1.weight", "head.1.bias"}
    assert payload["config"]["model"]["checkpoint"].endswith("tiny.pth")
    cfg.train.max_steps = None  # resume to the end (4 epochs x 3 steps)
    second = run_linprobe(cfg)
    assert second["step"] == 12 and 0.0 <= second["val_acc1"] <= 100.0
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "val_acc1" in r] == [6, 12]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(25.6 * 10 / 256)  # warmup to blr x batch / 256


def test_random_init_baseline_and_cls_pool(digits, tmp_path):
    torch.manual_seed(0)
    torch.save({"model": build_model(get_spec("vit_tiny_test")).state_dict()}, str(tmp_path / "tiny.pth"))
    cfg = _cfg(digits, str(tmp_path / "probe"), epochs=1, warmup_epochs=0)
    cfg.model.random_init, cfg.model.pool = True, "cls"
    result = run_linprobe(cfg)
    assert result["step"] == 3 and math.isfinite(result["val_loss"])
