"""`localmim bench`: it runs the engine's TrainStep for both families, and its FLOPs count (the MFU
numerator) agrees with torch's own FLOP counter on the real forward + backward."""
import json

import pytest

torch = pytest.importorskip("torch")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from localmim.backends.torch import build_model  # noqa: E402
from localmim.core import masking  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402
from localmim.tools import bench  # noqa: E402


@pytest.mark.parametrize("model", ["vit_tiny_test", "swin_tiny_test"])
def test_bench_prints_one_json_line_with_throughput(capsys, monkeypatch, model):
    from localmim.backends.torch import engine
    applied = []
    real_apply = engine.TrainStep.apply
    monkeypatch.setattr(engine.TrainStep, "apply", lambda self: applied.append(1) or real_apply(self))
    assert bench.main(["--model", model, "--batch", "2", "--steps", "2", "--warmup", "1",
                       "--precision", "fp32", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == model and result["backend"] == "torch"
    assert result["images_per_s"] > 0 and result["step_time_s"] > 0
    assert result["loss"] == result["loss"]  # finite number, not NaN
    assert len(applied) == 3  # warmup + timed steps all went through the engine's TrainStep


def _linear_flops(tokens, fan_in, fan_out):
    return 2.0 * tokens * fan_in * fan_out


def _block_flops(tokens, dim, mlp_ratio):
    """Forward FLOPs of one pre-norm transformer block on one image's (tokens, dim)."""
    hidden = int(dim * mlp_ratio)
    return (_linear_flops(tokens, dim, 4 * dim) + _linear_flops(tokens, dim, hidden) + _linear_flops(tokens, hidden, dim)
            + 2 * 2.0 * tokens * tokens * dim)  # qkv + proj, the MLP, q k^T and attn v


def _head_flops(branch, out_dim, g):
    """Forward FLOPs of one rescaling head on a g x g decoder map (docs/method.md#vit-decoders)."""
    d = branch.decoder_dim
    if branch.scale == 4.0:   # ConvT d->d/2 (k2s2), ConvT d/2->d/4, 1x1 d/4->out
        return (_linear_flops(g * g, d, 2 * d) + _linear_flops(4 * g * g, d // 2, d)
                + _linear_flops(16 * g * g, d // 4, out_dim))
    if branch.scale == 2.0:
        return _linear_flops(g * g, d, 2 * d) + _linear_flops(4 * g * g, d // 2, out_dim)
    return _linear_flops(branch.grid ** 2, d, out_dim)


def analytic_vit_train_flops(spec, mask_ratio):
    """One image's training FLOPs derived by hand: 3x the forward's matmuls (the paper's
    convention), the decoders' heads as docs/method.md#vit-decoders builds them."""
    keep, g, p = masking.num_keep(spec.num_patches, mask_ratio), spec.grid, spec.patch_size
    fwd = _linear_flops(spec.num_patches, 3 * p * p, spec.embed_dim)
    fwd += spec.depth * _block_flops(1 + keep, spec.embed_dim, spec.mlp_ratio)
    for branch, out_dim in zip(spec.branches(), spec.out_dims()):
        d = branch.decoder_dim
        fwd += _linear_flops(1 + keep, spec.embed_dim, d) + branch.decoder_depth * _block_flops(1 + spec.num_patches, d,
                                                                                              spec.mlp_ratio)
        fwd += _head_flops(branch, out_dim, g)
    return 3.0 * fwd


def test_counted_vit_flops_match_the_hand_derived_count():
    spec = get_spec("vit_demo")
    counted = bench.counted_flops(spec, 0.75)
    ratio = analytic_vit_train_flops(spec, 0.75) / (counted["train_gflop_per_image"] * 1e9)
    # 3x forward slightly over-counts: the patch embedding needs no input gradient.
    assert 1.0 <= ratio <= 1.08, ratio
    parts = counted["forward_gflop_by_part"]
    assert parts["patch_embed"] == round(_linear_flops(spec.num_patches, 3 * spec.patch_size ** 2,
                                                       spec.embed_dim) / 1e9, 4)
    assert set(parts) == {"patch_embed", "blocks", "decoder.0", "decoder.1", "decoder.2", "decoder.3"}
    assert sum(parts.values()) == pytest.approx(counted["forward_gflop_per_image"], abs=1e-3)
    heads = [_head_flops(b, out, spec.grid) / 1e9 for b, out in zip(spec.branches(), spec.out_dims())]
    assert counted["forward_gflop_of_heads"] == {f"decoder.{i}.pred": round(h, 4) for i, h in enumerate(heads)}


@pytest.mark.parametrize("name", ["vit_demo", "swin_tiny_test"])
def test_counted_flops_on_fake_tensors_are_a_real_step_per_image(name):
    """The fake-tensor count (no compute) equals torch's counter on a real forward + backward of
    a batch of 2, per image."""
    spec = get_spec(name)
    counted = bench.counted_flops(spec, 0.75)
    model = build_model(spec)
    masks = {k: torch.from_numpy(v) for k, v in bench.mask_collate(spec, 0.75).mask_arrays(0, 0, 2).items()}
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(torch.randn(2, 3, spec.img_size, spec.img_size), masks)
        loss.backward()
    assert counted["train_gflop_per_image"] * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    if spec.family == "swin":
        assert {f"encoder.layers.{i}" for i in range(4)} <= set(counted["forward_gflop_by_part"])


def _args(argv):
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_end_to_end_runs_the_step_run_pretrain_runs(tmp_path, image_folder):
    """bench --data --end-to-end builds its step and loader with the engine's own functions: its
    first step's loss is run_pretrain's first logged loss on the same folder, seed and batch."""
    from localmim.backends.torch import engine
    folder = image_folder(n=6, size=40)
    args = _args(["--model", "vit_tiny_test", "--batch", "2", "--precision", "fp32", "--device", "cpu",
                  "--data", folder, "--end-to-end", "--workers", "0", "--steps", "1", "--warmup", "1", "--seed", "3"])
    cfg = bench.bench_config(args, "fp32")
    cfg.data.num_workers = 0
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.log_every = str(tmp_path / "run"), 1, 1
    cfg.train.device, cfg.train.progress = "cpu", False
    engine.run_pretrain(cfg)
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["loss"]
    bench_cfg = bench.bench_config(args, "fp32")
    bench_cfg.data.num_workers = 1  # another worker count: the same batches
    result = bench.bench_torch(bench.bench_spec(args), bench_cfg, "cpu", 1, 1, end_to_end=True)
    assert result["mode"] == "end_to_end" and 0.0 <= result["data_wait_share"] <= 1.0
    assert result["first_loss"] == pytest.approx(logged, rel=1e-6, abs=0)


def test_loader_mode_measures_the_loader_without_a_model(capsys, monkeypatch, image_folder):
    from localmim.backends import torch as torch_backend
    monkeypatch.setattr(torch_backend, "build_model", lambda spec: pytest.fail("the loader mode built a model"))
    folder = image_folder(n=8, size=48)
    assert bench.main(["--model", "vit_tiny_test", "--batch", "4", "--data", folder, "--workers", "0,1",
                       "--steps", "2", "--warmup", "1", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["workers"] for r in lines] == [0, 1]
    assert all(r["mode"] == "loader" and r["decode"] == "cpu" and r["images_per_s"] > 0 for r in lines)


def test_cpu_only_options_are_one_sentence_and_exit_2(capsys, image_folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from localmim.tools.cli import main
    assert main(["bench", "--model", "vit_tiny_test", "--find-max-batch", "80", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--find-max-batch" in err[0] and "CUDA" in err[0]
    assert main(["bench", "--model", "vit_tiny_test", "--data", image_folder(n=4), "--decode", "gpu",
                 "--device", "cpu", "--batch", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.decode: gpu" in err[0]
    assert main(["bench", "--model", "vit_tiny_test", "--check-sync", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--check-sync" in err[0] and "CUDA" in err[0]


def test_profile_writes_a_trace_and_a_summary(tmp_path, capsys):
    assert bench.main(["--model", "vit_tiny_test", "--batch", "2", "--steps", "1", "--warmup", "1", "--precision",
                       "fp32", "--device", "cpu", "--profile", str(tmp_path), "--profile-steps", "1",
                       "--label", "tiny"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = (tmp_path / "tiny-summary.txt").read_text()
    assert "aten::" in summary and (tmp_path / "tiny-trace.json").stat().st_size > 0
    assert result["profile_summary"] == str(tmp_path / "tiny-summary.txt")
    assert len(result["profile_top_ms_per_step_share"]) == 8


@pytest.mark.parametrize("tiny", [True, False])
def test_every_suite_configuration_parses(tiny, tmp_path):
    """A typo in the GPU suite would cost a GPU session its time: every configuration parses."""
    configs = bench.suite_configs(tiny, str(tmp_path), str(tmp_path))
    names = [c[0] for c in configs]
    assert len(set(names)) == len(names)
    for _, *argv in configs:
        args = _args(argv)
        bench.bench_spec(args)
    assert {"vitb_hog_eager", "vitb_hog_compiled", "swinb_pixel_compiled", "vitl_hog_compiled",
            "loader_cpu", "vitb_hog_compiled_profile"} <= set(names)


def test_suite_goes_on_after_a_failing_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "write_jpeg_folder", lambda folder, count: str(tmp_path))
    monkeypatch.setattr(bench, "suite_configs", lambda tiny, jpegs, out: [
        ["broken", "--model", "no_such_model"],
        ["ok", "--model", "vit_tiny_test", "--batch", "2", "--steps", "1", "--warmup", "1", "--precision", "fp32",
         "--device", "cpu"]])
    out = tmp_path / "suite.jsonl"
    assert bench.main(["--suite", str(out), "--tiny"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["config"] for r in records] == ["broken", "ok"]
    assert "no_such_model" in records[0]["error"] and records[0]["rc"] == 2
    assert records[1]["images_per_s"] > 0 and records[1]["label"] == "ok"


def test_suite_only_reruns_the_named_configurations(tmp_path, monkeypatch):
    """--suite-only (a second GPU call for what failed) runs the named configurations alone; a
    name the suite lacks is one sentence listing its names, before any JPEG is written."""
    written = []
    monkeypatch.setattr(bench, "write_jpeg_folder", lambda folder, count: written.append(folder) or folder)
    tiny = ["--batch", "2", "--steps", "1", "--warmup", "1", "--precision", "fp32", "--device", "cpu"]
    monkeypatch.setattr(bench, "suite_configs", lambda tiny_, jpegs, out: [
        ["a", "--model", "no_such_model"], ["b", "--model", "vit_tiny_test", *tiny], ["c", "--model", "nope"]])
    out = tmp_path / "suite.jsonl"
    with pytest.raises(bench.BenchError, match=r"--suite-only 'b,x': x is not a configuration of this suite; "
                                               r"its configurations are a, b, c"):
        bench.main(["--suite", str(out), "--tiny", "--suite-only", "b,x"])
    assert not written and not out.exists()
    assert bench.main(["--suite", str(out), "--tiny", "--suite-only", "b"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["config"] for r in records] == ["b"] and records[0]["images_per_s"] > 0


def test_cli_names_an_unknown_suite_configuration_and_exits_2(tmp_path, capsys):
    from localmim.tools import cli
    assert cli.main(["bench", "--suite", str(tmp_path / "s.jsonl"), "--tiny", "--suite-only", "vitb_hog_eagre"]) == 2
    err = capsys.readouterr().err
    assert "vitb_hog_eagre is not a configuration of this suite" in err and "vitb_hog_eager" in err


@pytest.mark.parametrize("limit", [0, 5, 8, 63, 64, 100, 1000, 5000])
def test_max_batch_search_finds_the_largest_fitting_multiple(limit):
    tried = []
    found = bench.largest_fitting(lambda b: tried.append(b) or b <= limit, start=64, multiple=8)
    assert found == limit // 8 * 8
    assert len(tried) <= 20 and all(b % 8 == 0 for b in tried)


def test_static_plans_give_the_natural_plans_first_loss(capsys):
    """--static-plans (what a compiled Swin step is fed) only adds fully masked slots: the same loss."""
    losses = {}
    for extra in ([], ["--static-plans"]):
        assert bench.main(["--model", "swin_tiny_test", "--batch", "2", "--steps", "1", "--warmup", "1",
                           "--precision", "fp32", "--device", "cpu", *extra]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        losses[result["static_plans"]] = result["first_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_host_sync_check_reports_where_the_step_synchronised(monkeypatch):
    """The check runs the steps in sync-debug "error" mode, restores the default and names the
    first synchronising call (here a stand-in for CUDA's error)."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(bench, "_sync", lambda dev: None)

    def step():
        raise RuntimeError("called a synchronizing CUDA operation\nmore")

    got = bench.host_sync_check(step, torch.device("cuda"))
    assert modes == ["error", "default"]
    line = step.__code__.co_firstlineno + 1
    assert got == {"host_sync": f"tests/tools/test_bench.py:{line} (step): called a synchronizing CUDA operation"}
    assert bench.host_sync_check(lambda: None, torch.device("cuda")) == {"host_sync": "none"}
