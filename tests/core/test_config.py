"""core.config: YAML loading, validation errors that name file/key/value, overrides, round trip."""
import os

import pytest
import yaml

from localmim.core.config import (
    ConfigError, PretrainConfig, config_to_dict, list_bundled_configs, load_config, parse_override,
    resolve_config_path, save_config,
)
from localmim.core.specs import SwinSpec, ViTSpec

PAPER = {
    # name: (model, per-GPU batch, accum, blr, epochs, warmup, min_lr, kind, nbins, hog_bias, lr at 8 GPUs)
    "vit_small_hog": ("vit_small_patch16", 256, 1, 2e-4, 1600, 40, 1e-6, "hog", 9, False, 1.6e-3),
    "vit_base_hog": ("vit_base_patch16", 256, 1, 2e-4, 1600, 40, 1e-6, "hog", 9, False, 1.6e-3),
    "vit_large_hog": ("vit_large_patch16", 128, 4, 1.5e-4, 800, 40, 1e-6, "hog", 18, True, 2.4e-3),
    "swin_base_pixel": ("swin_base_patch4_win7", 256, 1, 1e-4, 400, 40, 0.0, "pixel", 9, False, 8e-4),
    "swin_base_hog": ("swin_base_patch4_win7", 256, 1, 1e-4, 400, 40, 0.0, "hog", 18, True, 8e-4),
    "swin_large_hog": ("swin_large_patch4_win14", 128, 4, 1e-4, 800, 40, 0.0, "hog", 18, True, 1.6e-3),
}


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def message(exc_info):
    return str(exc_info.value)


# ---------------------------------------------------------------------------- bundled recipes

def test_every_bundled_config_loads_and_builds_its_spec():
    names = list_bundled_configs()
    assert set(PAPER) | {"demo_vit", "demo_swin"} <= set(names)
    for name in names:
        cfg = load_config(name)
        spec = cfg.build_spec()
        assert spec.name == cfg.model.name
        assert spec.target.kind == cfg.target.kind and spec.target.nbins == cfg.target.nbins


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_match_the_reference(name):
    model, batch, accum, blr, epochs, warmup, min_lr, kind, nbins, bias, lr8 = PAPER[name]
    cfg = load_config(name)
    assert cfg.model.name == model
    assert (cfg.data.batch_size, cfg.optim.accum_iter) == (batch, accum)
    assert (cfg.optim.blr, cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.min_lr) == (blr, epochs, warmup, min_lr)
    assert (cfg.target.kind, cfg.target.hog_bias) == (kind, bias)
    if kind == "hog":
        assert cfg.target.nbins == nbins
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.05 and cfg.mask.ratio == 0.75
    assert cfg.resolved_lr(world_size=8) == pytest.approx(lr8, rel=1e-12)


def test_demo_configs_are_cpu_sized():
    vit = load_config("demo_vit")
    assert (vit.model.name, vit.target.kind, vit.target.norm_pix) == ("vit_mini", "pixel", False)
    assert (vit.data.batch_size, vit.data.num_workers, vit.train.precision) == (16, 1, "fp32")
    assert vit.train.max_steps == 300 and vit.train.save_every_steps == 100 and vit.train.log_every == 10
    assert vit.build_spec().img_size == 96 and vit.train.tensorboard is False
    swin = load_config("demo_swin")
    assert isinstance(swin.build_spec(), SwinSpec) and swin.model.name == "swin_demo"


def test_bundled_names_resolve_with_and_without_folder(tmp_path):
    a = resolve_config_path("vit_base_hog")
    assert a == resolve_config_path("pretrain/vit_base_hog") == resolve_config_path("vit_base_hog.yaml")
    assert a.name == "vit_base_hog.yaml" and a.parent.name == "pretrain"
    with pytest.raises(ConfigError) as e:
        load_config("vit_bsae_hog")
    assert "did you mean 'vit_base_hog'" in message(e)


# ---------------------------------------------------------------------------- errors

def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert message(e) == f"{os.path.relpath(path)}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_unknown_section_suggests(tmp_path):
    path = write(tmp_path, "optm:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "unknown section 'optm'" in message(e) and "did you mean 'optim'" in message(e)
    assert "x.yaml" in message(e)


def test_wrong_type_names_key_value_and_file(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "x.yaml" in message(e) and "data.batch_size" in message(e) and "'many'" in message(e)
    assert "integer" in message(e)
    for text in ("data:\n  batch_size: 2.5\n", "train:\n  compile: 1\n", "model:\n  taps: 3\n",
                 "optim:\n  betas: [0.9, fast]\n"):
        with pytest.raises(ConfigError, match="wrong type"):
            load_config(str(write(tmp_path, "model:\n  name: vit_demo\n" + text if "taps" not in text else text)))


@pytest.mark.parametrize("text, key, value", [
    ("mask:\n  ratio: 1.0\n", "mask.ratio", "1.0"),
    ("mask:\n  ratio: 0\n", "mask.ratio", "0.0"),
    ("data:\n  batch_size: 0\n", "data.batch_size", "0"),
    ("data:\n  batch_size: -4\n", "data.batch_size", "-4"),
    ("train:\n  precision: fp8\n", "train.precision", "'fp8'"),
    ("train:\n  device: gpu\n", "train.device", "'gpu'"),
    ("target:\n  kind: depth\n", "target.kind", "'depth'"),
    ("optim:\n  epochs: 10\n  warmup_epochs: 20\n", "optim.warmup_epochs", "20.0"),
    ("optim:\n  accum_iter: 0\n", "optim.accum_iter", "0"),
    ("optim:\n  betas: [0.9]\n", "optim.betas", "[0.9]"),
])
def test_bad_values_name_key_value_and_file(tmp_path, text, key, value):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert message(e).startswith(f"{os.path.relpath(path)}: {key} = {value} is invalid")


def test_unknown_model_lists_known_ones(tmp_path):
    path = write(tmp_path, "model:\n  name: vit_gigantic\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "model.name = 'vit_gigantic'" in message(e) and "vit_base_patch16" in message(e)
    assert "x.yaml" in message(e)


def test_spec_error_is_wrapped_with_the_file_name(tmp_path):
    path = write(tmp_path, "model:\n  name: vit_demo\n  taps: [1, 3, 3, 7]\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert message(e).startswith(f"{os.path.relpath(path)}: the model does not build:")
    assert "duplicates" in message(e)
    path = write(tmp_path, "model:\n  name: vit_base_patch16\n  img_size: 200\n", "y.yaml")
    with pytest.raises(ConfigError, match=r"y\.yaml: the model does not build: .*not a multiple of patch_size"):
        load_config(str(path))


def test_swin_rejects_taps(tmp_path):
    path = write(tmp_path, "model:\n  name: swin_demo\n  taps: [0, 1, 2, 3]\n")
    with pytest.raises(ConfigError, match="model.taps .* Swin"):
        load_config(str(path))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name: [vit_demo\noptim:\n  lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "x.yaml: not valid YAML at line" in message(e)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(write(tmp_path, "- model\n- optim\n")))


def test_empty_file_gives_defaults_and_floats_written_without_dot_parse(tmp_path):
    assert load_config(str(write(tmp_path, ""))) == PretrainConfig()
    cfg = load_config(str(write(tmp_path, "optim:\n  blr: 1e-4\n  lr: 3\n", "z.yaml")))
    assert cfg.optim.blr == 1e-4 and isinstance(cfg.optim.blr, float)
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)


# ---------------------------------------------------------------------------- overrides

def test_overrides_are_parsed_as_yaml_and_validated():
    cfg = load_config("demo_vit", ["optim.blr=1e-4", "model.taps=[0,2,3,5]", "optim.clip_grad=1.5",
                                   "train.max_steps=null", "data.path=/tmp/images"])
    assert cfg.optim.blr == 1e-4 and cfg.model.taps == [0, 2, 3, 5] and cfg.optim.clip_grad == 1.5
    assert cfg.train.max_steps is None and cfg.data.path == "/tmp/images"
    assert cfg.build_spec().taps == (0, 2, 3, 5)
    assert parse_override("model.taps=[1, 3]") == ("model.taps", [1, 3])
    assert parse_override("train.seed=7") == ("train.seed", 7)


def test_override_errors_name_the_override_and_file():
    with pytest.raises(ConfigError) as e:
        load_config("demo_vit", ["optim.lrr=1"])
    assert message(e) == ("configs/pretrain/demo_vit.yaml: override 'optim.lrr=1': "
                          "unknown key 'optim.lrr' (did you mean 'optim.lr'?)")
    with pytest.raises(ConfigError, match=r"override 'optim.blr=fast': optim.blr = 'fast' has the wrong type"):
        load_config("demo_vit", ["optim.blr=fast"])
    with pytest.raises(ConfigError, match=r"demo_vit.yaml with overrides mask.ratio=1.5: mask.ratio = 1.5 is invalid"):
        load_config("demo_vit", ["mask.ratio=1.5"])
    with pytest.raises(ConfigError, match="the model does not build"):
        load_config("demo_vit", ["model.taps=[1,1,5,7]"])
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config("demo_vit", ["optim"])


# ---------------------------------------------------------------------------- saving

def test_saved_config_round_trips(tmp_path):
    cfg = load_config("vit_large_hog", ["optim.lr=0.0031", "model.taps=[1,5,21,23]", "train.output_dir=out/x",
                                        "data.crop_ratio=[0.7, 1.4285714285714286]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert sorted(os.listdir(tmp_path / "run")) == ["config.yaml"]      # no temporary file left
    again = load_config(str(path))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    plain = yaml.safe_load(path.read_text())
    assert plain["optim"]["lr"] == 0.0031 and plain["model"]["taps"] == [1, 5, 21, 23]
    assert isinstance(again.build_spec(), ViTSpec)


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config("demo_vit"), path)
    save_config(load_config("demo_swin"), path)
    assert load_config(str(path)).model.name == "swin_demo"
