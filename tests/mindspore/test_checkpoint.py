"""MindSpore training checkpoints: round trip, atomic write, discovery, pruning, clear errors."""
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from localmim.backends.mindspore import checkpoint as ckpt  # noqa: E402
from localmim.backends.mindspore import ensure_cpu_context  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu():
    ensure_cpu_context()


def _payload(step=7, scaler=True):
    rng = np.random.default_rng(step)
    return {
        "model": {"cls_token": rng.normal(size=(1, 1, 4)).astype(np.float32),
                  "blocks.0.attn.qkv.weight": rng.normal(size=(12, 4)).astype(np.float32)},
        "optimizer": {"exp_avg.cls_token": rng.normal(size=(1, 1, 4)).astype(np.float32),
                      "state_step": np.array(step, dtype=np.int32)},
        "scaler": {"scale_value": np.array(1024.0, np.float32), "counter": np.array(3, np.int32)} if scaler else None,
        "step": step, "epoch": 2, "config": {"model": {"name": "vit_tiny_test"}, "optim": {"betas": [0.9, 0.95]}},
    }


def test_round_trip_and_plain_mindspore_load(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path / ckpt.checkpoint_name(7)), _payload())
    assert os.path.basename(path) == "checkpoint-7.ckpt"
    got = ckpt.load_checkpoint(path)
    want = _payload()
    assert got["step"] == 7 and got["epoch"] == 2 and got["config"] == want["config"]
    for section in ("model", "optimizer", "scaler"):
        assert sorted(got[section]) == sorted(want[section])
        for k, v in want[section].items():
            np.testing.assert_array_equal(got[section][k], v)
            assert got[section][k].dtype == v.dtype
    raw = ms.load_checkpoint(path)
    assert {"cls_token", "blocks.0.attn.qkv.weight", "optim.exp_avg.cls_token", "optim.state_step",
            "scaler.scale_value", "meta.step", "meta.epoch", "meta.config"} <= set(raw)
    assert [n for n in os.listdir(tmp_path)] == ["checkpoint-7.ckpt"]  # no temp files left


def test_no_scaler_is_none(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path / "checkpoint-1.ckpt"), _payload(1, scaler=False))
    assert ckpt.load_checkpoint(path)["scaler"] is None


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-3.ckpt")
    ckpt.save_checkpoint(path, _payload(3))
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ms, "save_checkpoint", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, _payload(4))
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["checkpoint-3.ckpt"]


def test_corrupt_truncated_and_foreign_files_name_the_file(tmp_path):
    good = ckpt.save_checkpoint(str(tmp_path / "checkpoint-2.ckpt"), _payload(2))
    data = open(good, "rb").read()
    trunc = tmp_path / "checkpoint-5.ckpt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-5.ckpt is corrupt"):
        ckpt.load_checkpoint(str(trunc))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match="junk.ckpt"):
        ckpt.load_checkpoint(str(junk))
    foreign = str(tmp_path / "foreign.ckpt")
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones(3, np.float32))}], foreign)
    with pytest.raises(ckpt.CheckpointError, match=r"foreign.ckpt is not a localmim .*missing keys \['optimizer'"):
        ckpt.load_checkpoint(foreign)
    weights = ckpt.load_checkpoint(foreign, require=("model",))
    np.testing.assert_array_equal(weights["model"]["w"], np.ones(3, np.float32))
    with pytest.raises(FileNotFoundError, match="nothere.ckpt"):
        ckpt.load_checkpoint(str(tmp_path / "nothere.ckpt"))


def test_check_model_state_names_keys():
    state = {"a": np.zeros((2, 3)), "b": np.zeros(4), "extra": np.zeros(1)}
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_model_state("x.ckpt", state, {"a": (2, 3), "b": (5,), "c": (1,)})
    msg = str(e.value)
    assert "x.ckpt" in msg and "missing keys [c]" in msg and "unexpected keys [extra]" in msg
    assert "b: (4,) vs model (5,)" in msg
    ckpt.check_model_state("x.ckpt", {"a": np.zeros((2, 3))}, {"a": (2, 3)})


def test_discovery_and_pruning(tmp_path):
    for s in (10, 2, 30):
        (tmp_path / f"checkpoint-{s}.ckpt").write_bytes(b"x")
    (tmp_path / ".tmp-checkpoint-40.ckpt.abc.ckpt").write_bytes(b"x")
    (tmp_path / "checkpoint-9.pth").write_bytes(b"x")
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 10, 30]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-30.ckpt")
    assert ckpt.latest_checkpoint(str(tmp_path / "none")) is None
    removed = ckpt.prune_checkpoints(str(tmp_path), 2)
    assert [os.path.basename(p) for p in removed] == ["checkpoint-2.ckpt"]
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [10, 30]
    assert ckpt.prune_checkpoints(str(tmp_path), 0) == []
