"""Checkpoint files: atomic writes, safe loading with clear errors, discovery and pruning."""
import argparse
import os

import numpy as np
import pytest
import torch

from localmim.backends.torch import checkpoint as ckpt


def _payload(step=3, value=1.0):
    return {"model": {"w": torch.full((2, 3), value), "b": torch.zeros(3)},
            "optimizer": {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(2, 3)}},
                          "param_groups": [{"lr": 1e-3, "params": [0], "name": "decay"}]},
            "scaler": None, "step": step, "epoch": 1, "config": {"train": {"seed": 0, "betas": [0.9, 0.95]}}}


def test_round_trip_loads_with_weights_only(tmp_path):
    path = str(tmp_path / "run" / ckpt.checkpoint_name(3))
    ckpt.save_checkpoint(path, _payload())
    assert os.listdir(tmp_path / "run") == ["checkpoint-3.pth"]
    raw = torch.load(path, weights_only=True)
    assert torch.equal(raw["model"]["w"], torch.ones(2, 3)) and raw["step"] == 3
    back = ckpt.load_checkpoint(path)
    assert back["config"] == {"train": {"seed": 0, "betas": [0.9, 0.95]}}
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2, 3))


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-5.pth")
    ckpt.save_checkpoint(path, _payload(5, 1.0))

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, _payload(5, 2.0))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint-5.pth"]
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.ones(2, 3))


def test_corrupt_truncated_and_foreign_files_name_the_file(tmp_path):
    junk = tmp_path / "junk.pth"
    for seed in range(40):  # random bytes make the unpickler fail in many different ways
        junk.write_bytes(np.random.default_rng(seed).integers(0, 256, 200, dtype=np.uint8).tobytes())
        with pytest.raises(ckpt.CheckpointError, match="junk.pth is not a PyTorch checkpoint"):
            ckpt.load_checkpoint(str(junk))

    good = tmp_path / "good.pth"
    ckpt.save_checkpoint(str(good), _payload())
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ckpt.CheckpointError, match="cut.pth .*truncated"):
        ckpt.load_checkpoint(str(cut))

    official = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1.0)}, str(official))
    with pytest.raises(ckpt.CheckpointError, match="official.pth holds Python objects .argparse.Namespace.*convert"):
        ckpt.load_checkpoint(str(official))

    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(1)}, str(weights))
    with pytest.raises(ckpt.CheckpointError, match=r"weights.pth is not a localmim.*'model'"):
        ckpt.load_checkpoint(str(weights))
    assert set(ckpt.load_checkpoint(str(weights), require=())) == {"w"}

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt.load_checkpoint(str(tmp_path / "missing.pth"))


def test_model_key_mismatch_names_the_keys():
    expected = {"a.weight": (2, 2), "a.bias": (2,), "b": (3,)}
    state = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "c": torch.zeros(1)}
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_model_state("x.pth", state, expected)
    msg = str(err.value)
    assert "x.pth" in msg and "missing keys [b]" in msg and "unexpected keys [c]" in msg
    assert "a.weight: (2, 3) vs model (2, 2)" in msg
    ckpt.check_model_state("x.pth", {k: torch.zeros(v) for k, v in expected.items()}, expected)


def test_latest_and_prune(tmp_path):
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    assert ckpt.latest_checkpoint(str(tmp_path / "absent")) is None
    for step in (2, 10, 9):
        ckpt.save_checkpoint(str(tmp_path / ckpt.checkpoint_name(step)), _payload(step))
    (tmp_path / "checkpoint-final.pth").write_bytes(b"")
    (tmp_path / "checkpoint-11.pth.tmp").write_bytes(b"")
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10.pth")
    removed = ckpt.prune_checkpoints(str(tmp_path), keep=2)
    assert removed == [str(tmp_path / "checkpoint-2.pth")]
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [9, 10]
