"""Faults of long runs with the MindSpore backend, through the real command line (README "Long
runs"): SIGKILL at random moments, three times, then SIGTERM, then an exact resume; a full
filesystem; a write that fails with ENOSPC; broken newest checkpoints. The tiny run of
tests/conftest.py (vit_tiny_test, 32 px, 8 images, batch 2, a checkpoint after every step) in
PyNative mode (train.compile=false: no compile time). Runs are children of a process that
imported MindSpore once (tests/conftest.py Zygote)."""
import errno
import math
import os
import re
import shutil
import signal

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from localmim.backends import runs  # noqa: E402
from localmim.backends.mindspore import build_model  # noqa: E402
from localmim.backends.mindspore import checkpoint as ckpt  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402

BACKEND, EXT, STEPS = "mindspore", ".ckpt", 6


@pytest.fixture(scope="module")
def zygote(fault_runs, tmp_path_factory):
    # Synchronous PyNative: the same numbers, and on 2 busy cores a tiny step takes 0.5 s instead of
    # 5.5 s with MindSpore's asynchronous op dispatch; the compile cache takes the first step of
    # every run after the first from 9.4 s to 5.7 s (the optimizer's graphs; MindSpore 2.10).
    cache = tmp_path_factory.mktemp("compile_cache")
    z = fault_runs.Zygote("localmim.backends.mindspore.engine",
                          setup=f"import mindspore; mindspore.set_context(pynative_synchronize=True, "
                                f"enable_compile_cache=True, compile_cache_path={str(cache)!r})")
    yield z
    z.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, zygote, fault_runs):
    """The config file, and the uninterrupted run every faulty one is compared with (all its
    checkpoints kept)."""
    root = tmp_path_factory.mktemp("faults")
    config = fault_runs.config(root, STEPS, compile=False)
    reference = root / "uninterrupted"
    argv = fault_runs.argv(BACKEND, config, reference, f"train.keep_checkpoints={STEPS}")
    assert zygote.run(argv, root, "reference") == 0
    return {"config": config, "reference": reference}


def _flat(tree, prefix=""):
    """A checkpoint payload as {dotted key: array or number}."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def _assert_same_run(fault_runs, out, reference, first_step=1):
    """The final checkpoint (model, AdamW moments and step count) and the logged losses (from
    first_step on) of `out` equal the uninterrupted run's, bit for bit; no temporary file is left."""
    got = _flat(ckpt.load_checkpoint(os.path.join(out, f"checkpoint-{STEPS}{EXT}")))
    want = _flat(ckpt.load_checkpoint(os.path.join(reference, f"checkpoint-{STEPS}{EXT}")))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        elif not key.startswith("config."):  # the config holds the output folder
            assert got[key] == value, key
    losses, want = fault_runs.losses(out), fault_runs.losses(reference)[first_step - 1:]
    assert losses[-len(want):] == want and [r["step"] for r in losses] == list(range(1, STEPS + 1))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_sigkill_three_times_then_sigterm_then_resume_is_bit_exact(setup, zygote, fault_runs, tmp_path):
    out = tmp_path / "run"
    argv = fault_runs.argv(BACKEND, setup["config"], out)
    rng = np.random.default_rng(16)
    # a step and its checkpoint write take about twice a step's time (the first one has warm-ups)
    cycle = 2 * float(np.median([r["step_time_s"] for r in fault_runs.log(setup["reference"])[1:]]))
    for i in range(3):   # SIGKILL at a random moment of the step or checkpoint write after a given one
        target = min(max(fault_runs.newest_step(out, EXT), 0) + 1, STEPS - 3)
        run = zygote.start(argv, tmp_path, f"kill{i}")
        code = fault_runs.signal_at(run, out, EXT, target, float(rng.uniform(0.0, cycle)), signal.SIGKILL)
        assert code == -signal.SIGKILL

    # SIGTERM to the whole process group, as SLURM sends it (the loader's decoding threads too)
    done = fault_runs.newest_step(out, EXT)
    assert 0 < done <= STEPS - 3
    run = zygote.start(argv + ["data.num_workers=1"], tmp_path, "term")
    code = fault_runs.signal_at(run, out, EXT, done + 1, float(rng.uniform(0.0, cycle / 2)), signal.SIGTERM)
    assert code == runs.PREEMPTED_EXIT_STATUS == 75
    err = (tmp_path / "term.err").read_text()
    assert "Traceback" not in err
    stopped = re.fullmatch(rf"localmim pretrain: stopped by SIGTERM after step (\d+) of {STEPS} and wrote (\S+); "
                           r"run the same command again to resume", err.strip().splitlines()[-1])
    assert stopped, err[-2000:]
    step, path = int(stopped.group(1)), stopped.group(2)
    assert done < step < STEPS and path == str(out / f"checkpoint-{step}{EXT}")
    assert ckpt.load_checkpoint(path)["step"] == step
    assert fault_runs.log(out)[-1]["step"] == step                  # the log covers the checkpoint

    assert zygote.run(argv, tmp_path, "final") == 0                 # the same command, to the end
    _assert_same_run(fault_runs, out, setup["reference"])


def test_full_filesystem_is_one_sentence_and_keeps_the_old_checkpoint(setup, zygote, fault_runs, tmp_path):
    if not zygote.small_filesystem:
        pytest.skip("cannot mount a tmpfs here (unshare -rm)")
    size = os.path.getsize(setup["reference"] / f"checkpoint-{STEPS}{EXT}")
    mnt, copy = tmp_path / "small", tmp_path / "copy"
    argv = fault_runs.argv(BACKEND, setup["config"], mnt / "run", "train.keep_checkpoints=1")
    # room for one checkpoint and the run's small files, not for a second one beside it
    small = {"dir": mnt, "size_kb": math.ceil(1.5 * size / 1024), "copy_to": copy}
    assert zygote.run(argv, tmp_path, "full", tmpfs=small) == 2
    err = (tmp_path / "full.err").read_text()
    assert "Traceback" not in err
    line, run = err.strip().splitlines()[-1], mnt / "run"
    assert re.fullmatch(
        rf"localmim pretrain: cannot write checkpoint {run}/checkpoint-2{EXT}: No space left on device; it needs "
        rf"about [\d.]+ kB and [\d.]+ kB are free there; training stopped after step 2 and the newest checkpoint, "
        rf"{run}/checkpoint-1{EXT}, is kept", line), line
    needed = float(re.search(r"needs about ([\d.]+) kB", line).group(1)) * 1000
    assert 0.8 * size < needed <= size                               # the arrays, without names and headers
    assert sorted(os.listdir(copy / "run")) == [f"checkpoint-1{EXT}", "config.yaml", "log.jsonl"]
    kept = ckpt.load_checkpoint(str(copy / "run" / f"checkpoint-1{EXT}"))
    ckpt.check_model_state("kept", kept["model"], build_model(get_spec("vit_tiny_test")).state_shapes())
    assert kept["step"] == 1


class FillingFile:
    """A real file that takes `room` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, path, mode, room):
        self._f, self.room = open(path, mode), room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self._f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_a_write_that_fails_with_enospc_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    from mindspore.train import serialization
    state = build_model(get_spec("vit_tiny_test")).export_state()
    payload = {"model": state, "optimizer": {}, "scaler": None, "step": 1, "epoch": 0, "config": {}}
    ckpt.save_checkpoint(str(tmp_path / f"checkpoint-1{EXT}"), payload)
    # MindSpore opens its file through this hook (the builtin open unless MindIO is installed)
    monkeypatch.setattr(serialization._ckpt_fs, "create", lambda path, mode: FillingFile(path, mode, room=5000))
    with pytest.raises(runs.CheckpointWriteError) as failed:
        ckpt.save_checkpoint(str(tmp_path / f"checkpoint-2{EXT}"), dict(payload, step=2))
    needed = sum(v.nbytes for v in state.values())
    assert str(failed.value).startswith(f"cannot write checkpoint {tmp_path}/checkpoint-2{EXT}: No space left on "
                                        f"device; it needs about {needed / 1000:.1f} kB and ")
    assert isinstance(failed.value.__cause__, OSError)
    assert "Failed to save" not in capsys.readouterr().err          # MindSpore's own line is replaced
    assert os.listdir(tmp_path) == [f"checkpoint-1{EXT}"]
    assert ckpt.load_checkpoint(str(tmp_path / f"checkpoint-1{EXT}"))["step"] == 1


def test_broken_newest_checkpoints_fall_back_to_the_newest_valid_one(setup, zygote, fault_runs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in [f"checkpoint-{s}{EXT}" for s in range(STEPS - 4, STEPS)] + ["log.jsonl"]:
        shutil.copy(setup["reference"] / name, out / name)          # a run that got to step STEPS - 1
    newest, empty, other = (out / f"checkpoint-{STEPS - k}{EXT}" for k in (1, 2, 3))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    empty.write_bytes(b"")                                                # zero bytes
    payload = ckpt.load_checkpoint(str(other))                            # another model's weights
    payload["model"] = build_model(get_spec("vit_tiny_test", img_size=64)).export_state()
    ckpt.save_checkpoint(str(other), payload)

    argv = fault_runs.argv(BACKEND, setup["config"], out)
    assert zygote.run(argv + ["train.resume=latest"], tmp_path, "latest") == 2
    unreadable = "is corrupt, truncated or not a MindSpore checkpoint and cannot be read ("
    err = (tmp_path / "latest.err").read_text().strip()
    assert err.startswith(f"localmim pretrain: checkpoint {newest} {unreadable}") and len(err.splitlines()) == 1
    assert zygote.run(argv, tmp_path, "valid") == 0                  # train.resume=latest_valid, the default
    moved = fault_runs.warnings(tmp_path / "valid.err")
    starts = [f"checkpoint {newest} {unreadable}", f"checkpoint {empty} {unreadable}",
              f"checkpoint {other} does not fit this model: mis-shaped keys ["]
    assert len(moved) == 3 and all(m.startswith(start) for m, start in zip(moved, starts)), moved
    assert "pos_embed: (1, 65, 32) vs model (1, 17, 32)" in moved[2]  # 64 px: 8 x 8 patches + cls
    resumed_from = out / f"checkpoint-{STEPS - 4}{EXT}"
    assert all(m.endswith(f"; it was moved to {p}.broken and the run resumes from {resumed_from} "
                          f"(train.resume=latest_valid)") for m, p in zip(moved, (newest, empty, other)))
    assert {f"{p.name}.broken" for p in (newest, empty, other)} <= set(os.listdir(out))
    _assert_same_run(fault_runs, out, setup["reference"], first_step=STEPS - 3)
