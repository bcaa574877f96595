"""tools/convert.py: readers, atomic verified writers, layout/model detection, --check, bad input."""
import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from localmim.core import keymaps as K  # noqa: E402
from localmim.core import state as S  # noqa: E402
from localmim.core.specs import SwinSpec, TargetSpec, ViTSpec, get_spec  # noqa: E402
from localmim.tools import convert as C  # noqa: E402

HAVE_MINDSPORE = importlib.util.find_spec("mindspore") is not None  # .ckpt files need it

TINY = get_spec("vit_tiny_test")  # patch 8, D 32, depth 4, img 32, taps 0..3, HOG 9 bins


def rand_state(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def tiny_state(seed=0):
    return rand_state(S.vit_canonical_shapes(TINY), seed)


def mae_state(spec, decoder=True, seed=0, dd=24):
    """MAE (facebookresearch/mae) names: encoder, one final norm, decoder_* and mask_token."""
    shapes = dict(S.vit_encoder_shapes(spec, branch_norms=False))
    shapes.update({"norm.weight": (spec.embed_dim,), "norm.bias": (spec.embed_dim,)})
    if decoder:
        n, p = spec.num_patches, spec.patch_size
        shapes.update({"mask_token": (1, 1, dd), "decoder_embed.weight": (dd, spec.embed_dim),
                       "decoder_embed.bias": (dd,), "decoder_pos_embed": (1, 1 + n, dd),
                       "decoder_blocks.0.attn.qkv.weight": (3 * dd, dd), "decoder_norm.weight": (dd,),
                       "decoder_pred.weight": (3 * p * p, dd), "decoder_pred.bias": (3 * p * p,)})
    return rand_state(shapes, seed)


def save_pth(path, state, **extra):
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, **extra}, str(path))
    return str(path)


def torch_plain(path):
    """A plain torch state dict file (timm's) as numpy; fails on a wrapped one."""
    obj = torch.load(str(path), weights_only=True)
    return {k: v.numpy() for k, v in obj.items()}


def convert(*argv):
    return C.main([str(a) for a in argv])


def assert_bit_identical(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def leftovers(folder):
    return sorted(f for f in os.listdir(folder) if ".tmp" in f)


# ---------------------------------------------------------------- round trips

def test_pth_to_safetensors_to_pth_is_bit_identical(tmp_path, capsys):
    src = tiny_state(1)
    save_pth(tmp_path / "a.pth", src, epoch=3, optimizer={"state": {}})
    assert convert(tmp_path / "a.pth", tmp_path / "b.safetensors") == 0
    out = capsys.readouterr().out
    assert "layout localmim-vit" in out and "model vit_tiny_test" in out and "verified" in out
    from safetensors import safe_open
    with safe_open(str(tmp_path / "b.safetensors"), framework="np") as f:
        assert f.metadata()["layout"] == "localmim-vit" and f.metadata()["model"] == "vit_tiny_test"
    assert convert(tmp_path / "b.safetensors", tmp_path / "c.pth") == 0
    back = torch.load(str(tmp_path / "c.pth"), weights_only=True)["model"]
    assert_bit_identical(src, {k: v.numpy() for k, v in back.items()})
    assert leftovers(tmp_path) == []


def test_pth_to_ckpt_to_pth_is_bit_identical(tmp_path):
    ms = pytest.importorskip("mindspore")
    src = tiny_state(2)
    save_pth(tmp_path / "a.pth", src)
    assert convert(tmp_path / "a.pth", tmp_path / "b.ckpt") == 0
    loaded = ms.load_checkpoint(str(tmp_path / "b.ckpt"))
    assert loaded.pop("meta.layout") == "localmim-vit"
    assert json.loads(loaded.pop("meta.arch"))["name"] == "vit_tiny_test"
    assert {k for k in loaded if k.startswith("meta.")} == {"meta.model", "meta.source_layout"}
    assert_bit_identical(src, {k: v.asnumpy() for k, v in loaded.items() if not k.startswith("meta.")})
    assert convert(tmp_path / "b.ckpt", tmp_path / "c.pth") == 0
    back = torch.load(str(tmp_path / "c.pth"), weights_only=True)["model"]
    assert_bit_identical(src, {k: v.numpy() for k, v in back.items()})


def test_official_layout_with_args_namespace_reads(tmp_path, capsys):
    src = tiny_state(3)
    args = argparse.Namespace(model="MIM_vit_tiny", hog_nbins=9, lr=1.6e-3)
    path = save_pth(tmp_path / "localmim.pth", src, optimizer={}, epoch=1599, scaler={}, args=args)
    state, _ = C.read_state(path)
    assert_bit_identical(src, state)
    assert convert(path, tmp_path / "out.safetensors") == 0
    assert "layout localmim-vit, 152 keys" in capsys.readouterr().out


def test_wrapped_and_compiled_prefixes_and_half_precision_read(tmp_path):
    src = tiny_state(4)
    wrapped = {"state_dict": {f"module._orig_mod.{k}": torch.from_numpy(v).half() for k, v in src.items()}}
    torch.save(wrapped, str(tmp_path / "w.pt"))
    state, _ = C.read_state(str(tmp_path / "w.pt"))
    assert set(state) == set(src) and all(v.dtype == np.float32 for v in state.values())
    np.testing.assert_array_equal(state["cls_token"], src["cls_token"].astype(np.float16).astype(np.float32))


def test_mindspore_training_checkpoint_reads_without_optimizer_and_meta(tmp_path):
    pytest.importorskip("mindspore")
    ckpt_mod = pytest.importorskip("localmim.backends.mindspore.checkpoint")
    src = tiny_state(5)
    payload = {"model": src, "optimizer": {"exp_avg.cls_token": np.ones((1, 1, 32), np.float32)},
               "scaler": {}, "step": 7, "epoch": 1, "config": {"model": {"name": "vit_tiny_test"}}}
    ckpt_mod.save_checkpoint(str(tmp_path / "checkpoint-7.ckpt"), payload)
    state, _ = C.read_state(str(tmp_path / "checkpoint-7.ckpt"))
    assert_bit_identical(src, state)


def test_torch_training_checkpoint_reads(tmp_path):
    ckpt_mod = pytest.importorskip("localmim.backends.torch.checkpoint")
    src = tiny_state(17)
    model = {k: torch.from_numpy(v) for k, v in src.items()}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    payload = {"model": model, "optimizer": opt.state_dict(), "scaler": {}, "step": 5, "epoch": 0,
               "config": {"model": {"name": "vit_tiny_test"}}}
    path = ckpt_mod.save_checkpoint(str(tmp_path / "checkpoint-5.pth"), payload)
    state, _ = C.read_state(path)
    assert_bit_identical(src, state)


def test_a_training_checkpoint_config_gives_taps_the_shapes_cannot():
    spec = get_spec("vit_demo", taps=(0, 2, 5, 7))
    state = {k: np.zeros(v, np.float32) for k, v in S.vit_canonical_shapes(spec).items()}
    layout, found, notes = C.resolve_source(state, {"config": {"model": {"name": "vit_demo", "taps": [0, 2, 5, 7]}}},
                                            "checkpoint-5.pth")
    assert (layout, found.taps) == ("localmim-vit", (0, 2, 5, 7))
    assert notes == ["layout localmim-vit (detected)", "model vit_demo with taps=(0, 2, 5, 7)"]
    assert C.resolve_source(state, {}, "weights.pth")[1].taps == (1, 3, 5, 7)  # no config: the reference rule
    assert C.resolve_source(state, {}, "w.pth", arch={"taps": [0, 2, 5, 7]})[1] == spec


def test_from_flag_overrides_detection(tmp_path, capsys):
    enc = rand_state(S.vit_encoder_shapes(TINY), seed=18)
    save_pth(tmp_path / "enc.pth", enc)
    assert convert(tmp_path / "enc.pth", tmp_path / "e.safetensors") == 0
    assert "layout localmim-vit-encoder" in capsys.readouterr().out
    err = _fails(capsys, tmp_path / "enc.pth", tmp_path / "m.safetensors", "--from", "mae")
    assert "not MAE/timm ViT keys: norm.0.bias" in err


def test_mae_check_runs_timm_source_against_our_encoder(tmp_path, capsys):
    pytest.importorskip("timm")
    pytest.importorskip("localmim.backends.torch.vit")
    src = mae_state(TINY, seed=19)
    save_pth(tmp_path / "mae.pth", src)
    assert convert(tmp_path / "mae.pth", tmp_path / "enc.pth", "--check") == 0
    out = capsys.readouterr().out
    assert float(out.split("max abs diff ")[1].split()[0]) < 1e-5
    assert "loss abs diff" not in out  # neither side has LocalMIM decoders


def test_mae_full_and_encoder_convert_to_our_encoder(tmp_path, capsys):
    for name, decoder in (("full", True), ("enc", False)):
        src = mae_state(TINY, decoder=decoder, seed=6)
        save_pth(tmp_path / f"mae_{name}.pth", src, args=argparse.Namespace(norm_pix_loss=True))
        assert convert(tmp_path / f"mae_{name}.pth", tmp_path / f"{name}.safetensors") == 0
        out = capsys.readouterr().out
        assert f"layout {'mae' if decoder else 'mae-encoder'}," in out
        assert "newly initialised (weight 1, bias 0): norm.0.bias" in out
        got, meta = C.read_state(str(tmp_path / f"{name}.safetensors"))
        assert meta["layout"] == "localmim-vit-encoder"
        assert set(got) == set(S.vit_encoder_shapes(TINY))
        np.testing.assert_array_equal(got["norm.3.weight"], src["norm.weight"])
        np.testing.assert_array_equal(got["blocks.3.mlp.fc2.weight"], src["blocks.3.mlp.fc2.weight"])
        np.testing.assert_array_equal(got["norm.1.weight"], np.ones(32, np.float32))


# ---------------------------------------------------------------- timm export

def _perturbed_torch_model(seed):
    backend = pytest.importorskip("localmim.backends.torch")
    torch.manual_seed(seed)
    model = backend.build_model(TINY).eval()
    state = model.export_state()
    rng = np.random.default_rng(seed)
    for k in state:  # make norms and biases non-trivial so the mapping is really exercised
        if k.startswith(("norm.", "blocks.")) and not k.startswith("hog_enc"):
            state[k] = (state[k] + 0.1 * rng.standard_normal(state[k].shape)).astype(np.float32)
    model.import_state(state)
    return model, state


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_timm_export_loads_strict_and_matches_last_tap(tmp_path, ext):
    timm = pytest.importorskip("timm")
    model, state = _perturbed_torch_model(7)
    save_pth(tmp_path / "ours.pth", state)
    dst = tmp_path / f"timm{ext}"
    assert convert(tmp_path / "ours.pth", dst, "--to", "timm") == 0
    net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=4, num_heads=2).eval()
    if ext == ".pth":
        net.load_state_dict(torch.load(str(dst), weights_only=True), strict=True)
    else:
        timm.models.load_checkpoint(net, str(dst), strict=True)
    imgs = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    ids_keep = torch.arange(TINY.num_patches).expand(2, -1)
    with torch.no_grad():
        ours = model.forward_encoder(imgs, {"ids_keep": ids_keep})[-1]
        theirs = net.forward_features(imgs)
    assert theirs.shape == ours.shape == (2, 17, 32)
    assert torch.max(torch.abs(ours - theirs)).item() < 1e-5


def test_check_reports_differences_for_timm_and_ckpt(tmp_path, capsys):
    pytest.importorskip("timm")
    _, state = _perturbed_torch_model(8)
    save_pth(tmp_path / "ours.pth", state)
    assert convert(tmp_path / "ours.pth", tmp_path / "t.pth", "--to", "timm", "--check") == 0
    out = capsys.readouterr().out
    diff = float(out.split("encoder features max abs diff ")[1].split()[0])
    assert diff < 1e-5
    assert convert(tmp_path / "ours.pth", tmp_path / "same.safetensors", "--check") == 0
    out = capsys.readouterr().out
    assert "loss abs diff 0.000e+00" in out and "max abs diff 0.000e+00" in out


def test_check_cross_framework_ckpt(tmp_path, capsys):
    pytest.importorskip("mindspore")
    pytest.importorskip("localmim.backends.mindspore.vit")
    _, state = _perturbed_torch_model(9)
    save_pth(tmp_path / "ours.pth", state)
    from PIL import Image
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert convert(tmp_path / "ours.pth", tmp_path / "o.ckpt", "--check", tmp_path / "x.png") == 0
    out = capsys.readouterr().out
    assert float(out.split("max abs diff ")[1].split()[0]) < 1e-4
    assert "loss abs diff" in out


# ---------------------------------------------------------------- bad input

def _fails(capsys, *argv):
    assert convert(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("localmim convert: error:") and "\n" not in err
    return err


def test_missing_extra_and_misshaped_keys_name_the_keys(tmp_path, capsys):
    src = tiny_state(10)
    missing = dict(src)
    del missing["blocks.2.attn.proj.weight"]
    save_pth(tmp_path / "missing.pth", missing)
    err = _fails(capsys, tmp_path / "missing.pth", tmp_path / "o1.pth")
    assert "1 missing key(s): blocks.2.attn.proj.weight" in err
    extra = dict(src, **{"decoder.0.extra.weight": np.zeros(3, np.float32)})
    save_pth(tmp_path / "extra.pth", extra)
    err = _fails(capsys, tmp_path / "extra.pth", tmp_path / "o2.pth")
    assert "unexpected key(s): decoder.0.extra.weight" in err
    wrong = dict(src, **{"decoder.1.mask_token": np.zeros((1, 1, 17), np.float32)})
    save_pth(tmp_path / "wrong.pth", wrong)
    err = _fails(capsys, tmp_path / "wrong.pth", tmp_path / "o3.pth")
    assert "decoder.1.mask_token expected (1, 1, 16) found (1, 1, 17)" in err
    assert not any(p.startswith("o") for p in os.listdir(tmp_path)) and leftovers(tmp_path) == []


def test_model_mismatch_and_unknown_layout(tmp_path, capsys):
    save_pth(tmp_path / "tiny.pth", tiny_state(11))
    err = _fails(capsys, tmp_path / "tiny.pth", tmp_path / "o.pth", "--model", "vit_demo")
    assert "holds a different model than vit_demo: patch 8, width 32, 4 blocks" in err
    assert "but vit_demo has patch 8, width 192, 8 blocks" in err
    err = _fails(capsys, tmp_path / "tiny.pth", tmp_path / "o.pth", "--model", "vit_nope")
    assert "unknown ViT model 'vit_nope'" in err
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(2)}, str(tmp_path / "rn.pth"))
    err = _fails(capsys, tmp_path / "rn.pth", tmp_path / "o.pth")
    assert "unknown checkpoint layout" in err and "conv1.weight" in err and "fc.bias" in err
    odd = {"patch_embed.proj.weight": np.zeros((40, 3, 8, 8), np.float32), "pos_embed": np.zeros((1, 17, 40), np.float32),
           "cls_token": np.zeros((1, 1, 40), np.float32)}
    save_pth(tmp_path / "odd.pth", odd)
    err = _fails(capsys, tmp_path / "odd.pth", tmp_path / "o.pth")
    assert "fits no registered model (patch_embed.proj.weight (40, 3, 8, 8)" in err
    assert "cannot tell num_heads, taps: pass --arch num_heads=N" in err
    assert not (tmp_path / "o.pth").exists() and leftovers(tmp_path) == []


def test_existing_dst_is_kept_without_force(tmp_path, capsys):
    save_pth(tmp_path / "a.pth", tiny_state(12))
    (tmp_path / "b.safetensors").write_bytes(b"precious")
    err = _fails(capsys, tmp_path / "a.pth", tmp_path / "b.safetensors")
    assert "already exists; pass --force" in err
    assert (tmp_path / "b.safetensors").read_bytes() == b"precious"
    assert convert(tmp_path / "a.pth", tmp_path / "b.safetensors", "--force") == 0
    assert C.read_state(str(tmp_path / "b.safetensors"))[0].keys() == tiny_state(12).keys()


def test_failed_verification_leaves_nothing_behind(tmp_path, monkeypatch):
    state = tiny_state(13)

    def broken_verify(path, reader, expected, shown):
        raise C.ConvertError(f"{shown}: verification failed: simulated")

    monkeypatch.setattr(C, "_verify", broken_verify)
    (tmp_path / "old.pth").write_bytes(b"old")
    with pytest.raises(C.ConvertError, match="simulated"):
        C.write_state(str(tmp_path / "old.pth"), state, "pth", {}, force=True)
    assert (tmp_path / "old.pth").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["old.pth"]


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    sentinel = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in tiny_state(14).items()}, "args": _Evil(sentinel)}, path)
    err = _fails(capsys, path, tmp_path / "o.pth")
    assert "refusing to load" in err and "evil.pth" in err
    assert not os.path.exists(sentinel) and not (tmp_path / "o.pth").exists()
    import pickle
    with open(tmp_path / "raw.pth", "wb") as f:  # a bare pickle, not a torch zip
        pickle.dump({"model": _Evil(sentinel)}, f)
    assert "refusing to load" in _fails(capsys, tmp_path / "raw.pth", tmp_path / "o.pth")
    assert not os.path.exists(sentinel)
    # The sentinel mechanism itself works: an unrestricted load does run the payload.
    torch.load(path, weights_only=False)
    assert os.path.isdir(sentinel)


def test_pth_and_safetensors_work_without_mindspore(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mindspore", None)  # any `import mindspore` now fails
    save_pth(tmp_path / "a.pth", tiny_state(15))
    assert convert(tmp_path / "a.pth", tmp_path / "b.safetensors") == 0
    assert convert(tmp_path / "b.safetensors", tmp_path / "c.pth") == 0
    err = _fails(capsys, tmp_path / "a.pth", tmp_path / "d.ckpt")
    assert "needs MindSpore, which is not installed" in err
    assert not (tmp_path / "d.ckpt").exists() and leftovers(tmp_path) == []


def test_truncated_and_unknown_files_give_one_sentence(tmp_path, capsys):
    save_pth(tmp_path / "a.pth", tiny_state(16))
    data = (tmp_path / "a.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    err = _fails(capsys, tmp_path / "cut.pth", tmp_path / "o.pth")
    assert "cut.pth: not a readable PyTorch checkpoint" in err
    (tmp_path / "junk.pth").write_bytes(b"hello world")
    assert "junk.pth: not a readable PyTorch checkpoint" in _fails(capsys, tmp_path / "junk.pth", tmp_path / "o.pth")
    (tmp_path / "junk.ckpt").write_bytes(b"hello world")
    if HAVE_MINDSPORE:
        assert "junk.ckpt: not a readable MindSpore checkpoint" in _fails(capsys, tmp_path / "junk.ckpt",
                                                                         tmp_path / "o.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world")
    assert "not a readable safetensors file" in _fails(capsys, tmp_path / "junk.safetensors", tmp_path / "o.pth")
    assert "timm output is written as .pth or .safetensors" in _fails(capsys, tmp_path / "a.pth", tmp_path / "t.ckpt",
                                                                     "--to", "timm")
    (tmp_path / "w.npz").write_bytes(b"x")
    assert "unknown file type '.npz'" in _fails(capsys, tmp_path / "w.npz", tmp_path / "o.pth")
    assert "no such file" in _fails(capsys, tmp_path / "nope.pth", tmp_path / "o.pth")


# ---------------------------------------------------------------- Swin

SWIN = get_spec("swin_tiny_test")  # C 16, depths (2,2,2,2), heads (1,2,2,4), window 4, patch 2, img 64


@pytest.fixture(scope="module")
def swin_model():
    from localmim.backends.torch import build_model
    torch.manual_seed(0)
    model = build_model(SWIN).eval()
    with torch.no_grad():  # non-trivial merge norms so that a wrong channel order shows
        for s in range(3):
            norm = model.encoder.layers[s].downsample.norm
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.2)
    return model


def swin_plan_tensors(cell_mask=None):
    from localmim.backends.torch.swin import plan_tensors
    from localmim.core.masking import mask_rng, swin_cell_mask
    from localmim.core.swin_plan import build_swin_plan
    if cell_mask is None:
        cell_mask = swin_cell_mask(mask_rng(0, 0, 0, 0), SWIN.mask_grid, 0.75)
    return plan_tensors(build_swin_plan(SWIN, cell_mask))


def swin_loss(state):
    from localmim.backends.torch import build_model
    model = build_model(SWIN).eval()
    model.import_state(state)
    imgs = torch.from_numpy(C._check_image(None, SWIN))
    with torch.no_grad():
        return float(model(imgs, swin_plan_tensors())[0])


def save_official_swin(path, state):
    """The official LocalMIM Swin file: merges TL,TR,BL,BR, relative_position_index, args Namespace."""
    official = K.to_official_swin(state, SWIN)
    return save_pth(path, official, args=argparse.Namespace(model="mim_swin_tiny", norm_pix_loss=True), epoch=99)


def test_swin_pth_ckpt_safetensors_round_trips_are_bit_identical(tmp_path, swin_model):
    state = swin_model.export_state()
    src = save_pth(tmp_path / "swin.pth", state)
    for mid in ("b.safetensors",) + (("a.ckpt",) if HAVE_MINDSPORE else ()):
        assert convert(src, tmp_path / mid) == 0
        assert convert(tmp_path / mid, tmp_path / (mid + ".pth")) == 0
        back, _ = C.read_state(str(tmp_path / (mid + ".pth")))
        assert_bit_identical(back, state)
        assert_bit_identical(C.read_state(str(tmp_path / mid))[0], state)


def test_official_swin_converts_to_exactly_our_state_and_same_loss(tmp_path, capsys, swin_model):
    state = swin_model.export_state()
    src = save_official_swin(tmp_path / "official.pth", state)
    assert convert(src, tmp_path / "ours.pth") == 0
    out = capsys.readouterr().out
    assert "layout official-localmim-swin" in out and "model swin_tiny_test" in out and "permuted 9" in out
    back, _ = C.read_state(str(tmp_path / "ours.pth"))
    assert_bit_identical(back, state)
    assert swin_loss(back) == swin_loss(state)
    # without the merge permutation the official weights give another loss
    naive = {k: v for k, v in C.read_state(src)[0].items() if not k.endswith("relative_position_index")}
    assert abs(swin_loss(naive) - swin_loss(state)) > 1e-4


def test_writing_the_official_swin_layout_and_reading_it_back(tmp_path, capsys, swin_model):
    state = swin_model.export_state()
    src = save_pth(tmp_path / "ours.pth", state)
    assert convert(src, tmp_path / "off.pth", "--layout", "official-localmim-swin", "--check") == 0
    out = capsys.readouterr().out
    assert "features max abs diff 0.000e+00" in out and "loss abs diff 0.000e+00" in out
    written, _ = C.read_state(str(tmp_path / "off.pth"))
    expected = K.to_official_swin(state, SWIN)
    assert_bit_identical(written, expected)
    assert written["encoder.layers.3.blocks.1.attn.relative_position_index"].dtype == np.int64
    pytest.importorskip("mindspore")  # the rest reads it into the MindSpore model
    assert convert(tmp_path / "off.pth", tmp_path / "ours.ckpt", "--check") == 0
    out = capsys.readouterr().out
    assert "layout official-localmim-swin" in out
    feat = float(out.split("features max abs diff ")[1].split()[0])
    assert feat < 1e-4  # torch source against the MindSpore model reading the .ckpt
    assert_bit_identical(C.read_state(str(tmp_path / "ours.ckpt"))[0], state)


def test_from_flag_marks_an_official_swin_without_index_buffers(tmp_path, capsys, swin_model):
    state = swin_model.export_state()
    official = {k: v for k, v in K.to_official_swin(state, SWIN).items() if not k.endswith("relative_position_index")}
    src = save_pth(tmp_path / "stripped.pth", official)
    assert convert(src, tmp_path / "a.pth", "--from", "official-localmim-swin") == 0
    assert_bit_identical(C.read_state(str(tmp_path / "a.pth"))[0], state)
    assert convert(src, tmp_path / "b.pth") == 0  # detected as ours: names alone cannot tell
    assert "layout localmim-swin" in capsys.readouterr().out
    assert convert(src, tmp_path / "c.pth", "--from", "localmim-vit") == 2
    assert "layout localmim-vit does not fit its keys, which are Swin keys" in capsys.readouterr().err
    assert convert(src, tmp_path / "c.pth", "--from", "localmim") == 2
    assert "unknown source layout 'localmim' ('localmim' is now 'localmim-vit')" in capsys.readouterr().err


def test_swin_timm_export_loads_strict_and_matches_our_encoder(tmp_path, swin_model):
    import functools
    import timm
    src = save_pth(tmp_path / "ours.pth", swin_model.export_state())
    assert convert(src, tmp_path / "timm.safetensors", "--to", "timm") == 0
    state, _ = C.read_state(str(tmp_path / "timm.safetensors"))
    kw = K.timm_swin_kwargs(SWIN)
    model = timm.create_model(kw.pop("model_name"), norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                              **kw).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    imgs = torch.from_numpy(C._check_image(None, SWIN))
    visible = np.zeros(SWIN.mask_grid ** 2, bool)  # all cells visible: plain windowed Swin
    with torch.no_grad():
        ref = model.forward_features(imgs).reshape(1, -1, 8 * SWIN.embed_dim)
        ours = swin_model.forward_encoder(imgs, swin_plan_tensors(visible))[-1]  # last stage: raster order
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-4, rtol=1e-4)


def test_swin_encoder_export_and_check(tmp_path, capsys, swin_model):
    src = save_pth(tmp_path / "ours.pth", swin_model.export_state())
    assert convert(src, tmp_path / "enc.pth", "--layout", "swin-encoder", "--check") == 0
    out = capsys.readouterr().out
    assert "layout swin-encoder" in out and "features max abs diff 0.000e+00" in out and "loss" not in out.split("verified")[1]
    enc, _ = C.read_state(str(tmp_path / "enc.pth"))
    assert "norm.weight" in enc and not any(k.startswith(("encoder.", "decoder.")) for k in enc)
    assert convert(tmp_path / "enc.pth", tmp_path / "full.pth", "--layout", "localmim-swin") == 2
    assert "missing key(s): decoder.0." in capsys.readouterr().err
    assert convert(tmp_path / "enc.pth", tmp_path / "enc2.safetensors", "--layout", "swin-encoder") == 0
    assert_bit_identical(C.read_state(str(tmp_path / "enc2.safetensors"))[0], enc)
    assert convert(tmp_path / "enc.pth", tmp_path / "ours_enc.safetensors") == 0  # default: ours, encoder part
    ours_enc, meta = C.read_state(str(tmp_path / "ours_enc.safetensors"))
    assert meta["layout"] == "localmim-swin-encoder" and set(ours_enc) == set(S.swin_encoder_shapes(SWIN))
    np.testing.assert_array_equal(ours_enc["encoder.norm.3.weight"], enc["norm.weight"])
    np.testing.assert_array_equal(ours_enc["encoder.norm.0.weight"], np.ones(SWIN.branches()[0].in_dim, np.float32))
    assert convert(src, tmp_path / "x.pth", "--layout", "timm-swin") == 0  # the same as --to timm
    assert convert(src, tmp_path / "y.pth", "--to", "timm") == 0
    assert_bit_identical(torch_plain(tmp_path / "x.pth"), torch_plain(tmp_path / "y.pth"))
    assert convert(src, tmp_path / "z.ckpt", "--layout", "timm-swin") == 2
    assert "the timm-swin layout is written as .pth or .safetensors, not .ckpt" in capsys.readouterr().err


def test_swin_mismatched_keys_are_named(tmp_path, capsys, swin_model):
    state = swin_model.export_state()
    bad = dict(state)
    del bad["decoder.1.pred.bias"]
    bad["encoder.layers.0.downsample.reduction.weight"] = np.zeros((32, 32), np.float32)
    assert convert(save_pth(tmp_path / "bad.pth", bad), tmp_path / "o.pth") == 2
    err = capsys.readouterr().err
    assert "encoder.layers.0.downsample.reduction.weight expected (32, 64) found (32, 32)" in err
    assert "decoder.1.pred.bias" in err and not os.path.exists(tmp_path / "o.pth")
    official = K.to_official_swin(state, SWIN)
    official["encoder.layers.1.blocks.0.attn.relative_position_index"] = np.zeros((16, 16), np.int64)
    assert convert(save_pth(tmp_path / "off.pth", official), tmp_path / "o.pth") == 2
    assert "encoder.layers.1.blocks.0.attn.relative_position_index" in capsys.readouterr().err
    assert convert(save_pth(tmp_path / "s.pth", state), tmp_path / "o.pth", "--model", "swin_demo") == 2
    assert "fits no registered Swin model" in capsys.readouterr().err


# ---------------------------------------------------------------- every layout, both ways

from localmim.core import layouts as LY  # noqa: E402


def mae_full_shapes(spec, dd=16, depth=2, hidden=64):
    """The MAE pretraining key list (facebookresearch/mae models_mae.py), written out here,
    independently of the converter: encoder, final norm, decoder of width dd and `depth` blocks."""
    d, p, n = spec.embed_dim, spec.patch_size, spec.num_patches
    out = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d), "patch_embed.proj.weight": (d, 3, p, p),
           "patch_embed.proj.bias": (d,)}

    def block(b, w, h):
        return {f"{b}.norm1.weight": (w,), f"{b}.norm1.bias": (w,), f"{b}.attn.qkv.weight": (3 * w, w),
                f"{b}.attn.qkv.bias": (3 * w,), f"{b}.attn.proj.weight": (w, w), f"{b}.attn.proj.bias": (w,),
                f"{b}.norm2.weight": (w,), f"{b}.norm2.bias": (w,), f"{b}.mlp.fc1.weight": (h, w),
                f"{b}.mlp.fc1.bias": (h,), f"{b}.mlp.fc2.weight": (w, h), f"{b}.mlp.fc2.bias": (w,)}

    for i in range(spec.depth):
        out.update(block(f"blocks.{i}", d, int(d * spec.mlp_ratio)))
    out.update({"norm.weight": (d,), "norm.bias": (d,)})
    if dd:
        out.update({"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
                    "decoder_pos_embed": (1, 1 + n, dd), "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                    "decoder_pred.weight": (p * p * 3, dd), "decoder_pred.bias": (p * p * 3,)})
        for j in range(depth):
            out.update(block(f"decoder_blocks.{j}", dd, hidden))
    return out


def swin_rand_state(spec, seed=0):
    return rand_state(S.swin_canonical_shapes(spec), seed)


def _back_layout(layout):
    info = LY.LAYOUT_INFO[layout]
    return f"localmim-{info.family}" + ("" if info.parts == "full" and layout != "mae" else "-encoder")


@pytest.mark.parametrize("layout", LY.LAYOUTS)
def test_round_trips_through_every_writable_layout_are_bit_identical(tmp_path, capsys, layout):
    """ours (or MAE for "mae") -> LAYOUT -> LAYOUT again (bit-identical) -> ours (every kept tensor
    bit-identical to the source), in every format the layout is written in."""
    info = LY.LAYOUT_INFO[layout]
    if info.family == "vit":
        src = mae_state_full = rand_state(mae_full_shapes(TINY), 30) if layout == "mae" else tiny_state(30)
        canon = K.to_canonical(mae_state_full, "mae", TINY)[0] if layout == "mae" else src
    else:
        src = canon = swin_rand_state(SWIN, 31)
    path = save_pth(tmp_path / "src.pth", src)
    for fmt in info.writes:
        if fmt == "ckpt":
            pytest.importorskip("mindspore")
        ext = {"pth": ".pth", "ckpt": ".ckpt", "safetensors": ".safetensors"}[fmt]
        first, second, back = (tmp_path / f"{n}_{fmt}{ext}" for n in ("first", "second", "back"))
        assert convert(path, first, "--layout", layout) == 0, capsys.readouterr().err
        written, meta = C.read_state(str(first))
        if layout not in ("timm-vit", "timm-swin") or fmt != "pth":  # a timm .pth is a plain state dict
            assert meta["layout"] == layout and meta["arch"]["name"] == (TINY if info.family == "vit" else SWIN).name
        plain_timm_vit = layout == "timm-vit" and fmt == "pth"  # no record, and the names of an MAE encoder
        assert LY.resolve_layout(written, recorded=meta.get("layout"))[0] == (
            "mae-encoder" if plain_timm_vit else layout)
        assert convert(first, second, "--layout", layout) == 0, capsys.readouterr().err
        assert_bit_identical(written, C.read_state(str(second))[0])
        assert convert(first, back, "--layout", _back_layout(layout)) == 0, capsys.readouterr().err
        ours = C.read_state(str(back))[0]
        kept = [k for k in ours if k in canon and k.rsplit(".", 1)[0] not in _branch_norms(info)]
        assert_bit_identical({k: ours[k] for k in kept}, {k: canon[k] for k in kept})
        if info.parts == "full" and layout != "mae":
            assert set(ours) == set(canon)
        capsys.readouterr()
    assert leftovers(tmp_path) == []


def _branch_norms(info):
    """Branch norms a final-norm layout cannot carry (all but the last): initialised on the way back."""
    if info.name.startswith(("localmim-", "official-")) or info.name == "mae":
        return set()
    return {f"norm.{k}" for k in range(3)} | {f"encoder.norm.{k}" for k in range(3)}


def _mae_module(spec, decoder, dd=16, depth=2, dec_heads=2):
    """A MaskedAutoencoderViT built from MAE's own structure (timm blocks), not from our key lists."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block
    nn = torch.nn
    d, n = spec.embed_dim, spec.num_patches

    class MAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, 3, d)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d), requires_grad=False)
            self.blocks = nn.ModuleList([Block(d, spec.num_heads, spec.mlp_ratio, qkv_bias=True)
                                         for _ in range(spec.depth)])
            self.norm = nn.LayerNorm(d, eps=1e-6)
            if decoder:
                self.decoder_embed = nn.Linear(d, dd)
                self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
                self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dd), requires_grad=False)
                self.decoder_blocks = nn.ModuleList([Block(dd, dec_heads, 4.0, qkv_bias=True) for _ in range(depth)])
                self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
                self.decoder_pred = nn.Linear(dd, spec.patch_size ** 2 * 3)

        def features(self, imgs):
            x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
            x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)

    return MAE()


def test_mae_written_here_loads_into_an_mae_model(tmp_path):
    pytest.importorskip("timm")
    model, state = _perturbed_torch_model(32)
    save_pth(tmp_path / "ours.pth", state)
    assert convert(tmp_path / "ours.pth", tmp_path / "mae_enc.pth", "--layout", "mae-encoder") == 0
    payload = torch.load(str(tmp_path / "mae_enc.pth"), weights_only=True)
    mae = _mae_module(TINY, decoder=False).eval()
    assert {k: tuple(v.shape) for k, v in mae.state_dict().items()} == mae_full_shapes(TINY, dd=0)
    mae.load_state_dict(payload["model"], strict=True)  # MAE's main_finetune reads checkpoint["model"]
    imgs = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        ours = model.forward_encoder(imgs, {"ids_keep": torch.arange(TINY.num_patches).expand(2, -1)})[-1]
        assert torch.max(torch.abs(mae.features(imgs) - ours)).item() < 1e-5
    full = rand_state(mae_full_shapes(TINY), 33)  # an MAE pretraining file: its decoder goes along
    save_pth(tmp_path / "mae.pth", full, args=argparse.Namespace(norm_pix_loss=True))
    assert convert(tmp_path / "mae.pth", tmp_path / "mae2.safetensors", "--layout", "mae") == 0
    written, _ = C.read_state(str(tmp_path / "mae2.safetensors"))
    mae = _mae_module(TINY, decoder=True)
    assert {k: tuple(v.shape) for k, v in mae.state_dict().items()} == mae_full_shapes(TINY)
    mae.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
    assert_bit_identical(written, full)


# ---------------------------------------------------------------- architectures the registry does not know

ODD_VIT = ViTSpec("odd", patch_size=16, embed_dim=48, depth=8, num_heads=4, img_size=64, decoder_dim=24,
                  decoder_heads=3, target=TargetSpec(kind="hog", nbins=9))
ODD_SWIN = SwinSpec("odd_swin", embed_dim=12, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 3), window_size=4,
                    patch_size=2, img_size=64, decoder_dims=(8, 8, 8, 16), decoder_heads=2, target=TargetSpec(kind="pixel"))


def _model_state(spec, seed):
    from localmim.backends.torch import build_model
    torch.manual_seed(seed)
    return build_model(spec).export_state()


def test_unregistered_vit_converts_with_arch_options_and_reloads_with_none(tmp_path, capsys):
    state = _model_state(ODD_VIT, 34)
    src = save_pth(tmp_path / "official.pth", state, args=argparse.Namespace(model="MIM_vit_odd"), epoch=99)
    err = _fails(capsys, src, tmp_path / "o.safetensors")
    assert "fits no registered model" in err and "--arch num_heads=N" in err and "--arch decoder_heads=N" in err
    assert not (tmp_path / "o.safetensors").exists()
    assert convert(src, tmp_path / "o.safetensors", "--arch", "num_heads=4", "--arch", "decoder_heads=3",
                   "--check") == 0
    out = capsys.readouterr().out
    assert "layout official-localmim-vit" in out and "model vit_p16_d48_depth8 (not registered" in out
    assert "loss abs diff 0.000e+00" in out
    back, meta = C.read_state(str(tmp_path / "o.safetensors"))
    assert_bit_identical(back, state)
    assert meta["arch"]["num_heads"] == 4 and meta["arch"]["taps"] == [1, 3, 5, 7]
    assert convert(tmp_path / "o.safetensors", tmp_path / "again.pth") == 0  # no options: the recorded arch
    assert "(not registered; from the architecture recorded in the file)" in capsys.readouterr().out
    assert_bit_identical(C.read_state(str(tmp_path / "again.pth"))[0], state)
    spec, canon, _ = C.read_pretrained(str(tmp_path / "again.pth"))
    assert spec == ODD_VIT.with_(name="vit_p16_d48_depth8")
    assert_bit_identical(canon, state)


def test_unregistered_swin_converts_with_arch_options_and_reloads_with_none(tmp_path, capsys):
    state = _model_state(ODD_SWIN, 35)
    src = save_pth(tmp_path / "official.pth", K.to_official_swin(state, ODD_SWIN))
    err = _fails(capsys, src, tmp_path / "o.pth")
    assert "cannot tell decoder_heads: pass --arch decoder_heads=N" in err
    assert convert(src, tmp_path / "o.pth", "--arch", "decoder_heads=2", "--check") == 0
    out = capsys.readouterr().out
    assert "permuted 9 merge tensor(s)" in out and "loss abs diff 0.000e+00" in out
    assert_bit_identical(C.read_state(str(tmp_path / "o.pth"))[0], state)
    assert convert(tmp_path / "o.pth", tmp_path / "again.safetensors", "--layout", "official-localmim-swin") == 0
    assert_bit_identical(C.read_state(str(tmp_path / "again.safetensors"))[0], C.read_state(src)[0])
    spec, canon, _ = C.read_pretrained(str(tmp_path / "again.safetensors"))
    assert spec == ODD_SWIN.with_(name="swin_p2_c12_w4") and canon.keys() == state.keys()


def test_arch_file_gives_the_same_as_arch_options(tmp_path, capsys):
    src = save_pth(tmp_path / "odd.pth", _model_state(ODD_VIT, 36))
    (tmp_path / "arch.yaml").write_text("num_heads: 4\ndecoder_heads: 3\nname: my_vit\n")
    assert convert(src, tmp_path / "a.safetensors", "--arch-file", tmp_path / "arch.yaml") == 0
    assert C.read_state(str(tmp_path / "a.safetensors"))[1]["arch"]["name"] == "my_vit"


# ---------------------------------------------------------------- resampling

def test_vit_img_size_resampling_recomputes_sincos_and_interpolates_learned_tables(tmp_path, capsys):
    _, state = _perturbed_torch_model(37)
    src = save_pth(tmp_path / "ours.pth", state)
    assert convert(src, tmp_path / "big.pth", "--img-size", "48", "--check") == 0
    out = capsys.readouterr().out
    assert "pos_embed: grid 4 -> 6 (recomputed)" in out and "max abs diff 0.000e+00" in out
    from localmim.core.pos_embed import sincos_2d
    big, meta = C.read_state(str(tmp_path / "big.pth"))
    np.testing.assert_array_equal(big["pos_embed"][0], sincos_2d(32, 6, cls_token=True))
    np.testing.assert_array_equal(big["decoder.3.pos_embed"][0], sincos_2d(16, 6, cls_token=True))
    assert meta["arch"]["img_size"] == 48
    timm_state = K.to_timm(state, TINY)
    timm_state["pos_embed"] = np.random.default_rng(5).standard_normal((1, 17, 32)).astype(np.float32)  # learned
    save_pth(tmp_path / "timm.pth", timm_state)
    assert convert(tmp_path / "timm.pth", tmp_path / "timm48.pth", "--to", "timm", "--img-size", "48") == 0
    got = torch_plain(tmp_path / "timm48.pth")["pos_embed"]
    grid = torch.from_numpy(timm_state["pos_embed"][:, 1:].reshape(1, 4, 4, 32)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got[0, 1:], ref.permute(0, 2, 3, 1).reshape(36, 32).numpy(), atol=2e-5, rtol=0)
    np.testing.assert_array_equal(got[0, 0], timm_state["pos_embed"][0, 0])
    err = _fails(capsys, src, tmp_path / "o.pth", "--arch", "img_size=48")
    assert "img_size=48 (the shapes say 32); resample with --img-size" in err


def test_swin_window_resampling_interpolates_relative_tables(tmp_path, capsys, swin_model):
    state = swin_model.export_state()
    src = save_pth(tmp_path / "ours.pth", state)
    assert convert(src, tmp_path / "w8.safetensors", "--window", "8", "--check") == 0
    out = capsys.readouterr().out
    assert "stage 0 relative_position_bias_table x2: window 4 -> 8 (bicubic)" in out
    got, meta = C.read_state(str(tmp_path / "w8.safetensors"))
    key = "encoder.layers.2.blocks.1.attn.relative_position_bias_table"
    table = torch.from_numpy(state[key]).T.reshape(1, -1, 7, 7)
    ref = torch.nn.functional.interpolate(table, size=(15, 15), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got[key], ref.reshape(-1, 225).T.numpy(), atol=2e-5, rtol=0)
    assert got["encoder.layers.3.blocks.0.attn.relative_position_bias_table"].shape == (49, 4)  # stage 3: 4x4
    assert meta["arch"]["window_size"] == 8
    assert "--window applies to Swin models" in _fails(capsys, save_pth(tmp_path / "v.pth", tiny_state(3)),
                                                       tmp_path / "o.pth", "--window", "8")


# ---------------------------------------------------------------- every bad input: one sentence, exit 2, nothing left

def _truncated(tmp_path, ext):
    good = tmp_path / f"good{ext}"
    if ext == ".ckpt":
        pytest.importorskip("mindspore")
    C.write_state(str(good), tiny_state(40), ext[1:], {})
    data = good.read_bytes()
    bad = tmp_path / f"cut{ext}"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _int_safetensors(tmp_path):
    from safetensors.numpy import save_file
    state = tiny_state(41)
    state["blocks.0.attn.qkv.weight"] = np.zeros((96, 32), np.int32)
    save_file(state, str(tmp_path / "int.safetensors"))
    return tmp_path / "int.safetensors"


def _pickle_with_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "args": _Evil(str(tmp_path / "pwned"))}, str(path))
    return path


BAD_INPUTS = {
    "unknown source layout": (lambda t: (save_pth(t / "a.pth", tiny_state(42)), "--from", "nope"),
                              "unknown source layout 'nope'; known layouts: localmim-vit, "),
    "unknown destination layout": (lambda t: (save_pth(t / "a.pth", tiny_state(42)), "--layout", "caffe"),
                                   "unknown destination layout 'caffe'"),
    "missing arch value": (lambda t: (save_pth(t / "odd.pth", _model_state(ODD_VIT, 43)),),
                           "cannot tell num_heads, decoder_heads: pass --arch num_heads=N"),
    "arch option without a value": (lambda t: (save_pth(t / "a.pth", tiny_state(42)), "--arch", "num_heads"),
                                    "--arch 'num_heads': expected KEY=VALUE"),
    "unknown arch key": (lambda t: (save_pth(t / "a.pth", tiny_state(42)), "--arch", "heads=3"),
                         "unknown architecture key(s) heads"),
    "truncated pth": (lambda t: (_truncated(t, ".pth"),), "cut.pth: not a readable PyTorch checkpoint"),
    "truncated safetensors": (lambda t: (_truncated(t, ".safetensors"),), "cut.safetensors: not a readable safetensors"),
    "truncated ckpt": (lambda t: (_truncated(t, ".ckpt"),), "cut.ckpt: not a readable MindSpore checkpoint"),
    "safetensors with a wrong dtype": (lambda t: (_int_safetensors(t),),
                                       "entry 'blocks.0.attn.qkv.weight' has dtype int32; model weights must be "
                                       "floating point"),
    "pickle with code": (lambda t: (_pickle_with_code(t),), "refusing to load it"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_bad_input_is_one_sentence_exit_2_and_nothing_at_the_output(tmp_path, capsys, case, ext):
    make, message = BAD_INPUTS[case]
    src, *options = make(tmp_path)
    capsys.readouterr()
    dst = tmp_path / f"out{ext}"
    err = _fails(capsys, src, dst, *options)
    assert message in err, err
    assert err.count(". ") <= 1 or "key(s)" in err  # one sentence (lists aside)
    assert not dst.exists() and leftovers(tmp_path) == [] and not (tmp_path / "pwned").exists()


def test_unknown_layout_through_the_localmim_command_is_one_line(tmp_path, capsys):
    from localmim.tools import cli
    src = save_pth(tmp_path / "a.pth", tiny_state(44))
    assert cli.main(["convert", src, str(tmp_path / "o.pth"), "--from", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown source layout 'nope'" in err and not (tmp_path / "o.pth").exists()


def test_list_layouts_names_every_layout_with_its_formats(capsys):
    with pytest.raises(SystemExit) as stop:
        convert("--list-layouts")
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, info in LY.LAYOUT_INFO.items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert row.split()[1:4] == [info.family, "pth,ckpt,safetensors", ",".join(info.writes)]
