"""MindSpore fine-tuning (docs/method.md#fine-tuning): the RandAugment mapping, the ViT and Swin
classifiers against their torch twins, and runs through the command line that resume, evaluate
and export to timm."""
import numpy as np
import pytest
from PIL import Image

ms = pytest.importorskip("mindspore")

from localmim.backends.mindspore import ensure_cpu_context  # noqa: E402
from localmim.backends.mindspore import finetune as F  # noqa: E402
from localmim.backends.mindspore.vit_classifier import ViTClassifier  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402
from localmim.tools import cli  # noqa: E402

ensure_cpu_context()


def test_timm_randaugment_strings_map_to_mindspore_magnitudes():
    assert F.randaugment_magnitude("rand-m9-mstd0.5-inc1") == (2, 27)   # 9 / 10 of 30 bins
    assert F.randaugment_magnitude("rand-n3-m5") == (3, 15)
    with pytest.raises(ValueError, match="RandAugment strings"):
        F.randaugment_magnitude("augmix-m5")


@pytest.mark.parametrize("model,pool", [("vit_tiny_test", "avg"), ("vit_tiny_test", "token"),
                                        ("swin_tiny_test", "avg"), ("swin_tiny_test", "norm_avg")])
def test_classifier_matches_the_torch_twin_eager_and_in_graph_mode(model, pool, h):
    torch = pytest.importorskip("torch")
    from localmim.backends.torch.finetune import CLASSIFIERS as TORCH_CLASSIFIERS
    spec = get_spec(model)
    torch.manual_seed(0)
    ref = TORCH_CLASSIFIERS[spec.family][0](spec, 7, pool).eval()
    with torch.no_grad():
        ref.head.weight.normal_()
    ours = F.CLASSIFIERS[spec.family][0](spec, 7, pool, drop_path=0.3)
    assert ours.state_shapes() == ref.state_shapes()
    ours.import_state(ref.export_state())
    x = h.make_images(2, spec.img_size, seed=1)
    want = ref(torch.from_numpy(x))
    assert h.rel_err(ours(ms.Tensor(x)), want) < 1e-5   # drop path: off in eval mode
    assert h.rel_err(ms.jit(ours.construct)(ms.Tensor(x)), want) < 1e-5


def _folders(root, classes=2, n=4):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n if split == "train" else 2):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_cli_run_resumes_and_evaluates(tmp_path, capsys):
    data, out = _folders(tmp_path / "data"), tmp_path / "run"
    argv = ["finetune", "--backend", "mindspore", "--config", "demo_vit", "--data", str(data), "--output", str(out),
            "model.name=vit_tiny_test", "model.img_size=null", "data.batch_size=4", "train.compile=false",
            "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25", "mixup.mixup=0.8", "mixup.cutmix=1.0"]
    assert cli.main(argv + ["--max-steps", "1"]) == 0
    assert cli.main(argv + ["--max-steps", "2"]) == 0       # resumes from checkpoint-1
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("finetune top-1: ") and "checkpoint-best.ckpt" in printed
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".ckpt") == ["checkpoint-2.ckpt", "checkpoint-best.ckpt"]
    code = cli.main(["finetune", "--backend", "mindspore", "--eval-only", "--checkpoint", str(out / "checkpoint-best.ckpt"),
                     "--data", str(data)])
    evaluated = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and evaluated.startswith("finetune top-1: ")


def test_cli_finetunes_a_swin_in_graph_mode_and_exports_it_to_timm(tmp_path, capsys):
    pytest.importorskip("timm")
    data, out = _folders(tmp_path / "data"), tmp_path / "run"
    argv = ["finetune", "--backend", "mindspore", "--config", "swin_base", "--data", str(data), "--output", str(out),
            "--max-steps", "2", "model.name=swin_tiny_test", "model.global_pool=norm_avg", "data.batch_size=4",
            "data.num_workers=0", "train.device=cpu", "optim.accum_iter=1", "model.drop_path=0.2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("finetune top-1: ") and "checkpoint-best.ckpt" in printed
    code = cli.main(["convert", str(out / "checkpoint-best.ckpt"), str(tmp_path / "timm.pth"), "--to", "timm",
                     "--check"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and last.startswith("check: logits max abs diff ") and float(last.split()[-1]) < 1e-4


def test_resume_with_drop_path_repeats_the_uninterrupted_run(tmp_path):
    """Graph mode, drop path 0.3, RandAugment, 3 steps an epoch: stopped after step 2, resumed to 4."""
    from localmim.backends.mindspore import checkpoint as ckpt
    from localmim.core.config import config_from_dict
    data = _folders(tmp_path / "data", classes=3)

    def config(out, steps):
        return config_from_dict({
            "model": {"name": "vit_tiny_test", "drop_path": 0.3},
            "data": {"path": str(data), "batch_size": 4, "num_workers": 0, "auto_augment": "rand-m9-mstd0.5-inc1"},
            "optim": {"lr": 1e-3, "epochs": 2, "warmup_epochs": 0.5, "layer_decay": 0.75},
            "train": {"device": "cpu", "output_dir": str(out), "log_every": 1, "progress": False, "seed": 4,
                      "save_every_steps": 1, "keep_checkpoints": 9, "max_steps": steps}}, kind="finetune")

    whole = F.run_finetune(config(tmp_path / "whole", 4))
    F.run_finetune(config(tmp_path / "part", 2))
    part = F.run_finetune(config(tmp_path / "part", 4))
    a = ckpt.load_checkpoint(whole["checkpoint"])["model"]
    b = ckpt.load_checkpoint(part["checkpoint"])["model"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    import json
    losses = [[json.loads(line).get("loss") for line in open(out / "log.jsonl")] for out in
              (tmp_path / "whole", tmp_path / "part")]
    assert [x for x in losses[0] if x is not None] == [x for x in losses[1] if x is not None]


def test_drop_path_draws_from_the_step_input():
    """The same host draws give the same training-mode output; other draws another one."""
    spec = get_spec("vit_tiny_test")
    model = ViTClassifier(spec, 3, drop_path=0.5)
    model.set_train(True)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    draws = np.random.default_rng(1).random((spec.depth, 2, 4)).astype(np.float32)
    a, b = model(x, ms.Tensor(draws)).asnumpy(), model(x, ms.Tensor(draws)).asnumpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model(x, ms.Tensor(draws[::-1].copy())).asnumpy())
    model.set_train(False)
    np.testing.assert_array_equal(model(x, ms.Tensor(draws)).asnumpy(), model(x).asnumpy())
