"""Typed, validated configuration: YAML recipes plus command-line `key=value` overrides.

The dataclasses below are the contract that both backends' engines read. A config file is YAML
with up to six sections (`model`, `target`, `mask`, `data`, `optim`, `train`); missing sections or
keys keep their defaults, unknown ones are errors that name the file and suggest the closest key.

    cfg = load_config("demo_vit", ["optim.blr=1e-4", "model.taps=[1,3,5,7]"])
    save_config(cfg, "output/demo/config.yaml")     # load_config(that path) == cfg
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from localmim.core.files import write_text_atomically
from localmim.core.specs import SWIN_SPECS, SpecError, TargetSpec, get_spec, list_specs

__all__ = [
    "ConfigError", "ModelConfig", "TargetConfig", "MaskConfig", "DataConfig", "OptimConfig",
    "TrainConfig", "PretrainConfig", "SECTIONS", "load_config", "parse_override", "config_to_dict",
    "config_from_dict", "save_config", "bundled_config_dir", "list_bundled_configs",
    "resolve_config_path", "validate_config",
]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the file and the key."""


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16"        # a key of core.specs.VIT_SPECS / SWIN_SPECS
    img_size: Optional[int] = None         # None: the spec's own size
    taps: Optional[List[int]] = None       # ViT only; None: the spec's taps


@dataclass
class TargetConfig:
    kind: str = "hog"                      # "hog" | "pixel"
    nbins: int = 9
    hog_bias: bool = False
    norm_pix: bool = True


@dataclass
class MaskConfig:
    ratio: float = 0.75


@dataclass
class DataConfig:
    path: Optional[str] = None             # None: the bundled sample photographs (resolved by the CLI)
    batch_size: int = 64                   # per rank, per micro-batch
    num_workers: int = 4
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = 0.5


@dataclass
class OptimConfig:
    lr: Optional[float] = None             # absolute lr; None: blr * eff_batch / 256
    blr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    epochs: int = 400
    warmup_epochs: float = 40
    accum_iter: int = 1
    clip_grad: Optional[float] = None


@dataclass
class TrainConfig:
    seed: int = 0
    precision: str = "auto"                # auto | fp32 | bf16 | fp16 (auto: bf16 on GPU, fp32 on CPU)
    device: str = "auto"                   # auto | cpu | cuda | ascend
    output_dir: str = "output/pretrain"
    max_steps: Optional[int] = None        # stop after this many optimizer steps in total
    log_every: int = 10                    # optimizer steps between log.jsonl lines
    save_every_steps: Optional[int] = None
    save_every_epochs: int = 50
    keep_checkpoints: int = 3
    compile: Optional[bool] = None         # None: the backend's fast path (MindSpore ms.jit, PyTorch eager)
    progress: Optional[bool] = None        # None: a bar only when stderr is a terminal
    # Where a run starts (README "Long runs"): latest_valid = the newest checkpoint of output_dir that
    # loads (newer broken ones are moved to <name>.broken with a warning); latest = the newest or an
    # error; none = start over (an error if output_dir holds checkpoints); or a checkpoint path.
    resume: str = "latest_valid"
    on_save_error: str = "stop"            # a checkpoint that cannot be written: stop | warn (train on without it)
    collective_timeout_s: float = 1800.0   # torch process-group timeout: how long ranks wait for a lost one
    tensorboard: bool = False              # TensorBoard event files in <output_dir>/tensorboard (rank 0)
    tensorboard_images_every_epochs: int = 10  # the reconstruction figure every N epochs and at the end; 0: never


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def build_spec(self):
        """The validated ViTSpec / SwinSpec this config describes."""
        overrides = {"target": TargetSpec(kind=self.target.kind, nbins=self.target.nbins,
                                          hog_bias=self.target.hog_bias, norm_pix=self.target.norm_pix)}
        if self.model.img_size is not None:
            overrides["img_size"] = self.model.img_size
        if self.model.taps is not None:
            overrides["taps"] = tuple(self.model.taps)
        return get_spec(self.model.name, **overrides)

    def effective_batch(self, world_size: int = 1) -> int:
        return self.data.batch_size * self.optim.accum_iter * world_size

    def resolved_lr(self, world_size: int = 1) -> float:
        if self.optim.lr is not None:
            return float(self.optim.lr)
        return self.optim.blr * self.effective_batch(world_size) / 256


SECTIONS: Dict[str, type] = {
    "model": ModelConfig, "target": TargetConfig, "mask": MaskConfig,
    "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
}

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESUME_KEYWORDS = ("latest_valid", "latest", "none")  # or a checkpoint path (backends/runs.py RESUME_POLICIES)
SAVE_ERROR_POLICIES = ("stop", "warn")
DEVICES = ("auto", "cpu", "cuda", "ascend")
TARGET_KINDS = ("hog", "pixel")


# ----------------------------------------------------------------------------------------------
# Locating config files

def bundled_config_dir() -> Path:
    """The folder holding the bundled recipes (package data `localmim.configs`)."""
    try:
        from importlib.resources import files
        root = Path(str(files("localmim.configs")))
        if root.is_dir():
            return root
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "configs"


def list_bundled_configs(kind: str = "pretrain") -> List[str]:
    """Names of the bundled recipes of one kind, e.g. ['demo_swin', 'demo_vit', 'vit_base_hog', ...]."""
    folder = bundled_config_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_config_path(path_or_name: Union[str, os.PathLike], kind: str = "pretrain") -> Path:
    """An existing file path, or a bundled name ("demo_vit", "pretrain/vit_base_hog", "demo_vit.yaml")."""
    candidate = Path(path_or_name)
    if candidate.is_file():
        return candidate
    text = str(path_or_name)
    if candidate.exists():
        raise ConfigError(f"config {text!r} is not a file")
    stem = text[:-5] if text.endswith(".yaml") else text[:-4] if text.endswith(".yml") else text
    name = stem[len(kind) + 1:] if stem.startswith(f"{kind}/") else stem
    bundled = bundled_config_dir() / kind / f"{name}.yaml"
    if "/" not in name and "\\" not in name and bundled.is_file():
        return bundled
    names = list_bundled_configs(kind)
    close = difflib.get_close_matches(Path(name).name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"config {text!r} not found: no such file and no bundled {kind} config of that name{hint}; "
        f"bundled: {', '.join(names)}")


def _label(path: Path) -> str:
    """How errors name a config file: relative to the bundled folder or the working directory."""
    try:
        return str(Path("configs") / path.resolve().relative_to(bundled_config_dir().resolve()))
    except ValueError:
        pass
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------
# Type checking and coercion of one value

def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin in (list, List):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp) -> Any:
    """`value` converted to type `tp`, or raise TypeError. YAML reads '1e-4' as a string: accept it."""
    origin = typing.get_origin(tp)
    if origin is Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(value, inner)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        item = typing.get_args(tp)[0]
        return [_coerce(v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


# ----------------------------------------------------------------------------------------------
# Value rules (checked after the whole config is assembled)

def _rules(cfg: PretrainConfig) -> List[Tuple[str, Any, bool, str]]:
    """(key, value, ok, requirement) for every constrained value."""
    m, t, k, d, o, r = cfg.model, cfg.target, cfg.mask, cfg.data, cfg.optim, cfg.train

    def pair(v, lo_ok):
        return isinstance(v, list) and len(v) == 2 and all(lo_ok(x) for x in v)

    return [
        ("model.name", m.name, m.name in list_specs(), f"a known model ({', '.join(list_specs())})"),
        ("model.img_size", m.img_size, m.img_size is None or m.img_size > 0, "a positive integer or null"),
        ("model.taps", m.taps, m.taps is None or len(m.taps) > 0, "a non-empty list of block indices or null"),
        ("target.kind", t.kind, t.kind in TARGET_KINDS, f"one of {', '.join(TARGET_KINDS)}"),
        ("target.nbins", t.nbins, t.nbins >= 1, "a positive integer"),
        ("mask.ratio", k.ratio, 0.0 < k.ratio < 1.0, "a number in (0, 1)"),
        ("data.batch_size", d.batch_size, d.batch_size >= 1, "a positive integer"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, "a non-negative integer"),
        ("data.crop_scale", d.crop_scale,
         pair(d.crop_scale, lambda x: 0.0 < x <= 1.0) and d.crop_scale[0] <= d.crop_scale[1],
         "two numbers [min, max] with 0 < min <= max <= 1"),
        ("data.crop_ratio", d.crop_ratio,
         pair(d.crop_ratio, lambda x: x > 0.0) and d.crop_ratio[0] <= d.crop_ratio[1],
         "two positive numbers [min, max] with min <= max"),
        ("data.hflip", d.hflip, 0.0 <= d.hflip <= 1.0, "a probability in [0, 1]"),
        ("optim.lr", o.lr, o.lr is None or o.lr > 0, "a positive number or null"),
        ("optim.blr", o.blr, o.blr > 0, "a positive number"),
        ("optim.min_lr", o.min_lr, o.min_lr >= 0, "a non-negative number"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "a non-negative number"),
        ("optim.betas", o.betas, pair(o.betas, lambda x: 0.0 <= x < 1.0), "two numbers in [0, 1)"),
        ("optim.eps", o.eps, o.eps > 0, "a positive number"),
        ("optim.epochs", o.epochs, o.epochs >= 1, "a positive integer"),
        ("optim.warmup_epochs", o.warmup_epochs, 0 <= o.warmup_epochs <= o.epochs,
         f"a number in [0, optim.epochs={o.epochs}]"),
        ("optim.accum_iter", o.accum_iter, o.accum_iter >= 1, "a positive integer"),
        ("optim.clip_grad", o.clip_grad, o.clip_grad is None or o.clip_grad > 0, "a positive number or null"),
        ("train.seed", r.seed, r.seed >= 0, "a non-negative integer"),
        ("train.precision", r.precision, r.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        ("train.device", r.device, r.device in DEVICES, f"one of {', '.join(DEVICES)}"),
        ("train.output_dir", r.output_dir, bool(r.output_dir), "a non-empty path"),
        ("train.max_steps", r.max_steps, r.max_steps is None or r.max_steps >= 1, "a positive integer or null"),
        ("train.log_every", r.log_every, r.log_every >= 1, "a positive integer"),
        ("train.save_every_steps", r.save_every_steps, r.save_every_steps is None or r.save_every_steps >= 1,
         "a positive integer or null"),
        ("train.save_every_epochs", r.save_every_epochs, r.save_every_epochs >= 1, "a positive integer"),
        ("train.keep_checkpoints", r.keep_checkpoints, r.keep_checkpoints >= 1, "a positive integer"),
        ("train.resume", r.resume, r.resume in RESUME_KEYWORDS or r.resume.endswith((".pth", ".ckpt")),
         f"one of {', '.join(RESUME_KEYWORDS)} or the path of a .pth / .ckpt checkpoint"),
        ("train.on_save_error", r.on_save_error, r.on_save_error in SAVE_ERROR_POLICIES,
         f"one of {', '.join(SAVE_ERROR_POLICIES)}"),
        ("train.collective_timeout_s", r.collective_timeout_s, r.collective_timeout_s > 0,
         "a positive number of seconds"),
        ("train.tensorboard_images_every_epochs", r.tensorboard_images_every_epochs,
         r.tensorboard_images_every_epochs >= 0, "a non-negative integer (0: no images)"),
    ]


def validate_config(cfg: PretrainConfig, where: str = "config") -> None:
    """Check every value rule and that the model spec builds; ConfigError names `where` and the key."""
    _validate(cfg, where)


def _validate(cfg: PretrainConfig, where: str) -> None:
    for key, value, ok, need in _rules(cfg):
        if not ok:
            raise ConfigError(f"{where}: {key} = {value!r} is invalid; it must be {need}")
    if cfg.model.taps is not None and cfg.model.name in SWIN_SPECS:
        raise ConfigError(f"{where}: model.taps = {cfg.model.taps!r} is invalid for the Swin model "
                          f"{cfg.model.name!r}; Swin branches read every stage, so leave taps null")
    try:
        cfg.build_spec()
    except SpecError as e:
        raise ConfigError(f"{where}: the model does not build: {e}") from None


# ----------------------------------------------------------------------------------------------
# Loading

def _all_keys() -> List[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys() if "." in key else list(SECTIONS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = "key" if "." in key else "section"
    return ConfigError(f"{where}: unknown {what} {key!r}{hint}")


def _set(cfg: PretrainConfig, key: str, value: Any, where: str) -> None:
    """Assign `value` to dotted `key` after a type check; errors name `where`, key and value."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise _unknown(key if name else section, where)
    types = _field_types(SECTIONS[section])
    if name not in types:
        raise _unknown(key, where)
    try:
        coerced = _coerce(value, types[name])
    except TypeError:
        raise ConfigError(
            f"{where}: {key} = {value!r} has the wrong type; it must be {_describe(types[name])}") from None
    setattr(getattr(cfg, section), name, coerced)


def config_from_dict(data: Optional[Dict[str, Any]], where: str = "<dict>") -> PretrainConfig:
    """A validated PretrainConfig from a nested dict {section: {key: value}}; missing keys keep defaults."""
    cfg = PretrainConfig()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(data).__name__}")
    for section, body in data.items():
        if section not in SECTIONS:
            raise _unknown(str(section), where)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, got {body!r}")
        for name, value in body.items():
            _set(cfg, f"{section}.{name}", value, where)
    _validate(cfg, where)
    return cfg


def parse_override(text: str) -> Tuple[str, Any]:
    """'optim.blr=1e-4' -> ('optim.blr', 1e-4 as parsed by yaml.safe_load)."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML") from None
    return key, value


def load_config(path_or_name: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> PretrainConfig:
    """Read a YAML recipe (a path or a bundled name), apply `key=value` overrides and validate.

    Raises ConfigError naming the file (and the override) for unknown keys, wrong types, bad
    values and model geometries that do not build.
    """
    path = resolve_config_path(path_or_name)
    where = _label(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot be read ({e})") from None
    cfg = config_from_dict(data, where)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, f"{where}: override {text!r}")
    if overrides:
        _validate(cfg, f"{where} with overrides {' '.join(overrides)}")
    return cfg


# ----------------------------------------------------------------------------------------------
# Saving

def config_to_dict(cfg: PretrainConfig) -> Dict[str, Dict[str, Any]]:
    """Plain nested dict {section: {key: value}} (lists, not tuples), ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def save_config(cfg: PretrainConfig, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config as YAML atomically (core.files.write_text_atomically)."""
    text = "# localmim resolved pretraining config\n" + yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    return Path(write_text_atomically(path, text))
