"""MindSpore fine-tuning (docs/method.md#fine-tuning): the RandAugment mapping, the classifier
against the torch twin, and a run through the command line that resumes and evaluates."""
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


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_classifier_matches_the_torch_twin(pool, h):
    torch = pytest.importorskip("torch")
    from localmim.backends.torch.vit_classifier import ViTClassifier as TorchClassifier
    spec = get_spec("vit_tiny_test")
    torch.manual_seed(0)
    ref = TorchClassifier(spec, 7, pool).eval()
    with torch.no_grad():
        ref.head.weight.normal_()
    ours = ViTClassifier(spec, 7, pool, drop_path=0.3)
    assert ours.state_shapes() == ref.state_shapes()
    ours.import_state(ref.export_state())
    x = h.make_images(2, 32, seed=1)
    assert h.rel_err(ours(ms.Tensor(x)), ref(torch.from_numpy(x))) < 1e-5   # drop path: off in eval mode


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
