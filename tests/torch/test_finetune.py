"""PyTorch fine-tuning (docs/method.md#fine-tuning): the classifier against timm, the pretrained
encoder it loads, Mixup against timm, layer-decay lrs by hand, exact resume, bad input."""
import functools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from localmim.backends.torch import build_model
from localmim.backends.torch import checkpoint as ckpt
from localmim.backends.torch import finetune as F
from localmim.backends.torch.swin_classifier import SwinClassifier, load_swin_classifier
from localmim.backends.torch.vit_classifier import ViTClassifier, load_vit_classifier
from localmim.core import classifier as C
from localmim.core import mixup as M
from localmim.core.config import PretrainConfig, config_from_dict, config_to_dict
from localmim.core.specs import get_spec
from localmim.tools import cli

SPEC = get_spec("vit_tiny_test")  # 32 px, patch 8, width 32, 4 blocks


def _save(model, path, name):
    """A pretraining checkpoint of `model` as `localmim pretrain` writes it."""
    cfg, target = PretrainConfig(), get_spec(name).target
    cfg.model.name = name
    cfg.target.kind, cfg.target.nbins, cfg.target.hog_bias, cfg.target.norm_pix = \
        target.kind, target.nbins, target.hog_bias, target.norm_pix
    ckpt.save_checkpoint(path, {"model": model.state_dict(), "optimizer": {}, "scaler": None, "step": 1, "epoch": 0,
                                "config": config_to_dict(cfg)})


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_classifier_state_loads_into_timm_and_gives_the_same_logits(pool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = ViTClassifier(SPEC, 10, pool, drop_path=0.1).eval()
    with torch.no_grad():
        ours.head.weight.normal_()  # the 2e-5 init would make every logit ~0
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=SPEC.num_heads, mlp_ratio=SPEC.mlp_ratio,
        qkv_bias=True, num_classes=10, global_pool=pool, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.eval()(x), rtol=1e-6, atol=1e-6)


def test_loaded_classifier_runs_the_pretrained_encoder(tmp_path):
    """With every patch kept, the pretraining encoder's last tap (after its branch norm) equals
    the classifier's tokens after `norm` (token mode: norm = the last branch norm)."""
    torch.manual_seed(1)
    pre = build_model(SPEC)
    path = str(tmp_path / "pre.pth")
    _save(pre, path, "vit_tiny_test")
    clf = load_vit_classifier(path, 5, "token").eval()
    x = torch.randn(2, 3, 32, 32)
    n = SPEC.num_patches
    masks = {"ids_keep": torch.arange(n).expand(2, n), "ids_restore": torch.arange(n).expand(2, n),
             "mask": torch.zeros(2, n)}
    with torch.no_grad():
        want = pre.forward_encoder(x, masks)[-1]
        torch.testing.assert_close(clf.forward_features(x), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(clf.pos_embed, pre.pos_embed) and clf.pos_embed.requires_grad


def test_loading_another_family_names_the_file(tmp_path):
    swin = build_model(get_spec("swin_tiny_test"))
    path = str(tmp_path / "swin.pth")
    _save(swin, path, "swin_tiny_test")
    with pytest.raises(ValueError, match=f"{path} holds a swin encoder"):
        load_vit_classifier(path, 5)


def test_host_mixup_equals_timm_mixup():
    timm_mixup = pytest.importorskip("timm.data.mixup")

    class Legacy:  # numpy's global-state calls, as timm draws them
        def __init__(self, seed):
            self.r = np.random.RandomState(seed)

        def random(self):
            return self.r.rand()

        def beta(self, a, b):
            return self.r.beta(a, b)

        def integers(self, lo, hi):
            return self.r.randint(lo, hi)

    images = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    labels = np.array([0, 3, 1, 2])
    kinds = set()
    for seed in range(12):
        np.random.seed(seed)
        ref = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                               label_smoothing=0.1, num_classes=5)
        x, y = ref(torch.from_numpy(images.copy()), torch.from_numpy(labels))
        params = M.draw_mix_params(Legacy(seed), M.MixupConfig(), 16, 16)
        kinds.add(params.box is not None)
        got_x, got_y = M.mix_batch(images, labels, 5, M.MixupConfig(), Legacy(seed))
        np.testing.assert_array_equal(got_x, x.numpy())
        np.testing.assert_array_equal(got_y, y.numpy())
    assert kinds == {True, False}  # both Mixup and CutMix were drawn


def _digits_like(root, classes=3, per_class=6, val=2):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.full((12, 12), 60 * c, np.uint8) + rng.integers(0, 40, (12, 12), dtype=np.uint8)
                Image.fromarray(base).save(folder / f"{i}.png")
    return root


def _config(data, out, **train):
    return config_from_dict({
        "model": {"name": "vit_tiny_test", "drop_path": 0.2},
        "data": {"path": str(data), "batch_size": 4, "num_workers": 0, "auto_augment": "rand-m9-mstd0.5-inc1"},
        "optim": {"lr": 1e-3, "epochs": 2, "warmup_epochs": 0.5, "layer_decay": 0.75},
        "train": dict({"device": "cpu", "output_dir": str(out), "log_every": 1, "progress": False, "seed": 4,
                       "save_every_steps": 1, "keep_checkpoints": 9}, **train)}, kind="finetune")


def test_layer_decay_lrs_by_hand():
    cfg = _config("unused", "unused")
    model = ViTClassifier(SPEC, 3)
    from localmim.backends.torch.engine import build_optimizer, set_lr
    optimizer = build_optimizer(model, cfg, groups=F.finetune_groups(model, cfg))
    set_lr(optimizer, 1e-3)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # depth 4: L = 5, scale = 0.75 ** (5 - id); id 0 embeddings, block i -> i + 1, head / fc_norm -> 5
    assert lr[id(named["pos_embed"])] == pytest.approx(1e-3 * 0.75 ** 5)
    assert lr[id(named["patch_embed.proj.weight"])] == pytest.approx(1e-3 * 0.75 ** 5)
    assert lr[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.75 ** 4)
    assert lr[id(named["blocks.3.mlp.fc2.bias"])] == pytest.approx(1e-3 * 0.75 ** 1)
    assert lr[id(named["head.weight"])] == pytest.approx(1e-3)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(named["blocks.0.attn.qkv.weight"])] == 0.05
    assert decay[id(named["blocks.0.attn.qkv.bias"])] == decay[id(named["cls_token"])] == 0.0


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_mid_epoch_repeats_the_uninterrupted_run(tmp_path):
    """RandAugment, drop path 0.2, 4 steps an epoch: stopped after step 3, resumed to step 6."""
    data = _digits_like(tmp_path / "data")
    whole = F.run_finetune(_config(data, tmp_path / "whole", max_steps=6))
    F.run_finetune(_config(data, tmp_path / "part", max_steps=3))
    os.remove(tmp_path / "part" / "checkpoint-best.pth")  # resumed runs rebuild the best from log.jsonl
    part = F.run_finetune(_config(data, tmp_path / "part", max_steps=6))
    a = ckpt.load_checkpoint(whole["checkpoint"])["model"]
    b = ckpt.load_checkpoint(part["checkpoint"])["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda out: [r["loss"] for r in _log(out) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "whole") == losses(tmp_path / "part")
    # the partial run also evaluated after its own last step (3), which may count as its best
    strip = lambda m: {k: v for k, v in m.items() if k != "best_acc1"}  # noqa: E731
    assert strip(part["eval"]) == strip(whole["eval"]) and whole["eval"]["val_acc5"] == 100.0  # 3 classes
    evals = [r for r in _log(tmp_path / "whole") if "val_acc1" in r]
    assert [r["step"] for r in evals] == [4, 6]  # end of epoch 0 (18 images, batch 4: 4 steps) and the end


@pytest.mark.parametrize("breakage, sentence", [
    ("no_val", "has no val/ folder"),
    ("missing_class", "lacks the class folder(s) c2 that the training split has"),
])
def test_bad_data_folders_are_one_sentence_and_exit_2(tmp_path, capsys, breakage, sentence):
    import shutil
    data = _digits_like(tmp_path / "data")
    shutil.rmtree(data / "val" if breakage == "no_val" else data / "val" / "c2")
    code = cli.main(["finetune", "--config", "demo_vit", "--data", str(data), "--output", str(tmp_path / "o"),
                     "model.name=vit_tiny_test", "model.img_size=null"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert sentence in err


def test_cli_finetunes_then_evaluates_the_best_checkpoint(tmp_path, capsys):
    data = _digits_like(tmp_path / "data")
    out = tmp_path / "run"
    code = cli.main(["finetune", "--config", "demo_vit", "--data", str(data), "--output", str(out), "--max-steps", "2",
                     "model.name=vit_tiny_test", "model.img_size=null", "data.batch_size=6"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and printed.startswith("finetune top-1: ") and "checkpoint-best.pth" in printed
    code = cli.main(["finetune", "--eval-only", "--checkpoint", str(out / "checkpoint-best.pth"), "--data", str(data)])
    evaluated = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and evaluated.split(" loss")[0] == printed.split(" (best")[0]


SWIN = get_spec("swin_tiny_test")  # 64 px, patch 2, window 4, 4 stages of 2 blocks


def test_swin_classifier_state_loads_into_timm_and_gives_the_same_logits():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = SwinClassifier(SWIN, 6, "norm_avg", drop_path=0.1).eval()
    with torch.no_grad():
        ours.head.weight.normal_()
    kwargs = C.timm_classifier_kwargs(SWIN, 6, "norm_avg")
    ref = timm.create_model(kwargs.pop("model_name"), norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                            **kwargs).eval()
    state = C.timm_classifier_state(ours.export_state(), SWIN, "norm_avg")
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_loaded_swin_classifier_runs_the_pretrained_encoder(tmp_path):
    """norm_avg pools what the frozen-feature Encoder embeds: the last stage after its branch
    norm, averaged (backends/torch/features.py, itself checked against timm)."""
    from localmim.backends.torch.features import Encoder
    torch.manual_seed(2)
    pre = build_model(SWIN).eval()
    path = str(tmp_path / "pre.pth")
    _save(pre, path, "swin_tiny_test")
    clf = load_swin_classifier(path, 5, "norm_avg").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clf.forward_features(x).mean(dim=1), Encoder(pre).encode(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds a vit encoder"):
        vit_path = str(tmp_path / "vit.pth")
        _save(build_model(SPEC), vit_path, "vit_tiny_test")
        load_swin_classifier(vit_path, 5)


def test_swin_drop_path_is_per_sample_and_off_in_eval():
    torch.manual_seed(3)
    clf = SwinClassifier(SWIN, 4, drop_path=0.5)
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for stage in clf.layers for blk in stage.blocks]
    assert rates == pytest.approx(list(np.linspace(0, 0.5, 8)))  # the first block's 0 is an Identity
    x = torch.randn(2, 3, 64, 64)
    assert not torch.equal(clf.train()(x), clf(x))
    assert torch.equal(clf.eval()(x), clf(x))


def test_cli_finetunes_a_swin_and_exports_it_to_timm(tmp_path, capsys):
    pytest.importorskip("timm")
    data = _digits_like(tmp_path / "data")
    out = tmp_path / "run"
    code = cli.main(["finetune", "--config", "swin_base", "--data", str(data), "--output", str(out), "--max-steps",
                     "2", "model.name=swin_tiny_test", "model.global_pool=norm_avg", "data.batch_size=6",
                     "data.num_workers=0", "train.device=cpu", "optim.accum_iter=1"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and printed.startswith("finetune top-1: ")
    best, exported = out / "checkpoint-best.pth", tmp_path / "timm.safetensors"
    code = cli.main(["convert", str(best), str(exported), "--to", "timm", "--check"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[-1].startswith("check: logits max abs diff ")
    assert float(lines[-1].split()[-1]) < 1e-4
    assert any(line.startswith("build it with: timm.create_model('swin_base_patch4_window7_224', ") for line in lines)
    code = cli.main(["convert", str(best), str(tmp_path / "ours.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is a fine-tuned classifier: it exports with --to timm" in err and len(err.splitlines()) == 1
