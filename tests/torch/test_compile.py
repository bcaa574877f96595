"""torch.compile of the training step (engine.compile_forward): the whole forward + loss is one
graph (fullgraph=True: any graph break is an error) for ViT with HOG (9 bins; 18 bins with the
per-scale biases) and pixel targets and for Swin, and the compiled step gives the eager step's
numbers in float32 (relative error per tensor, docs/method.md#parity-contract): the losses of two
AdamW steps (the second after the compiled update) and the gradients of the first within 1e-5
(the key third of each qkv bias, whose true gradient is zero, excluded: it is rounding noise).
Parameters go through AdamW, which divides each gradient by its own magnitude, so an element whose
gradient is ~1e-8 turns the ~1e-9 difference of two correct implementations into a step ~3% of
lr off (measured on blocks.0.mlp.fc1.bias); after two steps every element must be within 0.1 lr of
the eager one (a wrong update is ~lr off; the key biases within 2 lr per step) and every
weight matrix within 1e-4 relative.

Inductor's C++ compilation is slow on a CPU (about 100 CPU-seconds for one model's forward and
backward, cached in the inductor cache afterwards), so the full inductor step runs for the main
recipe's model (ViT, HOG) and the other targets compile with fullgraph=True through AOTAutograd
(`aot_eager`: the same captured forward and backward graphs, run without code generation).
"""
import pytest
import torch

from localmim.backends.torch import build_model, engine
from localmim.core.config import PretrainConfig
from localmim.core.specs import TargetSpec, get_spec
from localmim.tools import bench

LR = 1e-3


def _batches(spec, batch=2, count=2, static=False):
    return [{"images": torch.from_numpy(b["images"]), "masks": {k: torch.from_numpy(v) for k, v in b["masks"].items()}}
            for b in bench.synthetic_batches(spec, batch, 0.75, count, static=static)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _assert_grads_close(got, ref):
    for k, b in ref.items():
        a = got[k]
        if k.endswith("attn.qkv.bias"):
            n = b.numel() // 3
            a, b = torch.cat([a[:n], a[2 * n:]]), torch.cat([b[:n], b[2 * n:]])
        assert _rel(a, b) <= 1e-5, (k, _rel(a, b))


def _assert_params_close(got, ref, steps=2):
    for k, b in ref.items():
        a = got[k].clone()
        if k.endswith("attn.qkv.bias"):  # the key third: noise steps of up to lr each
            n = b.numel() // 3
            assert (a[n:2 * n] - b[n:2 * n]).abs().max().item() <= 2 * LR * steps, k
            a[n:2 * n] = b[n:2 * n]
        assert (a - b).abs().max().item() <= 0.1 * LR, k
        if b.ndim >= 2:
            assert _rel(got[k], b) <= 1e-4, (k, _rel(got[k], b))


def _run(stepper, model, spec, static=False):
    """Two AdamW steps -> (loss rows (2, 5), gradients of step 1, state after step 2)."""
    stepper.set_lr(LR)
    rows, grads = [], None
    for batch in _batches(spec, count=2, static=static):
        stepper.micro(batch)
        if grads is None:
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        rows.append(stepper.apply())
    return torch.stack(rows), grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _eager_step(spec):
    torch.manual_seed(0)
    model = build_model(spec)
    stepper = engine.TrainStep(model, engine.build_optimizer(model, PretrainConfig()), accum=1, precision="fp32",
                               device=torch.device("cpu"))
    return model, stepper


def _assert_same_training(got, ref):
    (rows, grads, state), (ref_rows, ref_grads, ref_state) = got, ref
    assert _rel(rows, ref_rows) <= 1e-5, (rows, ref_rows)
    _assert_grads_close(grads, ref_grads)
    _assert_params_close(state, ref_state)


def test_compiled_train_step_equals_the_eager_step():
    """engine.build_train_step with train.compile=true (inductor, fullgraph) against the eager TrainStep."""
    spec = get_spec("vit_tiny_test")
    torch._dynamo.reset()
    cfg = PretrainConfig()
    cfg.train.precision, cfg.train.compile = "fp32", True
    torch.manual_seed(0)
    model = build_model(spec)
    stepper = engine.build_train_step(cfg, model, torch.device("cpu"))
    assert isinstance(stepper.forward, torch._dynamo.eval_frame.OptimizedModule)
    got = _run(stepper, model, spec)
    ref = _run(*reversed(_eager_step(spec)), spec)
    _assert_same_training(got, ref)
    assert (ref[0][1, 0] - ref[0][0, 0]).abs().item() > 1e-3  # different batches, a real update


@pytest.mark.parametrize("name, overrides", [
    ("vit_tiny_test", {"img_size": 64, "target": TargetSpec(kind="hog", nbins=18, hog_bias=True)}),
    ("vit_tiny_test", {"target": TargetSpec(kind="pixel", norm_pix=True)}),
    ("swin_tiny_test", {}),
])
def test_forward_and_backward_compile_as_one_graph(name, overrides):
    """One static graph serves both batches (a recompile is an error): ViT masks always have one
    shape, and a compiled Swin step gets plans padded to static_plan_bounds, whose numbers are the
    eager step's on the natural plans."""
    spec = get_spec(name, **overrides)
    torch._dynamo.reset()
    model, stepper = _eager_step(spec)
    stepper.forward = torch.compile(stepper.net, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _run(stepper, model, spec, static=True)
    ref = _run(*reversed(_eager_step(spec)), spec)
    _assert_same_training(got, ref)


def test_compiled_swin_steps_get_static_plans(image_folder):
    """engine.build_loader with train.compile pads every Swin plan to static_plan_bounds, so two
    batches with different masks have the same shapes; eager training keeps the natural ones."""
    from localmim.core.config import config_from_dict
    from localmim.core.swin_plan import static_plan_bounds

    cfg = config_from_dict({"model": {"name": "swin_tiny_test"}, "train": {"seed": 2},  # masks of 2 shapes
                            "data": {"path": image_folder(n=8), "batch_size": 2, "num_workers": 0}})
    spec = cfg.build_spec()
    pads, sizes = static_plan_bounds(spec, cfg.mask.ratio)

    def group_shapes(compile):
        cfg.train.compile = compile
        loader, sampler = engine.build_loader(cfg, spec, torch.device("cpu"))
        sampler.set_epoch(0)
        return [tuple(b["masks"][f"stage{i}.win1.group_index"].shape for i in (0, 1)) for b in loader]

    assert group_shapes(True) == [((pads[0], sizes[0]), (pads[1], sizes[1]))] * 4
    natural = group_shapes(False)
    assert len(set(natural)) > 1 and all(s[0][0] < pads[0] for s in natural)


def test_train_step_passes_the_compile_options(monkeypatch):
    """train.compile_mode reaches torch.compile; static shapes for both families; fullgraph in one
    process, not under DDP (which splits the graph at its buckets)."""
    seen = []
    monkeypatch.setattr(engine.torch, "compile", lambda net, **kw: seen.append(kw) or net)
    cfg = PretrainConfig()
    cfg.train.compile, cfg.train.compile_mode = True, "reduce-overhead"
    engine.build_train_step(cfg, build_model(get_spec("vit_tiny_test")), torch.device("cpu"))
    cfg.train.compile_mode = "default"
    engine.build_train_step(cfg, build_model(get_spec("swin_tiny_test")), torch.device("cpu"))
    assert seen == [{"fullgraph": True, "mode": "reduce-overhead", "dynamic": False},
                    {"fullgraph": True, "mode": None, "dynamic": False}]
    net = torch.nn.Linear(2, 2)
    engine.compile_forward(net, "max-autotune", fullgraph=False)
    assert seen[-1] == {"fullgraph": False, "mode": "max-autotune", "dynamic": False}


def test_compile_mode_and_decode_are_validated_config_keys():
    from localmim.core.config import ConfigError, load_config
    cfg = load_config("demo_vit", ["train.compile_mode=max-autotune", "data.decode=gpu"])
    assert (cfg.train.compile_mode, cfg.data.decode) == ("max-autotune", "gpu")
    assert load_config("demo_vit").data.decode == "cpu"
    with pytest.raises(ConfigError, match="train.compile_mode = 'fast'"):
        load_config("demo_vit", ["train.compile_mode=fast"])
    with pytest.raises(ConfigError, match="data.decode = 'nvjpeg'"):
        load_config("demo_vit", ["data.decode=nvjpeg"])
