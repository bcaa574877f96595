"""TensorBoard event files (backends/tensorboard.py) read back with tensorboard's own reader: the
writer alone, the purge of steps past a resume, and the shared loop writing log.jsonl's scalars and
the figure hook's images when train.tensorboard is on. No framework."""
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from localmim.backends import loop, runs
from localmim.backends.images import ShardedBatchSampler
from localmim.core.config import ConfigError, PretrainConfig, load_config
from localmim.core.files import write_atomically

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
from localmim.backends.tensorboard import TENSORBOARD_DIR, TensorBoardWriter  # noqa: E402


def read_events(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def decode(image_event):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)))


def test_scalars_and_images_read_back(tmp_path):
    w = TensorBoardWriter(str(tmp_path))
    w.scalars(10, {"step": 10, "epoch": 1, "loss": 0.75, "loss_b0": 0.25, "lr": 1e-3})
    w.scalars(20, {"step": 20, "epoch": 2, "loss": 0.5, "loss_b0": 0.125, "lr": 5e-4})
    picture = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    w.image("reconstruction", 20, picture)
    w.close()
    acc = read_events(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["loss", "loss_b0", "lr"]        # step and epoch are axes
    assert scalars(acc, "loss") == [(10, 0.75), (20, 0.5)]
    assert scalars(acc, "loss_b0") == [(10, 0.25), (20, 0.125)]
    assert [s for s, _ in scalars(acc, "lr")] == [10, 20]
    assert [v for _, v in scalars(acc, "lr")] == pytest.approx([1e-3, 5e-4])
    (img,) = acc.Images("reconstruction")
    assert (img.step, img.height, img.width) == (20, 4, 6)
    np.testing.assert_array_equal(decode(img), picture)


def test_a_resumed_writer_drops_the_steps_past_its_checkpoint(tmp_path):
    first = TensorBoardWriter(str(tmp_path))
    for step, loss in ((10, 1.0), (20, 0.8), (30, 0.6)):
        first.scalars(step, {"loss": loss})
    first.close()
    resumed = TensorBoardWriter(str(tmp_path), start_step=20)   # the checkpoint was at step 20
    for step, loss in ((30, 0.55), (40, 0.4)):
        resumed.scalars(step, {"loss": loss})
    resumed.close()
    assert len(os.listdir(tmp_path)) == 2
    assert scalars(read_events(tmp_path), "loss") == [(10, 1.0), (20, pytest.approx(0.8)), (30, pytest.approx(0.55)),
                                                     (40, pytest.approx(0.4))]


def test_images_must_be_rgb_uint8(tmp_path):
    w = TensorBoardWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        w.image("x", 1, np.zeros((4, 4), np.float32))
    w.close()


def test_the_writer_imports_no_framework(tmp_path):
    code = ("import sys\nfrom localmim.backends.tensorboard import TensorBoardWriter\n"
            f"w = TensorBoardWriter({str(tmp_path)!r}); w.scalars(1, {{'loss': 1.0}}); w.close()\n"
            "loaded = [m for m in ('torch', 'mindspore', 'tensorflow', 'tensorboardX') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_keys_are_typed_and_validated():
    cfg = load_config("demo_vit", ["train.tensorboard=true", "train.tensorboard_images_every_epochs=3"])
    assert cfg.train.tensorboard is True and cfg.train.tensorboard_images_every_epochs == 3
    assert PretrainConfig().train.tensorboard is False
    with pytest.raises(ConfigError, match="train.tensorboard = 'often' has the wrong type"):
        load_config("demo_vit", ["train.tensorboard=often"])
    with pytest.raises(ConfigError, match="tensorboard_images_every_epochs = -1 is invalid"):
        load_config("demo_vit", ["train.tensorboard_images_every_epochs=-1"])
    with pytest.raises(ConfigError, match="did you mean 'train.tensorboard'"):
        load_config("demo_vit", ["train.tensorbord=true"])


def test_figure_schedule():
    # 5 steps an epoch, images every 2 epochs, 23 steps: after steps 10 and 20, and the last one
    assert [s for s in range(1, 24) if runs.figure_due(s, 23, 5, 2)] == [10, 20, 23]
    assert not any(runs.figure_due(s, 23, 5, 0) for s in range(1, 24))


# ---------------------------------------------------------------------------------------- the loop
NUM_SAMPLES, BATCH = 12, 2   # 6 optimizer steps an epoch (accum 1)


class PickleCheckpoints:
    """A backend checkpoint module for the numpy step (pickle: these files never leave the test)."""
    CHECKPOINT_KEYS = runs.CHECKPOINT_KEYS
    _files = runs.CheckpointFiles(".npk")
    checkpoint_name, latest_checkpoint, prune_checkpoints = _files.name, _files.latest, _files.prune
    list_checkpoints = _files.list
    check_model_state = staticmethod(runs.check_model_state)

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


class ShrinkingStep:
    """A step whose loss row after optimizer step s is [3/s, 1/s, 1/s, 1/s / 2, 1/s / 2]."""

    def __init__(self):
        self.steps = 0

    def set_lr(self, lr):
        pass

    def micro(self, batch, sync=True):
        pass

    def apply(self):
        self.steps += 1
        b = 1.0 / self.steps
        return np.array([3 * b, b, b, b / 2, b / 2])

    @staticmethod
    def gather(rows):
        return np.stack(rows)

    def states(self):
        return {"steps": np.array([self.steps])}, {}, None

    def load_states(self, payload, path):
        self.steps = int(payload["model"]["steps"][0])

    def model_shapes(self):
        return {"steps": (1,)}


class Batches:
    """One (empty) batch per key list of the sampler's current window."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        for _ in self.sampler:
            yield None


def _run_loop(out, steps, figure):
    cfg = PretrainConfig()
    cfg.data.batch_size, cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_epochs = BATCH, 0.1, 4, 1
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.log_every = str(out), steps, 4
    cfg.train.save_every_epochs, cfg.train.progress = 1000, False
    cfg.train.tensorboard, cfg.train.tensorboard_images_every_epochs = True, 1
    os.makedirs(out, exist_ok=True)
    sampler = ShardedBatchSampler(NUM_SAMPLES, BATCH, seed=0)
    return loop.train(cfg, ShrinkingStep(), Batches(sampler), sampler, PickleCheckpoints, figure=figure)


def test_the_loop_writes_the_logged_scalars_and_the_figures(tmp_path):
    drawn = []

    def figure(step):
        drawn.append(step)
        return np.full((8, 10, 3), step, dtype=np.uint8)

    _run_loop(tmp_path, steps=14, figure=figure)
    with open(tmp_path / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == [4, 8, 12, 14]
    acc = read_events(tmp_path / TENSORBOARD_DIR)
    for key in ("loss", "loss_b0", "loss_b1", "loss_b2", "loss_b3", "lr", "images_per_s", "step_time_s"):
        got = scalars(acc, key)
        assert [s for s, _ in got] == [r["step"] for r in log], key
        assert [v for _, v in got] == pytest.approx([r[key] for r in log], rel=1e-6), key
    # hand-computed: the line at step 4 is the mean of steps 1-4 of 3/s
    assert scalars(acc, "loss")[0][1] == pytest.approx(np.mean([3 / s for s in range(1, 5)]), rel=1e-6)
    # one figure per epoch (6 steps) and one at the end
    assert drawn == [6, 12, 14]
    images = acc.Images("reconstruction")
    assert [i.step for i in images] == [6, 12, 14]
    assert [int(decode(i)[0, 0, 0]) for i in images] == [6, 12, 14]


def test_without_the_setting_no_event_files(tmp_path):
    cfg = PretrainConfig()
    assert runs.open_tensorboard(cfg, str(tmp_path), 0, True) is None
    cfg.train.tensorboard = True
    assert runs.open_tensorboard(cfg, str(tmp_path), 0, False) is None      # not rank 0
    assert not os.path.exists(tmp_path / TENSORBOARD_DIR)
