"""tools.cli dispatch and error handling, tools.pretrain and tools.demo wiring (with stand-in
engines where a real training run would be too slow), and visualize end to end with a real
PyTorch checkpoint of a tiny model."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from localmim.backends import runs
from localmim.core import masking
from localmim.core import targets as core_targets
from localmim.core.config import config_to_dict, load_config
from localmim.tools import cli

LISTED = ("pretrain", "finetune", "convert", "visualize", "plot", "bench", "demo")


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------- parser

def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in LISTED:
        assert f"    {cmd}" in out


def test_pretrain_help_shows_shared_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for opt in ("--config", "--backend", "--data", "--output", "--max-steps", "--device", "KEY=VALUE"):
        assert opt in out


def test_finetune_config_not_found_exits_2_with_one_line(capsys):
    code, out, err = run_cli(capsys, "finetune", "--config", "x.yaml")
    assert code == 2 and out == ""
    assert one_line(err).startswith("localmim finetune: config 'x.yaml' not found") and "vit_base" in err


def test_missing_command_module_is_reported(capsys, monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "localmim.tools.bench" else real(name, *a))
    code, _, err = run_cli(capsys, "bench")
    assert code == 2 and one_line(err).startswith("localmim bench: not available yet")


def test_bad_config_path_exits_2_with_one_line(capsys):
    code, out, err = run_cli(capsys, "pretrain", "--config", "no/such/config.yaml")
    assert code == 2
    assert one_line(err).startswith("localmim pretrain: config 'no/such/config.yaml' not found")


def test_bad_config_in_a_real_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 1\n")
    proc = subprocess.run([sys.executable, "-m", "localmim.tools.cli", "pretrain", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr) == ("localmim pretrain: bad.yaml: unknown key 'optim.lrr' "
                                     "(did you mean 'optim.lr'?)")


def test_bad_override_and_stray_argument_exit_2(capsys):
    code, _, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "mask.ratio=2")
    assert code == 2 and "mask.ratio = 2.0 is invalid" in one_line(err)
    code, _, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "oops")
    assert code == 2 and "'oops' is neither an option nor a section.key=value override" in one_line(err)
    code, _, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "--max-steps", "0")
    assert code == 2 and "train.max_steps = 0 is invalid" in one_line(err)


def test_missing_data_folder_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "--data", str(tmp_path / "none"))
    assert code == 2 and "data folder" in one_line(err) and "none" in one_line(err)


# ---------------------------------------------------------------------------- backends

def _fail_import(monkeypatch, missing):
    real = cli.importlib.import_module

    def fake(name, *a):
        if name.startswith("localmim.backends."):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, *a)

    monkeypatch.setattr(cli.importlib, "import_module", fake)


def test_backend_without_its_framework_is_one_line(capsys, monkeypatch, image_folder):
    _fail_import(monkeypatch, "mindspore")
    code, _, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "--backend", "mindspore",
                           "--data", image_folder())
    assert code == 2
    assert one_line(err) == ("localmim pretrain: backend 'mindspore' needs the Python package 'mindspore', "
                             "which is not installed (pip install 'localmim[mindspore]')")


def test_backend_not_built_is_one_line(monkeypatch):
    _fail_import(monkeypatch, "localmim.backends.mindspore.engine")
    with pytest.raises(cli.BackendUnavailable, match="backend 'mindspore' is not built yet"):
        cli.import_backend_module("mindspore", "engine")
    _fail_import(monkeypatch, "scipy")                      # an unrelated missing module is a real bug
    with pytest.raises(ModuleNotFoundError):
        cli.import_backend_module("torch", "engine")


@pytest.fixture
def fake_engine(monkeypatch):
    """A stand-in localmim.backends.torch.engine: records the config, writes a log and a checkpoint."""
    calls = []

    def run_pretrain(cfg):
        calls.append(cfg)
        out = cfg.train.output_dir
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "log.jsonl"), "w") as f:
            for step, loss in ((10, 0.9), (20, 0.5), (30, 0.3)):
                f.write(json.dumps({"step": step, "epoch": 0, "loss": loss}) + "\n")
        ckpt = os.path.join(out, "checkpoint-30.pth")
        open(ckpt, "wb").close()
        return {"step": 30, "loss": 0.3, "checkpoint": ckpt, "output_dir": out}

    module = types.ModuleType("localmim.backends.torch.engine")
    module.run_pretrain = run_pretrain
    monkeypatch.setitem(sys.modules, "localmim.backends.torch.engine", module)
    return calls


def test_pretrain_applies_flags_and_overrides(capsys, fake_engine, image_folder, tmp_path):
    data = image_folder()
    out_dir = str(tmp_path / "run")
    code, out, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "--data", data, "--output", out_dir,
                             "--max-steps", "30", "--device", "cpu", "optim.blr=1e-3", "model.taps=[0,2,3,5]")
    assert code == 0, err
    (cfg,) = fake_engine
    assert (cfg.data.path, cfg.train.output_dir, cfg.train.max_steps, cfg.train.device) == (data, out_dir, 30, "cpu")
    assert cfg.optim.blr == 1e-3 and cfg.model.taps == [0, 2, 3, 5]
    assert "localmim pretrain: done (step 30, loss 0.3" in out


def test_pretrain_without_data_uses_the_sample_photographs(capsys, fake_engine, sample_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALMIM_CACHE", os.path.dirname(sample_dir))
    code, _, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "--output", str(tmp_path / "r"))
    assert code == 0, err
    assert fake_engine[0].data.path == sample_dir


def _stand_in_inference(monkeypatch, spec, expect_checkpoint="checkpoint-30.pth"):
    """A localmim.backends.torch.inference whose model predicts half of each core target."""
    def load_model(path):
        assert path.endswith(expect_checkpoint)
        return "model", spec

    def reconstruct(model, images, mask):
        assert images.shape[1:] == (3, spec.img_size, spec.img_size) and mask.mask.shape == (len(images), spec.num_patches)
        branches = spec.branches()
        tg = core_targets.pixel_targets(images, [b.cell for b in branches], spec.target.norm_pix)
        return {"targets": tg, "preds": [t * 0.5 for t in tg],
                "masks": core_targets.scale_masks(mask.mask, spec.grid, [b.scale for b in branches])}

    inference = types.ModuleType("localmim.backends.torch.inference")
    inference.load_model, inference.reconstruct = load_model, reconstruct
    monkeypatch.setitem(sys.modules, "localmim.backends.torch.inference", inference)


def test_demo_trains_reports_the_loss_and_draws(capsys, fake_engine, sample_dir, monkeypatch, tmp_path):
    """demo wiring with stand-in engine and inference (the real ones are tested by their owners):
    it trains on the sample photographs less the held-out ones, draws a held-out photograph and
    the loss plot, and ends with the held-out loss against the mean."""
    from localmim.tools import heldout

    monkeypatch.setenv("LOCALMIM_CACHE", os.path.dirname(sample_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = load_config("demo_vit").build_spec()
    _stand_in_inference(monkeypatch, spec)
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(capsys, "demo", "--output", str(out_dir), "--max-steps", "30")
    assert code == 0, err
    (cfg,) = fake_engine
    assert cfg.model.name == spec.name and cfg.train.max_steps == 30 and cfg.target.kind == "pixel"
    train, held = heldout.split_sample_images(sample_dir)
    assert cfg.data.path == train and len(os.listdir(train)) == 98 and len(held) == 28
    assert "loss: 0.9000 at step 10 -> 0.3000 at step 30 (falling)" in out
    png = out_dir / "reconstruction.png"
    assert f"reconstruction of coffee.png (held out): {png}" in out
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size[0] == 3 * 8 + 2 * spec.img_size * -(-256 // spec.img_size)
    assert f"loss plot: {out_dir / 'loss.png'}" in out
    # predicting half of every target: a quarter of the targets' mean square, against the mean
    inference = sys.modules["localmim.backends.torch.inference"]
    want = heldout.evaluate_images(inference, "model", spec, held, seed=0, ratio=0.75)
    assert out.strip().splitlines()[-1] == want.line()
    assert want.model_total < want.mean_total


def test_demo_target_option_and_thread_count(capsys, fake_engine, image_folder, sample_dir, monkeypatch, tmp_path):
    from localmim.tools import demo

    monkeypatch.setenv("LOCALMIM_CACHE", os.path.dirname(sample_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(demo, "_drawing_unavailable", lambda backend: "no drawing in this test")
    data = image_folder()
    code, out, err = run_cli(capsys, "demo", "--target", "hog", "--data", data, "--output", str(tmp_path / "h"))
    assert code == 0, err
    assert fake_engine[0].target.kind == "hog" and fake_engine[0].data.path == data
    assert "(28 held-out images)" in out                 # --data DIR: measured on the bundled held-out photos
    assert (demo.compute_threads(1, cores=2), demo.compute_threads(2, cores=2), demo.compute_threads(2, cores=16)) \
        == (1, 1, 14)


# ---------------------------------------------------------------------------- visualize, real backend

@pytest.fixture(params=["hog", "pixel"])
def tiny_checkpoint(tmp_path, request):
    """A real PyTorch training checkpoint (model + config) of vit_tiny_test (32 px), HOG or pixel targets."""
    torch = pytest.importorskip("torch")
    backend = pytest.importorskip("localmim.backends.torch")
    pytest.importorskip("localmim.backends.torch.inference")
    cfg = load_config("demo_vit", ["model.name=vit_tiny_test", f"target.kind={request.param}"])
    torch.manual_seed(0)
    model = backend.build_model(cfg.build_spec())
    path = tmp_path / "checkpoint-1.pth"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg)}, path)
    return str(path)


def test_visualize_with_a_real_torch_checkpoint(capsys, tiny_checkpoint, sample_dir, tmp_path):
    out_png = tmp_path / "figs" / "rec.png"
    code, out, err = run_cli(capsys, "visualize", "--checkpoint", tiny_checkpoint, "--image",
                             os.path.join(sample_dir, "astronaut.png"), "--output", str(out_png), "--seed", "3")
    assert code == 0, err
    assert out.strip() == str(out_png)
    fig = np.asarray(Image.open(out_png))
    panel = 32 * 8                                                   # 32 px model, upscaled to 256
    assert fig.shape == (8 + 5 * (14 + panel + 8) + 28, 3 * 8 + 2 * panel, 3)
    # the masked-input panel hides exactly the seeded mask's patches (4x4 grid of 64-px blocks)
    mask = masking.vit_mask(masking.mask_rng(3, 0, 0, 0), 1, 16, 0.75).mask[0].reshape(4, 4)
    top, left = 8 + 14, 8 + panel + 8
    grey = fig[top:top + panel, left:left + panel].reshape(4, 64, 4, 64, 3).transpose(0, 2, 1, 3, 4)
    is_grey = (grey == 96).all(axis=(2, 3, 4))
    np.testing.assert_array_equal(is_grey, mask > 0.5)


def test_torch_pretrain_writes_tensorboard_scalars_and_the_figure(capsys, image_folder, tmp_path):
    """The real torch engine with train.tensorboard: the event file holds log.jsonl's scalars and
    the engine's reconstruction figure (tools.visualize.training_figure) at the end of each epoch."""
    pytest.importorskip("torch")
    pytest.importorskip("localmim.backends.torch.engine")
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "--data", image_folder(n=4), "--output",
                           str(out), "model.name=vit_tiny_test", "data.batch_size=2", "data.num_workers=0",
                           "train.max_steps=3", "train.log_every=1", "train.tensorboard=true",
                           "train.tensorboard_images_every_epochs=1", "train.progress=false")
    assert code == 0, err
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    acc = ea.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for key in ("loss", "loss_b0", "loss_b3", "lr", "images_per_s"):
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(key)] == \
            [(r["step"], r[key]) for r in log], key
    images = acc.Images("reconstruction")                           # 2 steps an epoch: after steps 2 and 3
    assert [i.step for i in images] == [2, 3]
    panel = 32 * 8
    assert (images[0].width, images[0].height) == (3 * 8 + 2 * panel, 8 + 5 * (14 + panel + 8) + 28)


def test_visualize_bad_image_is_one_line(capsys, tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    code, _, err = run_cli(capsys, "visualize", "--checkpoint", tiny_checkpoint, "--image", str(bad),
                           "--output", str(tmp_path / "o.png"))
    assert code == 2 and "bad.jpg" in one_line(err) and "cannot be read as an image" in err
    assert not (tmp_path / "o.png").exists()


def test_visualize_missing_checkpoint_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "visualize", "--checkpoint", str(tmp_path / "c.pth"), "--image", "x.png",
                           "--output", str(tmp_path / "o.png"))
    assert code == 2 and "c.pth" in one_line(err) and "does not exist" in err


def test_visualize_a_real_swin_checkpoint(capsys, sample_dir, tmp_path):
    torch = pytest.importorskip("torch")
    backend = pytest.importorskip("localmim.backends.torch")
    pytest.importorskip("localmim.backends.torch.inference")
    cfg = load_config("demo_swin", ["model.name=swin_tiny_test"])           # 64 px, 4x4 mask cells
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint-2.pth"
    torch.save({"model": backend.build_model(cfg.build_spec()).state_dict(), "config": config_to_dict(cfg)}, ckpt)
    out_png = tmp_path / "swin.png"
    code, _, err = run_cli(capsys, "visualize", "--checkpoint", str(ckpt), "--image",
                           os.path.join(sample_dir, "rocket.png"), "--output", str(out_png), "--seed", "1")
    assert code == 0, err
    fig = np.asarray(Image.open(out_png))
    assert fig.shape == (8 + 5 * (14 + 256 + 8) + 28, 3 * 8 + 2 * 256, 3)
    cells = masking.swin_cell_mask(masking.mask_rng(1, 0, 0, 0), 4, 0.75).reshape(4, 4)
    top, left = 8 + 14, 8 + 256 + 8
    blocks = fig[top:top + 256, left:left + 256].reshape(4, 64, 4, 64, 3).transpose(0, 2, 1, 3, 4)
    np.testing.assert_array_equal((blocks == 96).all(axis=(2, 3, 4)), cells)


def test_demo_without_a_drawing_backend_still_trains(capsys, fake_engine, image_folder, sample_dir, monkeypatch,
                                                     tmp_path):
    monkeypatch.setenv("LOCALMIM_CACHE", os.path.dirname(sample_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    real = cli.importlib.import_module

    def fake(name, *a):
        if name == "localmim.backends.torch.inference":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a)

    monkeypatch.setattr(cli.importlib, "import_module", fake)
    code, out, err = run_cli(capsys, "demo", "--output", str(tmp_path / "d"), "--data", image_folder())
    assert code == 0, err
    assert "training only, no reconstruction figure: backend 'torch' is not built yet" in out
    assert "loss: 0.9000 at step 10 -> 0.3000 at step 30 (falling)" in out
    assert len(fake_engine) == 1 and not (tmp_path / "d" / "reconstruction.png").exists()


STOPS = {  # what the engine raises -> the exit status and the one line on stderr
    "preempted": (lambda: runs.Preempted("SIGUSR1", 12, 300, "out/checkpoint-12.pth"), 75,
                  "localmim pretrain: stopped by SIGUSR1 after step 12 of 300 and wrote out/checkpoint-12.pth; "
                  "run the same command again to resume"),
    "full-disk": (lambda: OSError(28, "No space left on device"), 2,
                  "localmim pretrain: [Errno 28] No space left on device"),
    "read-only": (lambda: OSError(30, "Read-only file system", "out/log.jsonl"), 2,
                  "localmim pretrain: Read-only file system: out/log.jsonl"),
}


@pytest.mark.parametrize("kind", sorted(STOPS))
def test_a_stopped_run_and_a_full_or_read_only_disk_are_one_line(capsys, monkeypatch, image_folder, tmp_path, kind):
    """The exit status of a run stopped by a signal (75, README "Long runs") and the environment's
    OS errors (2), each one line on stderr."""
    raised, code, line = STOPS[kind]

    def run_pretrain(cfg):
        raise raised()

    module = types.ModuleType("localmim.backends.torch.engine")
    module.run_pretrain = run_pretrain
    monkeypatch.setitem(sys.modules, "localmim.backends.torch.engine", module)
    got, out, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "--data", image_folder(),
                            "--output", str(tmp_path / "run"))
    assert got == code and one_line(err) == line
