"""`localmim data digits`, `localmim eval knn | linprobe` and the periodic k-NN of pretraining: real
handwritten digits, the summary line, log.jsonl, the feature cache, and one sentence + exit 2 for
every bad input."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from localmim.backends.labelled import LabelledDataError, train_val_splits  # noqa: E402
from localmim.backends.torch import build_model  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402
from localmim.tools.cli import main  # noqa: E402
from localmim.tools.datasets import digits_split, write_digits  # noqa: E402

SUMMARY = re.compile(r"^(knn|linprobe) top-1: \d+\.\d\d top-5: \d+\.\d\d$")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("d") / "digits"
    write_digits(root, classes=4, per_class=10)  # 32 train / 8 val
    return str(root)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("c") / "tiny.pth"
    torch.save({"model": build_model(get_spec("vit_tiny_test")).state_dict()}, str(path))
    return str(path)


def test_digits_folder_split_and_command(tmp_path, capsys):
    from sklearn.datasets import load_digits
    labels = load_digits().target
    val = digits_split(labels)
    assert val.sum() == 355 and np.bincount(labels[val]).min() >= 34  # a fifth of every digit
    assert main(["data", "digits", str(tmp_path / "d")]) == 0
    assert "1442 train and 355 val images" in capsys.readouterr().out
    train, val_split = train_val_splits(str(tmp_path / "d"))
    assert train.classes == [str(d) for d in range(10)] and (len(train), len(val_split)) == (1442, 355)
    fifth_zero = int(np.flatnonzero(labels == 0)[4])  # val/0 starts with the 5th zero of load_digits
    assert os.path.basename(val_split.paths[0]) == f"{fifth_zero:04d}.png"
    from PIL import Image
    with Image.open(train.paths[0]) as im:
        assert im.size == (8, 8) and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), np.round(load_digits().images[0] * 255 / 16).astype(np.uint8))
    assert main(["data", "digits", str(tmp_path / "d")]) == 0  # already there: left as it is
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert main(["data", "digits", str(tmp_path / "other")]) == 2
    assert "exists and is not the digits dataset" in capsys.readouterr().err


def _bad_folder(tmp_path, digits, what):
    import shutil
    root = tmp_path / what
    shutil.copytree(digits, root)
    if what == "no_val":
        shutil.rmtree(root / "val")
    elif what == "missing_class":
        shutil.rmtree(root / "val" / "2")
    elif what == "corrupt":
        (root / "val" / "1" / "bad.png").write_bytes(b"not a png")
    return str(root)


@pytest.mark.parametrize("what,message", [
    ("no_val", "has no val/ folder"),
    ("missing_class", "lacks the class folder(s) 2 that the training split has"),
    ("corrupt", "cannot read image"),
])
def test_bad_labelled_folders_are_one_sentence(tmp_path, digits, tiny_ckpt, capsys, what, message):
    data = _bad_folder(tmp_path, digits, what)
    assert main(["eval", "knn", "--checkpoint", tiny_ckpt, "--data", data, "--output", str(tmp_path / "o"),
                 "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    if what != "corrupt":
        with pytest.raises(LabelledDataError):
            train_val_splits(data)


def test_knn_command_log_and_cache(tmp_path, digits, tiny_ckpt, capsys):
    argv = ["eval", "knn", "--checkpoint", tiny_ckpt, "--data", digits, "--output", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert SUMMARY.match(first), first
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == first
    rows = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert [r["cached"] for r in rows] == [False, True] and rows[0]["val_acc1"] == rows[1]["val_acc1"]
    assert rows[0]["k"] == 20 and rows[0]["temperature"] == 0.07 and rows[0]["val_images"] == 8
    assert f"top-1: {rows[0]['val_acc1']:.2f}" in first
    assert len(os.listdir(tmp_path / "cache")) == 2  # train and val features
    assert main(argv + ["--random-init"]) == 0  # the baseline, never cached
    assert json.loads(open(tmp_path / "o" / "log.jsonl").readlines()[-1])["random_init"] is True
    assert main(argv[:-2] + ["--checkpoint", str(tmp_path / "none.pth"), "--no-cache"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_linprobe_command_and_config_errors(tmp_path, digits, tiny_ckpt, capsys):
    out = tmp_path / "probe"
    argv = ["eval", "linprobe", "--checkpoint", tiny_ckpt, "--data", digits, "--config", "demo", "--output", str(out)]
    assert main(argv + ["--max-steps", "4", "data.batch_size=8", "train.progress=false"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert SUMMARY.match(last), last
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [4] and "val_acc1" in rows[-1]  # log_every 11: the last step
    assert (out / "config.yaml").read_text().startswith("# localmim resolved linprobe config")
    assert main(argv + ["optim.blrr=1"]) == 2
    assert "unknown key 'optim.blrr' (did you mean 'optim.blr'?)" in capsys.readouterr().err
    assert main(argv + ["model.pool=max"]) == 2
    assert "model.pool = 'max' is invalid" in capsys.readouterr().err
    assert main(argv[:-2] + ["--config", "nonesuch", "--output", str(out)]) == 2
    assert "no bundled linprobe config" in capsys.readouterr().err


def test_bundled_linprobe_configs_load():
    from localmim.core.config import list_bundled_configs, load_config
    assert {"demo", "vit_base", "swin_base"} <= set(list_bundled_configs("linprobe"))
    vit = load_config("vit_base", kind="linprobe")
    assert vit.effective_batch() == 16384 and vit.resolved_lr() == pytest.approx(6.4)
    assert (vit.optim.epochs, vit.optim.warmup_epochs, vit.optim.momentum, vit.optim.weight_decay) == (90, 10, 0.9, 0.0)
    assert vit.data.crop_scale == [0.08, 1.0] and load_config("swin_base", kind="linprobe").resolved_lr() == 6.4


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_pretraining_logs_periodic_knn(tmp_path, digits, image_folder, backend):
    if backend == "mindspore":
        pytest.importorskip("mindspore")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "localmim.tools.cli", "pretrain", "--config", "demo_vit", "--backend", backend,
           "--data", image_folder(n=8, size=64), "--output", str(out), "--max-steps", "4",
           "model.name=vit_tiny_test", "data.batch_size=4", "data.num_workers=0", "train.log_every=1",
           "train.compile=false", "train.progress=false", f"eval.knn_data={digits}", "eval.every_epochs=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    evals = [r for r in rows if "knn_acc1" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["knn_acc1"] <= r["knn_acc5"] <= 100 for r in evals)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    if backend == "mindspore":
        return  # the folder is checked by the same framework-free code before training starts
    bad = subprocess.run(cmd[:-2] + [f"eval.knn_data={tmp_path / 'nothing'}"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr.strip().splitlines()[-1]
