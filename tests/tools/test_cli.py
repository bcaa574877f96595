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

from localmim.core import masking
from localmim.core import targets as core_targets
from localmim.core.config import config_to_dict, load_config
from localmim.core.specs import get_spec
from localmim.tools import cli

SIX = ("pretrain", "finetune", "convert", "visualize", "bench", "demo")


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

def test_help_lists_all_six_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in SIX:
        assert f"    {cmd}" in out


def test_pretrain_help_shows_shared_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for opt in ("--config", "--backend", "--data", "--output", "--max-steps", "--device", "KEY=VALUE"):
        assert opt in out


def test_command_not_built_exits_2_with_one_line(capsys):
    code, out, err = run_cli(capsys, "finetune", "--config", "x.yaml")
    assert code == 2 and out == ""
    assert one_line(err).startswith("localmim finetune: not available yet (")


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
                             "--max-steps", "30", "--device", "cpu", "optim.blr=1e-3", "model.taps=[0,2,5,7]")
    assert code == 0, err
    (cfg,) = fake_engine
    assert (cfg.data.path, cfg.train.output_dir, cfg.train.max_steps, cfg.train.device) == (data, out_dir, 30, "cpu")
    assert cfg.optim.blr == 1e-3 and cfg.model.taps == [0, 2, 5, 7]
    assert "localmim pretrain: done (step 30, loss 0.3" in out


def test_pretrain_without_data_uses_the_sample_photographs(capsys, fake_engine, sample_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALMIM_CACHE", os.path.dirname(sample_dir))
    code, _, err = run_cli(capsys, "pretrain", "--config", "demo_vit", "--output", str(tmp_path / "r"))
    assert code == 0, err
    assert fake_engine[0].data.path == sample_dir


def test_demo_trains_reports_the_loss_and_draws(capsys, fake_engine, image_folder, monkeypatch, tmp_path):
    """demo wiring with stand-in engine and inference (the real ones are tested by their owners)."""
    def load_model(path):
        assert path.endswith("checkpoint-30.pth")
        return "model", get_spec("vit_demo")

    def reconstruct(model, images, mask):
        spec = get_spec("vit_demo")
        assert images.shape == (1, 3, 64, 64) and mask.mask.shape == (1, spec.num_patches)
        branches = spec.branches()
        tg = core_targets.hog_targets(images, [b.cell for b in branches], 9)
        return {"targets": tg, "preds": [t * 0.5 for t in tg],
                "masks": core_targets.scale_masks(mask.mask, spec.grid, [b.scale for b in branches])}

    inference = types.ModuleType("localmim.backends.torch.inference")
    inference.load_model, inference.reconstruct = load_model, reconstruct
    monkeypatch.setitem(sys.modules, "localmim.backends.torch.inference", inference)
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(capsys, "demo", "--output", str(out_dir), "--data", image_folder(), "--max-steps", "30")
    assert code == 0, err
    assert fake_engine[0].model.name == "vit_demo" and fake_engine[0].train.max_steps == 30
    assert "loss: 0.9000 at step 10 -> 0.3000 at step 30 (falling)" in out
    png = out_dir / "reconstruction.png"
    assert f"reconstruction: {png}" in out
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size[0] == 3 * 8 + 2 * 256


# ---------------------------------------------------------------------------- visualize, real backend

@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A real PyTorch training checkpoint (model + config) of vit_tiny_test (32 px)."""
    torch = pytest.importorskip("torch")
    backend = pytest.importorskip("localmim.backends.torch")
    pytest.importorskip("localmim.backends.torch.inference")
    cfg = load_config("demo_vit", ["model.name=vit_tiny_test"])
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


def test_demo_without_a_drawing_backend_still_trains(capsys, fake_engine, image_folder, monkeypatch, tmp_path):
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
