"""The shared training loop (backends/loop.py) driving a numpy step object: the lr of every
optimizer step, accumulation and the DDP sync flag, log and checkpoint cadence, the host syncs,
exact resume and the non-finite stop; the faults of long runs (a stop signal, ranks agreeing on the
step to stop at, a full disk, broken checkpoints and train.resume). No framework: the step object
is a least-squares fit."""
import errno
import json
import os
import pickle
import signal

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
    list_checkpoints = _files.list

    @staticmethod
    def save_checkpoint(path, payload):
        def write(tmp):
            with open(tmp, "wb") as f:
                pickle.dump(payload, f)
        return write_atomically(path, write)

    @staticmethod
    def load_checkpoint(path):
        """The payload; CheckpointError for a file that does not unpickle, as the backends do."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise runs.CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__})") from None

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


# ---------------------------------------------------------------------------------------- faults
class SignalDuringStep(LeastSquaresStep):
    """Sends `signum` to this process during micro-batch `at_micro`, as SLURM or Kubernetes would."""

    def __init__(self, signum, at_micro):
        super().__init__()
        self.signum, self.at_micro = signum, at_micro

    def micro(self, batch, sync=True):
        if self.micros == self.at_micro:
            os.kill(os.getpid(), self.signum)
        super().micro(batch, sync)


LOSS_FIELDS = ("step", "epoch", "loss", "loss_b0", "loss_b1", "loss_b2", "loss_b3", "lr")


def _losses(out):
    return [{k: r[k] for k in LOSS_FIELDS} for r in _log(out)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, signum):
    straight = LeastSquaresStep()
    _train(_cfg(tmp_path / "a", steps=6, log_every=2), straight)
    before = signal.getsignal(signum)
    stepper = SignalDuringStep(signum, at_micro=4)          # the first micro-batch of step 3
    with pytest.raises(runs.Preempted) as stopped:
        _train(_cfg(tmp_path / "b", steps=6, log_every=2), stepper)
    e = stopped.value
    assert (e.signal_name, e.step, e.total, e.exit_status) == (signum.name, 3, 6, 75)
    assert e.checkpoint == str(tmp_path / "b" / "checkpoint-3.npk")
    assert f"stopped by {signum.name} after step 3 of 6" in str(e)
    assert signal.getsignal(signum) == before                # the handler lived as long as the run
    assert len(stepper.rows) == 3                             # step 3 was finished, no step 4 begun
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-3.npk", "config.yaml", "log.jsonl"]
    # the partial window (step 3 alone) is logged, so log.jsonl covers what the checkpoint holds
    assert [r["step"] for r in _log(tmp_path / "b")] == [2, 3]
    assert _log(tmp_path / "b")[1]["loss"] == stepper.rows[2][0]

    resumed = LeastSquaresStep()
    result, loader = _train(_cfg(tmp_path / "b", steps=6, log_every=2), resumed)
    assert loader.seen[0] == (1, 0) and result["step"] == 6   # step 3 begins epoch 1
    np.testing.assert_array_equal(resumed.w, straight.w)
    got, want = _losses(tmp_path / "b"), _losses(tmp_path / "a")
    assert [r["step"] for r in got] == [2, 3, 4, 6]
    assert got[0] == want[0] and got[3] == want[2]           # the windows the stop did not split
    assert got[2]["loss"] == resumed.rows[0][0]               # step 4 alone, after the split window


class Collective:
    """The any_rank of a 2-rank run whose other rank got a stop signal during step `remote_at`: its
    first call from then on (the stop agreement) says True, later ones (the checkpoint's error
    check) add nothing. Records how many steps were done at each call."""

    def __init__(self, stepper, remote_at):
        self.stepper, self.remote_at, self.calls, self.told = stepper, remote_at, [], False

    def __call__(self, flag):
        done = len(self.stepper.rows)
        self.calls.append(done)
        remote = done >= self.remote_at and not self.told
        self.told = self.told or remote
        return bool(flag) or remote


@pytest.mark.parametrize("on_cpu, stop_at, calls", [(True, 4, [1, 2, 3, 4, 4]), (False, 6, [3, 6, 6])],
                         ids=["cpu-every-step", "accelerator-at-log-lines"])
def test_ranks_agree_on_the_step_to_stop_at(tmp_path, monkeypatch, on_cpu, stop_at, calls):
    monkeypatch.setattr(loop, "CHECK_EVERY_STEP_ON_CPU", False)
    stepper = LeastSquaresStep()
    collective = Collective(stepper, remote_at=4)
    with pytest.raises(runs.Preempted) as stopped:
        _train(_cfg(tmp_path, steps=9, log_every=3), stepper, world=2, on_cpu=on_cpu, any_rank=collective)
    assert stopped.value.signal_name == "a stop signal on another rank"
    assert stopped.value.step == stop_at and len(stepper.rows) == stop_at
    assert collective.calls == calls                          # the last call: the save's error check
    assert os.listdir(tmp_path).count(f"checkpoint-{stop_at}.npk") == 1


def test_several_ranks_need_the_collective(tmp_path):
    with pytest.raises(ValueError, match="any_rank"):
        _train(_cfg(tmp_path, steps=2), LeastSquaresStep(), world=2)


class FullDisk(NumpyCheckpoints):
    """Checkpoints whose write runs out of space at the given steps after part of the file is on
    disk, translated as the backends translate it (runs.write_failure)."""

    def __init__(self, fail_at):
        self.fail_at = set(fail_at)

    def save_checkpoint(self, path, payload):
        def write(tmp):
            with open(tmp, "wb") as f:
                if payload["step"] in self.fail_at:
                    f.write(b"\0" * 64)
                    f.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                pickle.dump(payload, f)
        try:
            return write_atomically(path, write)
        except OSError as e:
            raise runs.write_failure(path, e, runs.array_bytes(payload)) from e


def _train_with(cfg, step_obj, ckpt, **kw):
    os.makedirs(cfg.train.output_dir, exist_ok=True)
    sampler = ShardedBatchSampler(NUM_SAMPLES, BATCH, seed=0)
    return loop.train(cfg, step_obj, Loader(sampler), sampler, ckpt, **kw)


def test_full_disk_stops_with_one_sentence_and_keeps_the_old_checkpoint(tmp_path):
    straight = LeastSquaresStep()
    _train(_cfg(tmp_path / "a", steps=5, save_every_steps=1), straight)
    out = tmp_path / "b"
    with pytest.raises(runs.CheckpointWriteError) as failed:
        _train_with(_cfg(out, steps=5, save_every_steps=1), LeastSquaresStep(), FullDisk([3]))
    message = str(failed.value)
    assert message.startswith(f"cannot write checkpoint {out / 'checkpoint-3.npk'}: No space left on device; "
                              f"it needs about 24 bytes and ")   # w: 3 float64
    assert message.endswith(f"are free there; training stopped after step 3 and the newest checkpoint, "
                            f"{out / 'checkpoint-2.npk'}, is kept")
    assert "\n" not in message
    assert sorted(os.listdir(out)) == ["checkpoint-1.npk", "checkpoint-2.npk", "config.yaml", "log.jsonl"]
    assert NumpyCheckpoints.load_checkpoint(str(out / "checkpoint-2.npk"))["step"] == 2
    resumed = LeastSquaresStep()                                   # space freed: the same command again
    _train(_cfg(out, steps=5, save_every_steps=1), resumed)
    np.testing.assert_array_equal(resumed.w, straight.w)
    assert _losses(out) == _losses(tmp_path / "a")


def test_on_save_error_warn_trains_on_but_not_past_the_last_checkpoint(tmp_path):
    straight = LeastSquaresStep()
    _train(_cfg(tmp_path / "a", steps=5, save_every_steps=1), straight)
    cfg = _cfg(tmp_path / "b", steps=5, save_every_steps=1)
    cfg.train.on_save_error = "warn"
    stepper = LeastSquaresStep()
    with pytest.warns(RuntimeWarning, match=r"checkpoint-3\.npk: No space left on device.*training goes on "
                                            r"without it \(train\.on_save_error=warn\) and the newest checkpoint, "
                                            r".*checkpoint-2\.npk, is kept"):
        result = _train_with(cfg, stepper, FullDisk([3]))
    np.testing.assert_array_equal(stepper.w, straight.w)
    assert result["checkpoint"] == str(tmp_path / "b" / "checkpoint-5.npk")
    assert sorted(n for n in os.listdir(tmp_path / "b") if n.startswith("checkpoint")) == \
        ["checkpoint-2.npk", "checkpoint-4.npk", "checkpoint-5.npk"]
    cfg = _cfg(tmp_path / "c", steps=5, save_every_steps=1)
    cfg.train.on_save_error = "warn"
    with pytest.raises(runs.CheckpointWriteError, match=r"training stopped after step 5 and the newest "
                                                        r"checkpoint, .*checkpoint-4\.npk, is kept"):
        _train_with(cfg, LeastSquaresStep(), FullDisk([5]))    # the last one: nothing would follow it


def _four_checkpoints(out):
    """A run of 4 steps with checkpoint-1..4 kept; returns the folder."""
    cfg = _cfg(out, steps=4, save_every_steps=1)
    cfg.train.keep_checkpoints = 4
    _train(cfg, LeastSquaresStep())
    return out


def _resume_cfg(out, steps, resume):
    cfg = _cfg(out, steps=steps)
    cfg.train.resume = str(resume)
    return cfg


def test_broken_newest_checkpoints_fall_back_to_the_newest_valid_one(tmp_path):
    straight = LeastSquaresStep()
    _train(_cfg(tmp_path / "a", steps=6), straight)
    out = _four_checkpoints(tmp_path / "b")
    (out / "checkpoint-4.npk").write_bytes(b"")                       # zero bytes
    other = {"model": {"w": np.zeros(4)}, "optimizer": {}, "scaler": None, "step": 3, "epoch": 1, "config": {}}
    NumpyCheckpoints.save_checkpoint(str(out / "checkpoint-3.npk"), other)   # another model's
    with pytest.raises(runs.CheckpointError, match=r"checkpoint-4\.npk is corrupt or truncated"):
        _train(_resume_cfg(out, 6, "latest"), LeastSquaresStep())
    with pytest.warns(RuntimeWarning) as warned:
        resumed = LeastSquaresStep()
        result, loader = _train(_resume_cfg(out, 6, "latest_valid"), resumed)
    messages = [str(w.message) for w in warned if "train.resume=latest_valid" in str(w.message)]
    assert len(messages) == 2
    assert messages[0].startswith(f"checkpoint {out / 'checkpoint-4.npk'} is corrupt or truncated (EOFError); it "
                                  f"was moved to {out / 'checkpoint-4.npk.broken'} and the run resumes from "
                                  f"{out / 'checkpoint-2.npk'}")
    assert messages[1].startswith(f"checkpoint {out / 'checkpoint-3.npk'} does not fit this model: mis-shaped "
                                  f"keys [w: (4,) vs model (3,)]")
    assert loader.seen[0] == (0, 4) and result["step"] == 6            # step 2 of epoch 0: micro-batch 4
    np.testing.assert_array_equal(resumed.w, straight.w)
    assert _losses(out) == _losses(tmp_path / "a")
    assert {"checkpoint-3.npk.broken", "checkpoint-4.npk.broken"} <= set(os.listdir(out))


def test_resume_none_and_an_explicit_checkpoint(tmp_path):
    straight = LeastSquaresStep()
    _train(_cfg(tmp_path / "a", steps=6), straight)
    out = _four_checkpoints(tmp_path / "b")
    with pytest.raises(runs.ResumeError, match=r"train\.resume=none starts over, but .*b holds checkpoints "
                                               r"\(checkpoint-4\.npk and 3 more\)"):
        _train(_resume_cfg(out, 6, "none"), LeastSquaresStep())
    fresh = LeastSquaresStep()
    _train(_resume_cfg(tmp_path / "c", 6, "none"), fresh)               # an empty folder: starts over
    np.testing.assert_array_equal(fresh.w, straight.w)
    with pytest.raises(runs.ResumeError, match=r"starts at step 2, but .*b holds newer checkpoints "
                                               r"\(checkpoint-3\.npk, checkpoint-4\.npk\) that this run would "
                                               r"overwrite"):
        _train(_resume_cfg(out, 6, out / "checkpoint-2.npk"), LeastSquaresStep())
    branched = LeastSquaresStep()                                        # from b's step 2 into a new folder
    result, loader = _train(_resume_cfg(tmp_path / "d", 6, out / "checkpoint-2.npk"), branched)
    assert loader.seen[0] == (0, 4) and result["step"] == 6
    np.testing.assert_array_equal(branched.w, straight.w)
    with pytest.raises(FileNotFoundError, match="checkpoint-9.npk does not exist"):
        _train(_resume_cfg(tmp_path / "e", 6, out / "checkpoint-9.npk"), LeastSquaresStep())


def test_a_folder_without_a_valid_checkpoint_is_an_error_not_a_new_run(tmp_path):
    (tmp_path / "checkpoint-2.npk").write_bytes(b"\x80\x04trunc")
    with pytest.raises(runs.ResumeError, match=r"no checkpoint in .* can be resumed: checkpoint .*checkpoint-2\.npk "
                                               r"is corrupt or truncated"):
        _train(_cfg(tmp_path, steps=3), LeastSquaresStep())
    assert (tmp_path / "checkpoint-2.npk").exists()                     # nothing moved, nothing written


def test_resume_removes_what_a_killed_write_left(tmp_path):
    out = _four_checkpoints(tmp_path / "b")
    (out / ".tmp-checkpoint-5.npk.0a1b2c3d").write_bytes(b"\0" * 10)     # SIGKILL during a write
    (out / ".tmp-checkpoint-5.ckpt.0a1b2c3d.tmp").write_bytes(b"\0")     # MindSpore's own partial file
    _train(_cfg(out, steps=5), LeastSquaresStep())
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_an_unwritable_output_folder_is_one_sentence(tmp_path, monkeypatch):
    def read_only(cfg, path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(runs, "write_config", read_only)
    with pytest.raises(runs.CheckpointWriteError) as failed:
        _train(_cfg(tmp_path, steps=2), LeastSquaresStep())
    assert str(failed.value).startswith(f"cannot write run file {tmp_path / 'config.yaml'}: Read-only file system; ")
    assert str(failed.value).endswith(" are free there")
