"""MindSpore pretraining engine: output files, checkpoint contents, exact resume, non-finite stop,
inference helpers. Tiny ViT (32 px) on 12 generated PNGs, batch 4 (3 optimizer steps per epoch)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

ms = pytest.importorskip("mindspore")

from localmim.backends.mindspore import checkpoint as ckpt  # noqa: E402
from localmim.backends.mindspore import data as data_mod  # noqa: E402
from localmim.backends.mindspore import engine, inference  # noqa: E402
from localmim.backends.mindspore import build_model  # noqa: E402
from localmim.backends import loop  # noqa: E402
from localmim.backends.runs import LOG_KEYS  # noqa: E402
from localmim.core import masking  # noqa: E402
from localmim.core.config import PretrainConfig  # noqa: E402

LOSS_KEYS = ("step", "epoch", "loss", "loss_b0", "loss_b1", "loss_b2", "loss_b3", "lr")


def _images(folder, n=12):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(os.path.join(folder, f"i{i:02d}.png"))
    return str(folder)


def _cfg(data_path, out, max_steps, **train):
    cfg = PretrainConfig()
    cfg.train.compile = False  # PyNative: no compile time for a few tiny steps
    cfg.model.name = "vit_tiny_test"
    cfg.data.path = data_path
    cfg.data.batch_size = 4
    cfg.data.num_workers = 0
    cfg.optim.lr = 1e-3
    cfg.optim.epochs = 4
    cfg.optim.warmup_epochs = 1
    cfg.train.seed = 5
    cfg.train.device = "cpu"
    cfg.train.output_dir = str(out)
    cfg.train.max_steps = max_steps
    cfg.train.log_every = 1
    cfg.train.progress = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 steps straight, and 2 steps then a rerun to 4 in another folder."""
    root = tmp_path_factory.mktemp("engine")
    data_path = _images(root / "data")
    straight = engine.run_pretrain(_cfg(data_path, root / "straight", 4, keep_checkpoints=2, save_every_steps=1))
    first = engine.run_pretrain(_cfg(data_path, root / "resumed", 2))
    files_after_first = sorted(os.listdir(root / "resumed"))
    log_after_first = _log(root / "resumed")
    resumed = engine.run_pretrain(_cfg(data_path, root / "resumed", 4))
    return {"root": root, "data": data_path, "straight": straight, "first": first, "resumed": resumed,
            "files_after_first": files_after_first, "log_after_first": log_after_first}


def test_output_files_and_log_keys(runs):
    out = runs["straight"]["output_dir"]
    assert runs["straight"]["step"] == 4
    # save_every_steps 1 with keep_checkpoints 2: only the newest two remain
    assert sorted(os.listdir(out)) == ["checkpoint-3.ckpt", "checkpoint-4.ckpt", "config.yaml", "log.jsonl"]
    assert runs["straight"]["checkpoint"] == os.path.join(out, "checkpoint-4.ckpt")
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["epoch"] for r in log] == [0, 0, 0, 1]
    for r in log:
        assert tuple(r) == LOG_KEYS
        assert all(np.isfinite(r[k]) for k in LOG_KEYS)
        np.testing.assert_allclose(r["loss"], sum(r[f"loss_b{k}"] for k in range(4)), rtol=1e-5)
    # lr of optimizer step s: warmup over one epoch (3 steps) from 0 to 1e-3, then cosine
    np.testing.assert_allclose([r["lr"] for r in log[:3]], [0.0, 1e-3 / 3, 2e-3 / 3], rtol=1e-12)
    np.testing.assert_allclose(log[3]["lr"], 1e-3, rtol=1e-12)
    assert runs["straight"]["loss"] == pytest.approx(log[-1]["loss"], rel=1e-6)
    from localmim.core.config import load_config
    assert load_config(os.path.join(out, "config.yaml")).model.name == "vit_tiny_test"


def test_checkpoint_has_canonical_names_and_optimizer_state(runs):
    path = runs["straight"]["checkpoint"]
    raw = ms.load_checkpoint(path)
    model = build_model(runs_spec())
    shapes = model.state_shapes()
    model_keys = {k for k in raw if not k.startswith(("optim.", "meta.", "scaler."))}
    assert model_keys == set(shapes)
    for k, shape in shapes.items():
        assert tuple(raw[k].shape) == shape, k
    trainable = [p.name for p in model.trainable_params()]
    for name in trainable:
        assert f"optim.exp_avg.{name}" in raw and f"optim.exp_avg_sq.{name}" in raw
    assert int(raw["optim.state_step"].asnumpy().reshape(-1)[0]) == 4
    payload = ckpt.load_checkpoint(path)
    assert payload["step"] == 4 and payload["epoch"] == 1
    assert payload["config"]["model"]["name"] == "vit_tiny_test" and payload["scaler"] is None
    # an optimizer moment is a real running average, not zeros
    assert np.abs(payload["optimizer"]["exp_avg_sq.blocks.0.attn.qkv.weight"]).max() > 0


def runs_spec():
    cfg = PretrainConfig()
    cfg.train.compile = False  # PyNative: no compile time for a few tiny steps
    cfg.model.name = "vit_tiny_test"
    return cfg.build_spec()


def test_resume_reproduces_uninterrupted_run(runs):
    assert runs["first"]["step"] == 2
    assert runs["files_after_first"] == ["checkpoint-2.ckpt", "config.yaml", "log.jsonl"]
    assert [r["step"] for r in runs["log_after_first"]] == [1, 2]
    assert runs["resumed"]["step"] == 4
    a = ckpt.load_checkpoint(runs["straight"]["checkpoint"])
    b = ckpt.load_checkpoint(runs["resumed"]["checkpoint"])
    assert sorted(a["model"]) == sorted(b["model"])
    for k in a["model"]:
        np.testing.assert_allclose(b["model"][k], a["model"][k], rtol=0, atol=1e-6, err_msg=k)
    for k in a["optimizer"]:
        np.testing.assert_allclose(b["optimizer"][k], a["optimizer"][k], rtol=0, atol=1e-6, err_msg=k)
    la, lb = _log(runs["straight"]["output_dir"]), _log(runs["resumed"]["output_dir"])
    assert len(la) == len(lb) == 4
    for ra, rb in zip(la, lb):
        for key in LOSS_KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-12), (ra["step"], key)
    # training did something: the loss moved and the weights changed from their initial values
    assert la[0]["loss"] != la[-1]["loss"]


def test_rerun_after_the_end_does_nothing(runs):
    before = os.path.getmtime(runs["resumed"]["checkpoint"])
    again = engine.run_pretrain(_cfg(runs["data"], runs["resumed"]["output_dir"], 4))
    assert again["step"] == 4 and again["checkpoint"] == runs["resumed"]["checkpoint"]
    assert again["loss"] == pytest.approx(runs["resumed"]["loss"], rel=1e-6)
    assert os.path.getmtime(runs["resumed"]["checkpoint"]) == before


def test_inference_helpers_reload_the_checkpoint(runs):
    model, spec = inference.load_model(runs["straight"]["checkpoint"])
    assert spec.name == "vit_tiny_test"
    state = ckpt.load_checkpoint(runs["straight"]["checkpoint"])["model"]
    exported = model.export_state()
    for k in state:
        np.testing.assert_array_equal(exported[k], state[k])
    images = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    m = masking.vit_mask(masking.mask_rng(0, 0, 0, 0), 2, spec.num_patches, 0.75)
    out = inference.reconstruct(model, images, m)
    grids = [b.grid for b in spec.branches()]
    for k, g in enumerate(grids):
        assert out["preds"][k].shape == out["targets"][k].shape == (2, g * g, spec.out_dims()[k])
        assert out["masks"][k].shape == (2, g * g)
    # the model's own loss equals the masked MSE of what reconstruct returns
    loss, _ = model(ms.Tensor(images), {k: ms.Tensor(v) for k, v in m.as_dict().items()})
    ref = sum(float((((p - t) ** 2).mean(-1) * mk).sum() / mk.sum())
              for p, t, mk in zip(out["preds"], out["targets"], out["masks"]))
    assert float(loss.asnumpy()) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match=r"do not fit model vit_tiny_test"):
        inference.reconstruct(model, images[:, :, :16, :16], m)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    data_path = _images(tmp_path / "data")
    original = data_mod.MaskCollate.__call__

    def poisoned(self, items):
        batch = original(self, items)
        if items[0][2] == 1:  # the second micro-batch of the run
            batch["images"] = np.full_like(batch["images"], np.nan)
        return batch

    monkeypatch.setattr(data_mod.MaskCollate, "__call__", poisoned)
    out = tmp_path / "run"
    with pytest.raises(engine.NonFiniteLossError, match=r"non-finite loss at step 2 .*checkpoint-1\.ckpt"):
        engine.run_pretrain(_cfg(data_path, out, 3, save_every_steps=1))
    assert sorted(os.listdir(out)) == ["checkpoint-1.ckpt", "config.yaml", "log.jsonl"]
    payload = ckpt.load_checkpoint(str(out / "checkpoint-1.ckpt"))
    assert payload["step"] == 1 and all(np.isfinite(v).all() for v in payload["model"].values())
    assert [r["step"] for r in _log(out)] == [1]


def test_precision_and_device_errors():
    assert engine.resolve_precision("auto", "CPU") == "fp32"
    assert engine.resolve_precision("auto", "Ascend") == "fp16"  # MindSpore's recipes: fp16, O2
    assert engine.resolve_precision("fp16", "CPU") == "fp16"
    with pytest.raises(ValueError, match="'bf16' is not supported by MindSpore on CPU"):
        engine.resolve_precision("bf16", "CPU")
    with pytest.raises(ValueError, match="train.precision 'fp8'"):
        engine.resolve_precision("fp8", "CPU")
    assert engine.make_loss_scaler(None, "fp32") is None
    scaler = engine.make_loss_scaler(None, "fp16")
    assert float(scaler.scale_value.asnumpy()) == 2.0 ** 16


def test_optimizer_groups_and_state_round_trip():
    cfg = PretrainConfig()
    cfg.train.compile = False  # PyNative: no compile time for a few tiny steps
    cfg.model.name = "vit_tiny_test"
    model = build_model(cfg.build_spec())
    opt = engine.build_optimizer(model, cfg)
    names = {g["name"]: [p.name for p in g["params"]] for g in opt.param_groups}
    assert set(names) == {"decay", "no_decay"}
    assert "cls_token" in names["decay"] and "decoder.0.mask_token" in names["decay"]
    assert "blocks.0.attn.qkv.bias" in names["no_decay"] and "norm.0.weight" in names["no_decay"]
    assert all("pos_embed" not in n and not n.startswith("hog_enc") for ns in names.values() for n in ns)
    engine.set_lr(opt, 0.25)
    assert [float(lr.asnumpy()) for lr in opt.lrs] == [0.25, 0.25]
    state = engine.optimizer_state(opt)
    state["exp_avg.cls_token"] = np.full((1, 1, 32), 0.5, np.float32)
    state["state_step"] = np.array(7, np.int32)
    engine.load_optimizer_state(opt, state)
    assert float(engine.optimizer_state(opt)["exp_avg.cls_token"].max()) == 0.5
    assert int(opt.state_step.asnumpy()) == 7
    del state["exp_avg_sq.cls_token"]
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys \['exp_avg_sq.cls_token'\]"):
        engine.load_optimizer_state(opt, state, "x.ckpt")


def test_set_lr_reaches_the_compiled_update():
    """Changing the lr between steps changes the AdamW update (MindSpore 2.10 ignores set_data here)."""
    cfg = PretrainConfig()
    cfg.train.compile = False  # PyNative: no compile time for a few tiny steps
    cfg.model.name = "vit_tiny_test"
    cfg.optim.weight_decay = 0.0
    model = build_model(cfg.build_spec())
    opt = engine.build_optimizer(model, cfg)
    grads = ms.mutable(tuple(ms.Tensor(np.ones(p.shape, np.float32)) for p in opt.parameters))
    w0 = model.cls_token.asnumpy().copy()
    engine.set_lr(opt, 0.0)
    opt(grads)
    np.testing.assert_array_equal(model.cls_token.asnumpy(), w0)
    engine.set_lr(opt, 0.1)
    opt(grads)
    # constant unit gradients: m_hat = v_hat = 1 after bias correction, so each step moves by lr
    np.testing.assert_allclose(model.cls_token.asnumpy(), w0 - 0.1, atol=1e-6)


def _torch_adamw_reference(params, grads_per_step, lrs, groups, betas, eps):
    """torch.optim.AdamW's formula in float64 numpy: params, exp_avg, exp_avg_sq after the steps.
    groups: per parameter (weight_decay, lr_scale)."""
    p = [x.astype(np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    b1, b2 = betas
    for t, (lr, grads) in enumerate(zip(lrs, grads_per_step), start=1):
        for i, (g, (wd, scale)) in enumerate(zip(grads, groups)):
            step_lr = lr * scale
            p[i] = p[i] * (1.0 - step_lr * wd)
            m[i] = b1 * m[i] + (1.0 - b1) * g
            v[i] = b2 * v[i] + (1.0 - b2) * g * g
            denom = np.sqrt(v[i]) / np.sqrt(1.0 - b2 ** t) + eps
            p[i] = p[i] - step_lr / (1.0 - b1 ** t) * m[i] / denom
    return p, m, v


def test_fused_adamw_matches_torch_adamw_formula():
    """LocalAdamW (one AdamWeightDecay kernel per parameter, bias correction folded into its
    scalars) against torch's AdamW in float64: two groups (decay / no decay, lr_scale 1 / 0.5),
    lr changed every step, gradients from 1e-4 to 1, 5 compiled steps."""
    rng = np.random.default_rng(3)
    shapes = [(24, 16), (16,), (1, 1, 16), (3,)]
    groups = [(0.05, 1.0), (0.05, 1.0), (0.0, 0.5), (0.0, 0.5)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[(rng.standard_normal(s) * 10 ** rng.uniform(-4, 0)).astype(np.float32) for s in shapes]
             for _ in range(5)]
    lrs = [1.5e-3, 1e-3, 2e-4, 1e-3, 5e-4]
    betas, eps = (0.9, 0.95), 1e-8
    params = [ms.Parameter(ms.Tensor(x.copy()), name=f"p{i}") for i, x in enumerate(init)]
    opt = engine.LocalAdamW([{"params": params[:2], "weight_decay": 0.05, "lr": 0.0, "lr_scale": 1.0},
                             {"params": params[2:], "weight_decay": 0.0, "lr": 0.0, "lr_scale": 0.5}],
                            lr=0.0, betas=betas, eps=eps)

    @ms.jit
    def update(g):
        return opt(g)
    for lr, g in zip(lrs, grads):
        engine.set_lr(opt, lr)
        update(ms.mutable(tuple(ms.Tensor(x) for x in g)))
    want_p, want_m, want_v = _torch_adamw_reference(init, grads, lrs, groups, betas, eps)
    state = engine.optimizer_state(opt)
    assert int(state["state_step"]) == 5
    for i, p in enumerate(params):
        got = p.asnumpy()
        assert np.abs(want_p[i] - init[i]).max() > 1e-4  # the steps moved it (1000x the tolerance)
        np.testing.assert_allclose(got, want_p[i], rtol=1e-6, atol=1e-7, err_msg=p.name)
        np.testing.assert_allclose(state[f"exp_avg.{p.name}"], want_m[i], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(state[f"exp_avg_sq.{p.name}"], want_v[i], rtol=1e-5, atol=1e-15)
    with pytest.raises(ValueError, match="amsgrad"):
        engine.LocalAdamW(params, lr=0.0, amsgrad=True)


def test_fp16_with_loss_scaler_trains_close_to_fp32_and_saves_scaler(tmp_path):
    data_path = _images(tmp_path / "data")
    cfg = _cfg(data_path, tmp_path / "fp16", 2, precision="fp16")
    cfg.optim.warmup_epochs = 0
    result = engine.run_pretrain(cfg)
    payload = ckpt.load_checkpoint(result["checkpoint"])
    scaler = payload["scaler"]
    assert scaler["scale_value"].shape == () and float(scaler["scale_value"]) == 2.0 ** 16
    assert int(scaler["counter"]) == 2
    assert all(v.dtype == np.float32 for v in payload["model"].values())
    log = _log(tmp_path / "fp16")
    # step 1 runs the initial weights: fp16 matmuls move the loss only slightly from fp32
    loader, sampler = data_mod.build_pretrain_loader(cfg, cfg.build_spec())
    sampler.set_epoch(0, 0, 1)
    batch = next(iter(loader))
    ms.set_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    ref_model = build_model(cfg.build_spec())
    loss32, _ = ref_model(*engine.batch_inputs(batch))
    assert log[0]["loss"] == pytest.approx(float(loss32.asnumpy()), rel=2e-3)
    assert log[0]["loss"] != float(loss32.asnumpy())  # it did run in fp16
    assert int(scaler["skipped_steps"]) == 0


def test_accumulation_and_clipping_resume_mid_epoch(tmp_path):
    """accum_iter 2 (batch 2) with clip_grad: 2 steps straight equal 1 step, then a rerun to 2."""
    data_path = _images(tmp_path / "data")

    def cfg(out, steps):
        c = _cfg(data_path, out, steps)
        c.data.batch_size = 2
        c.optim.accum_iter = 2
        c.optim.clip_grad = 0.05
        c.optim.warmup_epochs = 0
        return c

    straight = engine.run_pretrain(cfg(tmp_path / "a", 2))
    engine.run_pretrain(cfg(tmp_path / "b", 1))
    resumed = engine.run_pretrain(cfg(tmp_path / "b", 2))
    a, b = ckpt.load_checkpoint(straight["checkpoint"]), ckpt.load_checkpoint(resumed["checkpoint"])
    assert a["step"] == b["step"] == 2 and a["epoch"] == 0  # 6 micro-batches = 3 steps per epoch
    for k in a["model"]:
        np.testing.assert_allclose(b["model"][k], a["model"][k], rtol=0, atol=1e-6, err_msg=k)
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    for ra, rb in zip(la, lb):
        for key in LOSS_KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-12), (ra["step"], key)


def test_clip_grad_bounds_the_global_norm():
    cfg = PretrainConfig()
    cfg.train.compile = False  # PyNative: no compile time for a few tiny steps
    cfg.model.name = "vit_tiny_test"
    model = build_model(cfg.build_spec())
    opt = engine.build_optimizer(model, cfg)
    grads = ms.mutable(tuple(ms.Tensor(np.full(p.shape, 0.5, np.float32)) for p in opt.parameters))
    clipped, finite = engine.TrainStep(model, opt, accum=1, clip_grad=0.05)._finish(grads)
    norm = np.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in clipped))
    assert norm == pytest.approx(0.05, rel=1e-5) and bool(finite.asnumpy())
    small = ms.mutable(tuple(ms.Tensor(np.full(p.shape, 1e-6, np.float32)) for p in opt.parameters))
    unclipped, _ = engine.TrainStep(model, opt, accum=1, clip_grad=0.05)._finish(small)
    np.testing.assert_allclose(unclipped[0].asnumpy(), 1e-6, rtol=1e-6)


def test_compiled_step_matches_pynative(runs, tmp_path):
    """train.compile (ms.jit) gives the PyNative run's losses and weights."""
    jit = engine.run_pretrain(_cfg(runs["data"], tmp_path / "jit", 3, compile=True))
    la, lj = _log(runs["straight"]["output_dir"])[:3], _log(tmp_path / "jit")
    for ra, rj in zip(la, lj):
        for key in LOSS_KEYS:
            assert rj[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-12), (ra["step"], key)
    a = ckpt.load_checkpoint(os.path.join(runs["straight"]["output_dir"], "checkpoint-3.ckpt"))
    b = ckpt.load_checkpoint(jit["checkpoint"])
    for k in a["model"]:
        x, y = b["model"][k], a["model"][k]
        if k.endswith("attn.qkv.bias"):
            # the key bias has an exactly-zero gradient (softmax is shift invariant), so AdamW's
            # m / sqrt(v) turns rounding noise into lr-sized steps: compare the q and v thirds only
            d = x.shape[0] // 3
            x, y = np.concatenate([x[:d], x[2 * d:]]), np.concatenate([y[:d], y[2 * d:]])
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=k)


def test_resume_with_a_changed_config_warns(tmp_path):
    """Resuming with settings that change the numbers says which ones (as the torch engine does)."""
    data_path = _images(tmp_path / "data")
    engine.run_pretrain(_cfg(data_path, tmp_path / "run", 1))
    cfg = _cfg(data_path, tmp_path / "run", 2)
    cfg.optim.lr = 2e-3
    with pytest.warns(RuntimeWarning, match=r"different config: optim.lr \(0.001 -> 0.002\)"):
        engine.run_pretrain(cfg)


@pytest.mark.parametrize("compile", [False, True])
def test_step_makes_no_host_round_trip_per_micro_batch(tmp_path, monkeypatch, compile):
    """The accelerator path (no per-step CPU check): with accumulation 2 over 4 optimizer steps and
    a log line every 2 steps, the step object reads no Tensor back to the host once its graphs are
    compiled (the first step: compilation reads constants), and the loss rows are fetched once per
    log line, two steps at a time."""
    cfg = _cfg(_images(tmp_path / "data"), tmp_path / "run", 4, log_every=2, compile=compile)
    cfg.data.batch_size, cfg.optim.accum_iter = 2, 2
    monkeypatch.setattr(loop, "CHECK_EVERY_STEP_ON_CPU", False)
    reads = {"total": 0}
    for name in ("asnumpy", "item", "tolist"):
        real_read = getattr(ms.Tensor, name)

        def counted(self, *args, _real=real_read, **kwargs):
            reads["total"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(ms.Tensor, name, counted)
    reads_per_call = []
    for name in ("micro", "apply"):
        real_call = getattr(engine.TrainStep, name)

        def watched(self, *args, _real=real_call, _name=name, **kwargs):
            before = reads["total"]
            out = _real(self, *args, **kwargs)
            reads_per_call.append((_name, reads["total"] - before))
            return out
        monkeypatch.setattr(engine.TrainStep, name, watched)
    fetched = []
    real_gather = engine.TrainStep.gather
    monkeypatch.setattr(engine.TrainStep, "gather", staticmethod(lambda rows: fetched.append(len(rows))
                                                                 or real_gather(rows)))
    result = engine.run_pretrain(cfg)
    assert result["step"] == 4 and np.isfinite(result["loss"])
    assert [n for n, _ in reads_per_call] == ["micro", "micro", "apply"] * 4
    assert [r for _, r in reads_per_call[3:]] == [0] * 9  # steps 2-4
    assert fetched == [2, 2]  # the log lines of steps 2 and 4; the final checkpoint finds nothing pending
    assert [r["step"] for r in _log(tmp_path / "run")] == [2, 4]
