"""MindSpore mixed precision and loss scaling (backends/mindspore/amp.py, engine.TrainStep).

The graph-mode step is compiled with MindSpore's IR dump on and the dtypes of its operators are
read from the frontend graph (the `validate` pass: what the backend of any device receives), so the
casts checked here are the ones an Ascend run compiles; on CPU, bf16 then stops at kernel
selection (no bf16 MatMul kernel), after that graph is written. The scaler tests force an
overflow with a huge loss scale and check that the update is skipped bit for bit.
"""
import glob
import json
import os
import re

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from localmim.backends.mindspore import amp as ms_amp  # noqa: E402
from localmim.backends.mindspore import build_model, engine  # noqa: E402
from localmim.backends.mindspore import checkpoint as ckpt  # noqa: E402
from localmim.core.config import PretrainConfig  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402
from localmim.tools.bench import synthetic_batches  # noqa: E402

_NODE = re.compile(r"^\s+%\d+\([^)]*\) = PrimFunc_(\w+)\(")
_TYPES = re.compile(r"Tensor\[(\w+)\]")


def graph_ops(ir_path):
    """[(op, input and output tensor dtypes, source files of its trace)] of one IR dump."""
    nodes, current = [], None
    with open(ir_path, errors="replace") as f:
        for line in f:
            m = _NODE.match(line)
            if m:
                current = [m.group(1), None, set()]
                nodes.append(current)
            elif current is not None and current[1] is None and line.strip().startswith(": ("):
                current[1] = _TYPES.findall(line)
            elif current is not None and "# In file " in line:
                current[2].add(os.path.basename(line.split("# In file ")[1].split(":")[0]))
    return [(op, types or [], files) for op, types, files in nodes]


def compile_step_graph(tmp_path, precision, level="O2", name="vit_tiny_test"):
    """Build the engine's graph-mode step for `precision` / `level`, compile one micro-batch with the
    IR dump on -> (ops of the frontend graph, the error of the CPU backend or None, the step)."""
    spec = get_spec(name)
    ms.set_seed(0)
    model = build_model(spec)
    ms_amp.apply_mixed_precision(model, precision, level)
    opt = engine.build_optimizer(model, PretrainConfig())
    step = engine.TrainStep(model, opt, accum=1, scaler=ms_amp.make_loss_scaler(None, precision), use_jit=True)
    batch = synthetic_batches(spec, 2, 0.75, count=1)[0]
    dump = tmp_path / f"ir_{precision}_{level}"
    ms.set_context(save_graphs=1, save_graphs_path=str(dump))
    error = None
    try:
        step.micro(batch)
    except (TypeError, RuntimeError) as e:
        error = e
    finally:
        ms.set_context(save_graphs=0)
    found = sorted(glob.glob(str(dump / "**" / "*_validate_*.ir"), recursive=True))
    assert found, f"no validate graph dumped in {dump}"
    return graph_ops(found[-1]), error, step


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_graph_mode_step_casts_matmuls_low_and_keeps_norms_softmax_targets_loss_fp32(tmp_path, precision):
    low = {"fp16": "Float16", "bf16": "BFloat16"}[precision]
    ops_, error, step = compile_step_graph(tmp_path, precision)
    if precision == "fp16":
        assert error is None  # fp16 runs on CPU
        assert step._row.dtype == ms.float32 and all(g.dtype == ms.float32 for g in step._grads)
    else:
        assert error is not None and ("BFloat16" in str(error) or "Unsupported data type" in str(error)), error

    def dtypes(op_names, files=None):
        sel = [t for op, t, f in ops_ if op in op_names and (files is None or f & files)]
        assert sel, f"no {op_names} in the graph"
        return sel

    # every LayerNorm and softmax, forward and backward, computes in float32
    for types in dtypes({"LayerNorm", "LayerNormGrad", "Softmax", "SoftmaxBackward"}):
        assert set(types) == {"Float32"}, types
    # every projection and attention product of the encoder and decoders runs in the low dtype
    matmuls = dtypes({"MatMul", "BatchMatMul"}, {"layers.py"})
    assert all(set(t) == {low} for t in matmuls), [t for t in matmuls if set(t) != {low}][:3]
    assert len(matmuls) >= 3 * (4 * 6 + 4)  # forward + 2 gradients of 6 per block, 4 heads at least
    # the targets and the loss (backends/mindspore/targets.py) see float32 only
    target_ops = [(op, t) for op, t, f in ops_ if "targets.py" in f and t]
    assert len(target_ops) > 50
    assert all(set(t) <= {"Float32", "Int64", "Int32", "Bool"} for _, t in target_ops), \
        [x for x in target_ops if not set(x[1]) <= {"Float32", "Int64", "Int32", "Bool"}][:3]


def test_amp_levels_mark_the_cells_and_keep_parameter_names():
    spec = get_spec("swin_tiny_test")
    for level, expect in [
        ("O1", {"encoder.patch_embed": "float16", "encoder.patch_embed.norm": "float32",
                "encoder.layers.0.blocks.0.attn.qkv": "float16",
                "encoder.layers.0.blocks.0.norm1": None, "encoder.layers.0.blocks.0.attn.softmax": None}),
        ("O2", {"encoder.layers.0.blocks.0.attn.qkv": "float16", "encoder.layers.0.blocks.0.norm1": "float32",
                "encoder.layers.0.blocks.0.attn.softmax": "float32", "encoder.norm.0": "float32",
                "decoder.0.blocks.0.mlp.fc1": "float16", "decoder.0.norm": "float32"}),
        ("O3", {"encoder.layers.0.blocks.0.attn.qkv": "float16", "encoder.layers.0.blocks.0.norm1": "float16",
                "encoder.layers.0.blocks.0.attn.softmax": "float16"}),
    ]:
        model = build_model(spec)
        before = {n: s for n, s in model.state_shapes().items()}
        values = model.export_state()
        ms_amp.apply_mixed_precision(model, "fp16", level)
        assert model.state_shapes() == before
        after = model.export_state()
        assert all(np.array_equal(after[k], values[k]) for k in values)
        marks = ms_amp.cell_dtypes(model)
        for path, dtype in expect.items():
            assert marks.get(path) == dtype, (level, path, marks.get(path))
        # nothing outside the encoder and decoders is marked: targets and the loss stay float32
        assert all(p.startswith(("encoder", "decoder")) for p in marks), level


def test_precision_level_and_scale_choices():
    assert ms_amp.resolve_precision("auto", "Ascend") == "fp16"
    assert ms_amp.resolve_precision("auto", "CPU") == "fp32"
    assert ms_amp.resolve_amp_level(None, "fp16") == "O2" and ms_amp.resolve_amp_level(None, "fp32") == "O0"
    with pytest.raises(ValueError, match="train.amp_level O2 casts to a low precision, but train.precision is fp32"):
        ms_amp.resolve_amp_level("O2", "fp32")
    with pytest.raises(ValueError, match="'bf16' is not supported by MindSpore on CPU"):
        ms_amp.resolve_precision("bf16", "CPU")
    static = ms_amp.make_loss_scaler(1024.0, "fp16")
    assert isinstance(static, ms.amp.StaticLossScaler) and float(static.scale_value.asnumpy()) == 1024.0
    dynamic = ms_amp.make_loss_scaler(None, "fp16")
    assert isinstance(dynamic, ms.amp.DynamicLossScaler) and float(dynamic.scale_value.asnumpy()) == 2.0 ** 16
    assert (dynamic.scale_factor, dynamic.scale_window) == (2, 2000)
    assert ms_amp.make_loss_scaler(None, "bf16") is None and ms_amp.make_loss_scaler(None, "fp32") is None
    assert isinstance(ms_amp.make_loss_scaler("dynamic", "fp32"), ms.amp.DynamicLossScaler)


# ---------------------------------------------------------------------------------------- the scaler
@pytest.fixture(scope="module")
def scaled_step():
    """A graph-mode fp32 step of the tiny ViT with a dynamic scaler (factor 2, window 3), and batches."""
    spec = get_spec("vit_tiny_test")
    ms.set_seed(1)
    model = build_model(spec)
    opt = engine.build_optimizer(model, PretrainConfig())
    scaler = ms.amp.DynamicLossScaler(scale_value=4.0, scale_factor=2, scale_window=3)
    step = engine.TrainStep(model, opt, accum=1, scaler=scaler, use_jit=True)
    step.set_lr(1e-3)
    return step, synthetic_batches(spec, 2, 0.75, count=4)


def _snapshot(step):
    return step.model.export_state(), engine.optimizer_state(step.optimizer)


def _scale(step):
    return float(step.scaler.scale_value.asnumpy()), int(step.scaler.counter.asnumpy())


def test_dynamic_scaler_grows_after_its_window_and_halves_and_skips_on_overflow(scaled_step):
    step, batches = scaled_step
    ms.ops.assign(step.scaler.scale_value, ms.Tensor(4.0, ms.float32))
    ms.ops.assign(step.scaler.counter, ms.Tensor(0, ms.int32))
    skipped0 = step.skipped_steps()
    for i, expect in enumerate([(4.0, 1), (4.0, 2), (8.0, 0), (8.0, 1)]):
        before = _snapshot(step)[0]
        step.micro(batches[i])
        step.apply()
        assert _scale(step) == expect, i
        assert any(not np.array_equal(before[k], v) for k, v in step.model.export_state().items())
    assert step.skipped_steps() == skipped0

    # overflow: a scale of 2**127 turns the scaled gradients infinite
    ms.ops.assign(step.scaler.scale_value, ms.Tensor(2.0 ** 127, ms.float32))
    model_before, opt_before = _snapshot(step)
    step.micro(batches[0])
    row = step.apply()
    assert np.isfinite(row.asnumpy()).all()          # the loss itself is fine; only its gradients overflow
    assert _scale(step) == (2.0 ** 126, 0)           # halved, good-step counter reset
    assert step.skipped_steps() == skipped0 + 1
    model_after, opt_after = _snapshot(step)
    for k in model_before:
        np.testing.assert_array_equal(model_after[k], model_before[k], err_msg=k)
    for k in opt_before:                              # moments and state_step untouched
        np.testing.assert_array_equal(opt_after[k], opt_before[k], err_msg=k)
    assert step.log_fields() == {"skipped_steps": skipped0 + 1}


def test_scaler_state_round_trip():
    scaler = ms.amp.DynamicLossScaler(scale_value=2.0 ** 16, scale_factor=2, scale_window=2000)
    ms.ops.assign(scaler.scale_value, ms.Tensor(512.0, ms.float32))
    ms.ops.assign(scaler.counter, ms.Tensor(17, ms.int32))
    state = ms_amp.scaler_state(scaler, skipped_steps=3)
    assert {k: float(v) for k, v in state.items()} == {"scale_value": 512.0, "counter": 17.0, "scale_factor": 2.0,
                                                       "scale_window": 2000.0, "skipped_steps": 3.0}
    fresh = ms_amp.make_loss_scaler("dynamic", "fp16")
    assert ms_amp.load_scaler_state(fresh, state) == 3
    assert float(fresh.scale_value.asnumpy()) == 512.0 and int(fresh.counter.asnumpy()) == 17
    static = ms_amp.make_loss_scaler(1024.0, "fp16")
    assert set(ms_amp.scaler_state(static)) == {"scale_value", "skipped_steps"}
    with pytest.raises(ValueError, match="scaler state has no scale_value"):
        ms_amp.load_scaler_state(fresh, {"counter": np.array(1)}, "x.ckpt")


def _run_cfg(data, out, steps):
    cfg = PretrainConfig()
    cfg.train.compile = False  # PyNative: the same Python control flow, no compile time
    cfg.model.name = "vit_tiny_test"
    cfg.data.path = data
    cfg.data.batch_size = 4
    cfg.data.num_workers = 0
    cfg.optim.lr = 1e-3
    cfg.optim.epochs = 4
    cfg.optim.warmup_epochs = 0
    cfg.train.seed = 2
    cfg.train.device = "cpu"
    cfg.train.output_dir = str(out)
    cfg.train.max_steps = steps
    cfg.train.log_every = 1
    cfg.train.progress = False
    cfg.train.loss_scale = "dynamic"
    return cfg


def test_dynamic_scaler_state_resumes_exactly(tmp_path, monkeypatch, sample_dir):
    """Scale 2**127, factor 2, window 2 on the sample photographs: the first steps overflow and are
    skipped, later ones grow the scale again; 5 steps straight and 2 + a resumed 3 end with the same
    weights, scaler state and skip count."""
    monkeypatch.setattr(ms_amp, "DYNAMIC_SCALE_INIT", 2.0 ** 127)
    monkeypatch.setattr(ms_amp, "DYNAMIC_SCALE_WINDOW", 2)
    straight = engine.run_pretrain(_run_cfg(sample_dir, tmp_path / "a", 5))
    engine.run_pretrain(_run_cfg(sample_dir, tmp_path / "b", 2))
    first = ckpt.load_checkpoint(str(tmp_path / "b" / "checkpoint-2.ckpt"))
    resumed = engine.run_pretrain(_run_cfg(sample_dir, tmp_path / "b", 5))
    a, b = ckpt.load_checkpoint(straight["checkpoint"]), ckpt.load_checkpoint(resumed["checkpoint"])
    assert int(first["scaler"]["skipped_steps"]) >= 1  # the resume starts with skips behind it
    sa, sb = a["scaler"], b["scaler"]
    assert sorted(sa) == sorted(sb) == ["counter", "scale_factor", "scale_value", "scale_window", "skipped_steps"]
    for k in sa:
        assert float(sa[k]) == float(sb[k]), k
    assert 1 <= int(sa["skipped_steps"]) < 5 and float(sa["scale_value"]) < 2.0 ** 127
    for k in a["model"]:
        np.testing.assert_array_equal(a["model"][k], b["model"][k], err_msg=k)
    for k in a["optimizer"]:
        np.testing.assert_array_equal(a["optimizer"][k], b["optimizer"][k], err_msg=k)
    with open(tmp_path / "a" / "log.jsonl") as f, open(tmp_path / "b" / "log.jsonl") as g:
        la, lb = [json.loads(x) for x in f], [json.loads(x) for x in g]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
