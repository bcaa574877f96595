"""The shared training loop (backends/loop.py) driving a numpy step object: the lr of every
optimizer step, accumulation and the DDP sync flag, log and checkpoint cadence, the host syncs,
exact resume and the non-finite stop. No framework: the step object is a least-squares fit."""
import json
import os
import pickle

import numpy as np
import pytest

from localmim.backends import loop, runs
from localmim.backends.images import ShardedBatchSampler
from localmim.core import schedule
from localmim.core.config import PretrainConfig
from localmim.core.files import write_atomically

NUM_SAMPLES, BATCH = 12, 2   # 6 micro-batches an epoch


class NumpyCheckpoints:
    """A backend checkpoint module for the numpy step (pickle: these files never leave the test)."""
    CHECKPOINT_KEYS = runs.CHECKPOINT_KEYS
    _files = runs.CheckpointFiles(".npk")
    checkpoint_name, latest_checkpoint, prune_checkpoints = _files.name, _files.latest, _files.prune

    @staticmethod
    def save_checkpoint(path, payload):
        def write(tmp):
            with open(tmp, "wb") as f:
                pickle.dump(payload, f)
        return write_atomically(path, write)

    @staticmethod
    def load_checkpoint(path):
        with open(path, "rb") as f:
            return pickle.load(f)

    check_model_state = staticmethod(runs.check_model_state)


class LeastSquaresStep:
    """SGD on ||x w - y||^2 / 2 per micro-batch; records every call the loop makes."""

    def __init__(self, poison_at_micro=None):
        self.w = np.zeros(3)
        self.grad = np.zeros(3)
        self.row = None
        self.lr = None
        self.calls = []
        self.rows = []
        self.poison_at_micro = poison_at_micro
        self.micros = 0

    def set_lr(self, lr):
        self.lr = lr
        self.calls.append(("set_lr", lr))

    def micro(self, batch, sync=True):
        x, y = batch
        err = x @ self.w - y
        self.grad += x.T @ err / len(y)
        loss = 0.5 * float(np.mean(err ** 2))
        if self.poison_at_micro is not None and self.micros == self.poison_at_micro:
            loss = float("nan")
        row = np.array([loss, loss, 0.0, 0.0, 0.0]) / 2  # accum 2 in these tests
        self.row = row if self.row is None else self.row + row
        self.micros += 1
        self.calls.append(("micro", sync))

    def apply(self):
        self.w = self.w - self.lr * self.grad
        self.grad[:] = 0.0
        row, self.row = self.row, None
        self.calls.append(("apply",))
        self.rows.append(row)
        return row

    def gather(self, rows):
        self.calls.append(("gather", len(rows)))
        return np.stack(rows)

    def states(self):
        return {"w": self.w.copy()}, {"note": "sgd has no state"}, None

    def load_states(self, payload, path):
        self.w = payload["model"]["w"].copy()

    def model_shapes(self):
        return {"w": (3,)}


class Loader:
    """Batches (x, y) of a fixed regression problem in the sampler's order."""

    def __init__(self, sampler):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((NUM_SAMPLES, 3))
        self.y = self.x @ np.array([1.0, -2.0, 0.5])
        self.sampler = sampler
        self.seen = []

    def __iter__(self):
        for keys in self.sampler:
            self.seen.append((keys[0][0], keys[0][1]))   # (epoch, batch index)
            idx = [k[2] for k in keys]
            yield self.x[idx], self.y[idx]


def _cfg(out, steps, log_every=1, save_every_steps=None):
    cfg = PretrainConfig()
    cfg.data.batch_size = BATCH
    cfg.optim.accum_iter = 2
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.epochs, cfg.optim.warmup_epochs = 0.1, 0.01, 4, 1
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.log_every = str(out), steps, log_every
    cfg.train.save_every_steps, cfg.train.save_every_epochs, cfg.train.progress = save_every_steps, 0, False
    return cfg


def _train(cfg, step_obj, **kw):
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    sampler = ShardedBatchSampler(NUM_SAMPLES, BATCH, seed=0)
    loader = Loader(sampler)
    return loop.train(cfg, step_obj, loader, sampler, NumpyCheckpoints, **kw), loader


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lr_accumulation_sync_and_log_cadence(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "CHECK_EVERY_STEP_ON_CPU", False)
    stepper = LeastSquaresStep()
    result, loader = _train(_cfg(tmp_path, steps=4, log_every=2), stepper, on_cpu=True)
    # 3 optimizer steps an epoch (6 micro-batches / accum 2): steps 0-2 in epoch 0, step 3 in epoch 1
    want_lrs = [schedule.lr_for_step(s, 3, 0.1, 0.01, 1, 4) for s in range(4)]
    assert [c[1] for c in stepper.calls if c[0] == "set_lr"] == pytest.approx(want_lrs)
    assert want_lrs[0] == 0.0 and want_lrs[2] == pytest.approx(0.1 * 2 / 3)
    per_step = [("micro", False), ("micro", True), ("apply",)]
    body = [c for c in stepper.calls if c[0] in ("micro", "apply")]
    assert body == per_step * 4
    assert [c for c in stepper.calls if c[0] == "gather"] == [("gather", 2), ("gather", 2)]
    assert loader.seen == [(0, b) for b in range(6)] + [(1, 0), (1, 1)]
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [2, 4] and [r["epoch"] for r in log] == [0, 1]
    assert [r["lr"] for r in log] == pytest.approx([want_lrs[1], want_lrs[3]])
    assert result["step"] == 4 and result["checkpoint"] == str(tmp_path / "checkpoint-4.npk")
    losses = [r[0] for r in stepper.rows]
    assert result["loss"] == losses[3]
    assert [r["loss"] for r in log] == pytest.approx([np.mean(losses[:2]), np.mean(losses[2:])])


def test_cpu_checks_every_step(tmp_path):
    stepper = LeastSquaresStep()
    _train(_cfg(tmp_path, steps=3, log_every=10), stepper, on_cpu=True)
    assert [c for c in stepper.calls if c[0] == "gather"] == [("gather", 1)] * 3


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    straight = LeastSquaresStep()
    _train(_cfg(tmp_path / "a", steps=5), straight)
    first = LeastSquaresStep()
    _train(_cfg(tmp_path / "b", steps=2), first)
    resumed = LeastSquaresStep()
    result, loader = _train(_cfg(tmp_path / "b", steps=5), resumed)
    assert loader.seen[0] == (0, 4)             # step 2 of epoch 0 starts at micro-batch 4
    np.testing.assert_array_equal(resumed.w, straight.w)
    assert _log(tmp_path / "a") == [dict(r, images_per_s=a["images_per_s"], step_time_s=a["step_time_s"])
                                    for r, a in zip(_log(tmp_path / "b"), _log(tmp_path / "a"))]
    assert result["step"] == 5
    again = LeastSquaresStep()
    done, loader = _train(_cfg(tmp_path / "b", steps=5), again)   # nothing left to do
    assert loader.seen == [] and again.calls == [] and done["loss"] == _log(tmp_path / "b")[-1]["loss"]


def test_non_finite_loss_stops_before_the_next_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "CHECK_EVERY_STEP_ON_CPU", False)
    stepper = LeastSquaresStep(poison_at_micro=5)       # the second micro-batch of step 3
    with pytest.raises(runs.NonFiniteLossError, match=r"non-finite loss at step 3 \(epoch 0\); last good "
                                                      r"checkpoint: .*checkpoint-2\.npk"):
        _train(_cfg(tmp_path, steps=6, log_every=10, save_every_steps=2), stepper)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2.npk", "config.yaml"]   # nothing logged yet
