"""Pretraining loop: outputs, exact resume, accumulation, precision, non-finite stop, inference."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from localmim.backends import loop
from localmim.backends.runs import LOG_KEYS
from localmim.backends.torch import build_model, engine, inference
from localmim.backends.torch import checkpoint as ckpt
from localmim.core import config as core_config
from localmim.core import masking
from localmim.core import targets as core_targets


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster on one intra-op thread, above all on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(12):
        arr = rng.integers(0, 256, (36 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i:02d}.png")
    return str(folder)


def _cfg(image_dir, out, steps, accum=1, batch=2, **train):
    t = {"output_dir": str(out), "max_steps": steps, "log_every": 1, "save_every_steps": 100,
         "progress": False, "seed": 1}
    t.update(train)
    return core_config.config_from_dict({
        "model": {"name": "vit_tiny_test"},
        "data": {"path": image_dir, "batch_size": batch, "num_workers": 0},
        "optim": {"lr": 2e-3, "epochs": 10, "warmup_epochs": 1, "accum_iter": accum},
        "train": t})


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_writes_log_config_and_checkpoints(image_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(image_dir, out, steps=5, batch=4, save_every_steps=2, keep_checkpoints=2, log_every=2)
    result = engine.run_pretrain(cfg)
    assert result["step"] == 5 and result["output_dir"] == str(out)
    assert result["checkpoint"] == str(out / "checkpoint-5.pth")
    assert sorted(os.listdir(out)) == ["checkpoint-4.pth", "checkpoint-5.pth", "config.yaml", "log.jsonl"]

    log = _log(out)
    assert [r["step"] for r in log] == [2, 4, 5]
    assert [r["epoch"] for r in log] == [0, 1, 1]  # 12 images / batch 4 = 3 steps per epoch
    for r in log:
        assert list(r) == list(LOG_KEYS)
        assert np.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["step_time_s"] > 0
        assert r["loss"] == pytest.approx(sum(r[f"loss_b{k}"] for k in range(4)), rel=1e-6)
    assert result["loss"] == pytest.approx(log[-1]["loss"])
    # lr of the step logged: warmup over 3 steps (1 epoch) from 0, then cosine to epoch 10
    assert log[0]["lr"] == pytest.approx(2e-3 * 1 / 3)
    assert log[2]["lr"] == pytest.approx(1e-6 + (2e-3 - 1e-6) * 0.5 * (1 + np.cos(np.pi * (4 / 3 - 1) / 9)))

    assert core_config.load_config(str(out / "config.yaml")) == cfg
    raw = torch.load(str(out / "checkpoint-5.pth"), weights_only=True)
    assert set(raw) == set(ckpt.CHECKPOINT_KEYS)
    assert raw["step"] == 5 and raw["epoch"] == 1 and raw["scaler"] is None
    assert raw["config"] == core_config.config_to_dict(cfg)
    assert "blocks.0.attn.qkv.weight" in raw["model"] and "decoder.3.pred.1.weight" in raw["model"]
    assert [g["name"] for g in raw["optimizer"]["param_groups"]] == ["no_decay", "decay"]

    again = engine.run_pretrain(cfg)  # nothing left to do: same answer, nothing rewritten
    assert again["step"] == 5 and again["checkpoint"] == result["checkpoint"]
    assert len(_log(out)) == 3
    changed = _cfg(image_dir, out, steps=5, batch=4, save_every_steps=2, keep_checkpoints=2, log_every=7)
    changed.mask.ratio = 0.5
    with pytest.warns(RuntimeWarning, match=r"different config: mask.ratio \(0.75 -> 0.5\); the run will not"):
        engine.run_pretrain(changed)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_reproduces_the_uninterrupted_run(image_dir, tmp_path, accum):
    straight = engine.run_pretrain(_cfg(image_dir, tmp_path / "a", steps=6, accum=accum))
    engine.run_pretrain(_cfg(image_dir, tmp_path / "b", steps=3, accum=accum))
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a line written after the checkpoint, then killed
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n{\"step\": 5, \"lo")
    resumed = engine.run_pretrain(_cfg(image_dir, tmp_path / "b", steps=6, accum=accum))
    assert resumed["step"] == straight["step"] == 6
    a = torch.load(straight["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        for k in st:
            assert torch.equal(st[k], b["optimizer"]["state"][i][k])
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(la, lb):
        for k in ("loss", "loss_b0", "loss_b1", "loss_b2", "loss_b3", "lr", "epoch"):
            assert ra[k] == rb[k], (ra["step"], k)


def test_accumulation_equals_one_big_batch_step(image_dir, tmp_path):
    """accum_iter=2 with batch 2 takes the same first step as the mean loss of both micro-batches."""
    cfg = _cfg(image_dir, tmp_path / "acc", steps=1, accum=2, batch=2)
    result = engine.run_pretrain(cfg)
    spec = cfg.build_spec()
    from localmim.backends.torch import data
    loader, sampler = data.build_pretrain_loader(cfg, spec)
    sampler.set_epoch(0, 0, 2)
    batches = list(loader)
    torch.manual_seed(1)
    model = build_model(spec)
    opt = engine.build_optimizer(model, cfg)
    steps_per_epoch = sampler.batches_per_epoch // 2
    from localmim.core import schedule
    engine.set_lr(opt, schedule.lr_for_step(0, steps_per_epoch, 2e-3, 1e-6, 1, 10))
    loss = sum(model(b["images"], b["masks"])[0] for b in batches) / 2
    loss.backward()
    opt.step()
    # lr is 0 at step 0 (warmup), so compare the gradients through Adam's first moment, 0.1 * grad
    got = torch.load(result["checkpoint"], weights_only=True)["optimizer"]["state"]
    want = opt.state_dict()["state"]
    assert set(got) == set(want) and len(want) > 50
    for i in want:
        torch.testing.assert_close(got[i]["exp_avg"], want[i]["exp_avg"], rtol=1e-5, atol=1e-9)
    assert max(v["exp_avg"].abs().max().item() for v in want.values()) > 1e-3
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(image_dir, tmp_path, precision, capsys):
    result = engine.run_pretrain(_cfg(image_dir, tmp_path / precision, steps=2, precision=precision,
                                      progress=precision == "bf16"))
    err = capsys.readouterr().err
    assert ("2/2" in err) == (precision == "bf16")  # the tqdm bar, only when asked for
    raw = torch.load(result["checkpoint"], weights_only=True)
    assert np.isfinite(result["loss"])
    assert all(v.dtype == torch.float32 for v in raw["model"].values())
    if precision == "fp16":
        assert raw["scaler"]["scale"] == 2.0 ** 16
    else:
        assert raw["scaler"] is None


@pytest.mark.parametrize("deferred", [False, True])
def test_non_finite_loss_stops_without_writing(image_dir, tmp_path, monkeypatch, deferred):
    """deferred: the accelerator path, where losses are only fetched at log lines and checkpoints."""
    out = tmp_path / "nan"
    real_build = engine.build_model
    calls = {"n": 0}

    def build_poisoned(spec):
        model = real_build(spec)
        forward = model.forward

        def poisoned(*args):
            calls["n"] += 1
            loss, branches = forward(*args)
            if calls["n"] >= 2:  # second step after resuming at 3: optimizer step 5
                return loss * float("nan"), branches
            return loss, branches
        model.forward = poisoned
        return model

    engine.run_pretrain(_cfg(image_dir, out, steps=3, save_every_steps=3, batch=4))
    monkeypatch.setattr(engine, "build_model", build_poisoned)
    monkeypatch.setattr(loop, "CHECK_EVERY_STEP_ON_CPU", not deferred)
    cfg = _cfg(image_dir, out, steps=9, save_every_steps=3, batch=4, log_every=10 if deferred else 1)
    with pytest.raises(engine.NonFiniteLossError) as err:
        engine.run_pretrain(cfg)
    good = str(out / "checkpoint-3.pth")
    assert str(err.value) == f"non-finite loss at step 5 (epoch 1); last good checkpoint: {good}"
    assert sorted(os.listdir(out)) == ["checkpoint-3.pth", "config.yaml", "log.jsonl"]
    # deferred: nothing was logged after step 3 (steps 4-6 were fetched at the step-6 checkpoint)
    assert [r["step"] for r in _log(out)] == ([1, 2, 3] if deferred else [1, 2, 3, 4])
    assert ckpt.load_checkpoint(good)["step"] == 3


def test_inference_reconstructs_like_the_training_forward(image_dir, tmp_path):
    result = engine.run_pretrain(_cfg(image_dir, tmp_path / "inf", steps=1))
    model, spec = inference.load_model(result["checkpoint"])
    assert spec.name == "vit_tiny_test" and not model.training
    imgs = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    m = masking.vit_mask(masking.mask_rng(0, 0, 0, 0), 2, spec.num_patches, 0.75)
    out = inference.reconstruct(model, imgs, m)
    assert [p.shape for p in out["preds"]] == [(2, 256, 27), (2, 64, 27), (2, 16, 27), (2, 4, 27)]
    assert [t.shape for t in out["targets"]] == [p.shape for p in out["preds"]]
    for got, ref in zip(out["masks"], core_targets.scale_masks(m.mask, spec.grid, spec.scales)):
        np.testing.assert_array_equal(got, ref)
    total, _ = core_targets.localmim_loss(out["preds"], out["targets"], out["masks"])
    with torch.no_grad():
        loss, _ = model(torch.from_numpy(imgs), {k: torch.from_numpy(v) for k, v in m.as_dict().items()})
    assert total == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="do not fit model vit_tiny_test"):
        inference.reconstruct(model, imgs[:, :, :16, :16], m)


def test_checkpoint_for_another_model_names_the_keys(image_dir, tmp_path):
    result = engine.run_pretrain(_cfg(image_dir, tmp_path / "other", steps=1))
    payload = torch.load(result["checkpoint"], weights_only=True)
    payload["model"]["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    del payload["model"]["norm.0.bias"]
    bad = str(tmp_path / "other" / "checkpoint-99.pth")
    ckpt.save_checkpoint(bad, payload)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-99.pth does not fit.*norm.0.bias.*qkv"):
        inference.load_model(bad)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-99.pth"):
        engine.run_pretrain(_cfg(image_dir, tmp_path / "other", steps=5, resume="latest"))
    with pytest.warns(RuntimeWarning, match=r"checkpoint-99.pth does not fit.*moved to .*checkpoint-99.pth.broken "
                                            r"and the run resumes from .*checkpoint-1.pth"):
        assert engine.run_pretrain(_cfg(image_dir, tmp_path / "other", steps=2))["step"] == 2  # latest_valid


def test_swin_pretraining_runs_resumes_and_reconstructs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (70, 66 + i, 3), dtype=np.uint8)).save(folder / f"{i}.png")

    def cfg(out, steps):
        return core_config.config_from_dict({
            "model": {"name": "swin_tiny_test"},
            "data": {"path": str(folder), "batch_size": 2, "num_workers": 0},
            "optim": {"lr": 1e-3, "epochs": 10, "warmup_epochs": 0},
            "train": {"output_dir": str(out), "max_steps": steps, "log_every": 1, "progress": False}})

    from localmim.backends.torch import data
    from localmim.core.swin_plan import build_swin_plan
    c = cfg(tmp_path / "a", 3)
    spec = c.build_spec()
    loader, sampler = data.build_pretrain_loader(c, spec, rank=0, world=1)
    sampler.set_epoch(1)
    batch = next(iter(loader))
    cell = masking.swin_cell_mask(masking.mask_rng(0, 1, 0, 0), spec.mask_grid, 0.75)
    ref = build_swin_plan(spec, cell).to_arrays()
    assert set(batch["masks"]) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(batch["masks"][k].numpy(), v, err_msg=k)

    straight = engine.run_pretrain(c)
    engine.run_pretrain(cfg(tmp_path / "b", 2))
    resumed = engine.run_pretrain(cfg(tmp_path / "b", 3))
    a = torch.load(straight["checkpoint"], weights_only=True)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=True)["model"]
    assert any(k.startswith("encoder.layers.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in _log(tmp_path / "a")] == [r["loss"] for r in _log(tmp_path / "b")]

    model, spec = inference.load_model(straight["checkpoint"])
    out = inference.reconstruct(model, batch["images"].numpy(), cell)
    total, _ = core_targets.localmim_loss(out["preds"], out["targets"], out["masks"])
    with torch.no_grad():
        loss, _ = model(batch["images"], batch["masks"])
    assert total == pytest.approx(loss.item(), rel=1e-5)
    for m, br in zip(out["masks"], spec.branches()):
        assert m.shape == (2, br.grid ** 2)


def test_loader_workers_do_not_change_the_run(image_dir, tmp_path):
    """Persistent workers across an epoch boundary give the same weights as the main-process loader."""
    serial = engine.run_pretrain(_cfg(image_dir, tmp_path / "w0", steps=4, batch=4))
    cfg = _cfg(image_dir, tmp_path / "w2", steps=4, batch=4)
    cfg.data.num_workers = 2
    parallel = engine.run_pretrain(cfg)
    a = torch.load(serial["checkpoint"], weights_only=True)["model"]
    b = torch.load(parallel["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
