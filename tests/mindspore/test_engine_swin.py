"""MindSpore Swin pretraining: loader plans (equal to core and to the torch loader), the CLI run +
exact resume, reconstruct, and `localmim visualize`. swin_tiny_test (64 px, 4x4 mask grid) on 12
generated PNGs, batch 2 (6 optimizer steps per epoch)."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ms = pytest.importorskip("mindspore")

from localmim.backends.mindspore import checkpoint as ckpt  # noqa: E402
from localmim.backends.mindspore import data as data_mod  # noqa: E402
from localmim.backends.mindspore import engine, inference  # noqa: E402
from localmim.backends.mindspore import build_model  # noqa: E402
from localmim.backends.runs import LOG_KEYS  # noqa: E402
from localmim.core import config as core_config  # noqa: E402
from localmim.core import masking  # noqa: E402
from localmim.core import targets as core_targets  # noqa: E402
from localmim.core.swin_plan import build_swin_plan, static_plan_bounds  # noqa: E402

SEED = 3


def _images(folder, n=12):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (70, 66 + i, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:02d}.png"))
    return str(folder)


def _cfg(data_path, out=None, max_steps=None, **train):
    cfg = core_config.config_from_dict({
        "model": {"name": "swin_tiny_test"},
        "data": {"path": data_path, "batch_size": 2, "num_workers": 0},
        "optim": {"lr": 1e-3, "epochs": 10, "warmup_epochs": 0},
        "train": {"seed": SEED, "device": "cpu", "output_dir": str(out or "unused"), "max_steps": max_steps,
                  "log_every": 1, "progress": False}})
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("swin_data") / "imgs")


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_loader_plans_are_core_plans_of_the_batch_mask(data_path, rank, world):
    cfg = _cfg(data_path)
    spec = cfg.build_spec()
    loader, sampler = data_mod.build_pretrain_loader(cfg, spec, rank=rank, world=world)
    sampler.set_epoch(1, 1)      # batches 1, 2, ... of epoch 1
    batches = list(itertools.islice(iter(loader), 2))
    for b, batch in zip((1, 2), batches):
        assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == np.float32
        cell = masking.swin_cell_mask(masking.mask_rng(SEED, 1, b, rank), spec.mask_grid, cfg.mask.ratio)
        ref = build_swin_plan(spec, cell).to_arrays()
        assert set(batch["masks"]) == set(ref)
        for k, v in ref.items():
            assert batch["masks"][k].dtype == v.dtype, k
            np.testing.assert_array_equal(batch["masks"][k], v, err_msg=k)
    # two batches, two different masks
    assert not np.array_equal(batches[0]["masks"]["cell_mask"], batches[1]["masks"]["cell_mask"])
    # GeneratorDataset gives the same batches
    gen, gen_sampler = data_mod.build_pretrain_loader(cfg, spec, rank=rank, world=world, backend="generator")
    gen_sampler.set_epoch(1, 1, 3)
    for batch, other in zip(batches, gen):
        np.testing.assert_array_equal(batch["images"], other["images"])
        assert set(other["masks"]) == set(batch["masks"])
        for k, v in batch["masks"].items():
            np.testing.assert_array_equal(other["masks"][k], v, err_msg=k)


def test_loader_batches_equal_the_torch_loader(data_path):
    torch = pytest.importorskip("torch")
    from localmim.backends.torch import data as torch_data
    cfg = _cfg(data_path)
    spec = cfg.build_spec()
    ms_loader, ms_sampler = data_mod.build_pretrain_loader(cfg, spec, rank=0, world=1)
    pt_loader, pt_sampler = torch_data.build_pretrain_loader(cfg, spec, rank=0, world=1)
    ms_sampler.set_epoch(2, 4)
    pt_sampler.set_epoch(2, 4)
    for a, b in zip(ms_loader, pt_loader):
        np.testing.assert_allclose(a["images"], b["images"].numpy(), rtol=0, atol=1e-6)
        assert set(a["masks"]) == set(b["masks"])
        for k, v in b["masks"].items():
            np.testing.assert_array_equal(a["masks"][k], v.numpy(), err_msg=k)
    assert isinstance(b["masks"]["patch_index"], torch.Tensor)


# ---------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def runs(data_path, tmp_path_factory):
    """`localmim pretrain --backend mindspore` for 2 steps, rerun to 4 (resume); 4 steps straight."""
    root = tmp_path_factory.mktemp("swin_runs")
    resumed_dir, straight_dir = str(root / "resumed"), str(root / "straight")
    cmd = [sys.executable, "-m", "localmim.tools.cli", "pretrain", "--backend", "mindspore", "--config", "demo_swin",
           "--max-steps", "2", "--data", data_path, "--output", resumed_dir, "data.batch_size=2",
           "model.name=swin_tiny_test", "model.img_size=64", "data.num_workers=0", "optim.lr=1e-3",
           "optim.warmup_epochs=0", "train.log_every=1", f"train.seed={SEED}", "train.progress=false", "train.compile=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli_files = sorted(os.listdir(resumed_dir))
    cli_log = _log(resumed_dir)
    cfg = core_config.load_config(os.path.join(resumed_dir, "config.yaml"))
    cfg.train.max_steps = 4
    resumed = engine.run_pretrain(cfg)
    cfg.train.output_dir = straight_dir
    straight = engine.run_pretrain(cfg)
    return {"cli_stdout": proc.stdout, "cli_files": cli_files, "cli_log": cli_log, "resumed": resumed,
            "straight": straight, "cfg": cfg, "root": root}


def test_cli_pretrain_writes_log_and_checkpoint(runs):
    assert runs["cli_files"] == ["checkpoint-2.ckpt", "config.yaml", "log.jsonl"]
    assert "checkpoint-2.ckpt" in runs["cli_stdout"]
    log = runs["cli_log"]
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert tuple(r) == LOG_KEYS
        np.testing.assert_allclose(r["loss"], sum(r[f"loss_b{k}"] for k in range(4)), rtol=1e-5)
    assert runs["cfg"].model.name == "swin_tiny_test" and runs["cfg"].data.batch_size == 2


def test_swin_resume_reproduces_uninterrupted_run(runs):
    assert runs["resumed"]["step"] == runs["straight"]["step"] == 4
    a = ckpt.load_checkpoint(runs["straight"]["checkpoint"])
    b = ckpt.load_checkpoint(runs["resumed"]["checkpoint"])
    assert any(k.startswith("encoder.layers.") for k in a["model"])
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:
        np.testing.assert_array_equal(a["model"][k], b["model"][k], err_msg=k)
    for k in a["optimizer"]:
        np.testing.assert_array_equal(a["optimizer"][k], b["optimizer"][k], err_msg=k)
    straight_log, resumed_log = _log(runs["straight"]["output_dir"]), _log(runs["resumed"]["output_dir"])
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4]
    assert [r["loss"] for r in straight_log] == [r["loss"] for r in resumed_log]
    assert resumed_log[:2] == runs["cli_log"]
    assert straight_log[-1]["loss"] < straight_log[0]["loss"]      # it learns
    # training moved the weights away from the seeded initialisation
    ms.set_seed(SEED)
    init = build_model(runs["cfg"].build_spec()).export_state()
    assert not np.array_equal(init["encoder.layers.0.blocks.0.attn.qkv.weight"],
                              a["model"]["encoder.layers.0.blocks.0.attn.qkv.weight"])


def test_reconstruct_matches_the_training_loss_and_torch(runs, data_path):
    model, spec = inference.load_model(runs["straight"]["checkpoint"])
    cfg = _cfg(data_path)
    loader, sampler = data_mod.build_pretrain_loader(cfg, spec)
    sampler.set_epoch(0, 1, 2)
    batch = next(iter(loader))
    cell = batch["masks"]["cell_mask"]
    out = inference.reconstruct(model, batch["images"], cell)
    total, per = core_targets.localmim_loss(out["preds"], out["targets"], out["masks"])
    loss, branch = model(*engine.batch_inputs(batch))
    assert total == pytest.approx(float(loss.asnumpy()), rel=1e-5)
    np.testing.assert_allclose(per, branch.asnumpy(), rtol=1e-5)
    for m, br in zip(out["masks"], spec.branches()):
        assert m.shape == (2, br.grid ** 2)
        f = br.grid // spec.mask_grid
        up = np.repeat(np.repeat(cell.reshape(spec.mask_grid, -1), f, 0), f, 1).reshape(-1)
        np.testing.assert_array_equal(m[0], up.astype(np.float32))
    # a SwinPlan gives the same numbers as its cell mask
    again = inference.reconstruct(model, batch["images"], build_swin_plan(spec, cell))
    for x, y in zip(out["preds"], again["preds"]):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match=r"images of shape \(2, 3, 32, 32\) do not fit model swin_tiny_test"):
        inference.reconstruct(model, np.zeros((2, 3, 32, 32), np.float32), cell)
    # independent reference: the torch model with the same canonical weights
    torch = pytest.importorskip("torch")
    from localmim.backends.torch import inference as torch_inference
    from localmim.backends.torch import build_model as build_torch_model
    ref = build_torch_model(spec)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in model.export_state().items()})
    ref_out = torch_inference.reconstruct(ref, batch["images"], cell)
    for key in ("preds", "targets", "masks"):
        for x, y in zip(out[key], ref_out[key]):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4, err_msg=key)


def test_cli_visualize_renders_the_swin_checkpoint(runs, data_path, tmp_path):
    png = str(tmp_path / "swin.png")
    cmd = [sys.executable, "-m", "localmim.tools.cli", "visualize", "--checkpoint", runs["straight"]["checkpoint"],
           "--image", os.path.join(data_path, "00.png"), "--output", png]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(png) as im:
        assert im.format == "PNG"
        # two panels side by side, a row per branch plus the input row: taller than wide
        assert im.width >= 2 * 64 and im.height > im.width
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10      # not a blank canvas


# -------------------------------------------------------------------------------------- compiled
def test_compiled_step_equals_pynative_with_static_plans(data_path):
    """train.compile: padded static plans through ms.jit give PyNative's loss and gradients, for
    two different masks through one compiled graph."""
    cfg = _cfg(data_path)
    spec = cfg.build_spec()
    ms.set_seed(1)
    model = build_model(spec)
    model.set_train(True)
    optimizer = engine.build_optimizer(model, cfg)
    eager = engine.TrainStep(model, optimizer, accum=2)
    graph = engine.TrainStep(model, optimizer, accum=2, use_jit=True)
    loader, sampler = data_mod.build_pretrain_loader(cfg, spec, static_plans=True)
    sampler.set_epoch(0, 0, 2)
    batches = list(loader)
    pads, sizes = static_plan_bounds(spec, cfg.mask.ratio)
    assert batches[0]["masks"]["stage0.win1.group_index"].shape == (pads[0], sizes[0])
    for batch in batches:
        assert batch["masks"]["stage1.win0.group_index"].shape == (pads[1], sizes[1])
        imgs, masks = engine.batch_inputs(batch)
        g_grads, g_row = graph._micro(imgs, ms.mutable(masks))
        e_grads, e_row = eager._micro(imgs, ms.mutable(masks))
        np.testing.assert_allclose(g_row.asnumpy(), e_row.asnumpy(), rtol=1e-5)
        for p, g, e in zip(optimizer.parameters, g_grads, e_grads):
            np.testing.assert_allclose(g.asnumpy(), e.asnumpy(), rtol=1e-3, atol=1e-6, err_msg=p.name)
