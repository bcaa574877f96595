"""Typed, validated configuration: YAML recipes plus command-line `key=value` overrides.

The dataclasses below are the contract that both backends' engines read. Each kind of run has its
config class (CONFIG_KINDS: "pretrain" -> PretrainConfig, "finetune" -> FinetuneConfig,
"linprobe" -> LinprobeConfig), whose fields are its sections; a config file is YAML with those sections (pretraining: `model`, `target`,
`mask`, `data`, `optim`, `train`); missing sections or keys keep their defaults, unknown ones are
errors that name the file and suggest the closest key.

    cfg = load_config("demo_vit", ["optim.blr=1e-4", "model.taps=[1,3,5,7]"])
    save_config(cfg, "output/demo/config.yaml")     # load_config(that path) == cfg
    ft = load_config("vit_base", kind="finetune")  # configs/finetune/vit_base.yaml
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from localmim.core.classifier import GLOBAL_POOLS  # per family
from localmim.core.files import write_text_atomically
from localmim.core.specs import SWIN_SPECS, SpecError, TargetSpec, get_spec, list_specs

__all__ = [
    "ConfigError", "ModelConfig", "TargetConfig", "MaskConfig", "DataConfig", "OptimConfig",
    "TrainConfig", "PretrainConfig", "ClassifierConfig", "FinetuneDataConfig", "MixupConfig",
    "FinetuneOptimConfig", "FinetuneTrainConfig", "FinetuneConfig", "CONFIG_KINDS", "SECTIONS", "load_config", "parse_override", "config_to_dict",
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
    decode: str = "cpu"                    # cpu (PIL in the loader workers) | gpu (PyTorch on CUDA: nvJPEG + crop on the GPU)


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
    precision: str = "auto"                # auto | fp32 | bf16 | fp16 (auto: bf16 on GPU, fp16 on Ascend, fp32 on CPU)
    # MindSpore mixed precision and loss scaling (docs/ascend.md#precision):
    amp_level: Optional[str] = None        # O0 | O1 | O2 | O3; null: O2 for fp16 / bf16, O0 for fp32
    loss_scale: Union[float, str, None] = None  # a number >= 1 (static), dynamic, or null (dynamic for fp16)
    jit_level: Optional[str] = None        # MindSpore ms.jit level O0 | O1; null: MindSpore's default
    device: str = "auto"                   # auto | cpu | cuda | ascend
    output_dir: str = "output/pretrain"
    max_steps: Optional[int] = None        # stop after this many optimizer steps in total
    log_every: int = 10                    # optimizer steps between log.jsonl lines
    save_every_steps: Optional[int] = None
    save_every_epochs: int = 50
    keep_checkpoints: int = 3
    compile: Optional[bool] = None         # None: the backend's fast path (MindSpore ms.jit, PyTorch eager)
    compile_mode: Optional[str] = None     # PyTorch torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
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
class EvalConfig:
    knn_data: Optional[str] = None         # a labelled folder (train/, val/ class folders) for periodic k-NN
    every_epochs: int = 10                 # k-NN after every N-th epoch and at the end (when knn_data is set)


@dataclass
class PretrainConfig:
    KIND: ClassVar[str] = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

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


# ---------------------------------------------------------------------------------------- fine-tuning
# Defaults are the reference's ViT-B recipe (docs/method.md#fine-tuning); configs/finetune/*.yaml
# hold every paper recipe.

@dataclass
class ClassifierConfig:
    name: str = "vit_base_patch16"        # the encoder's geometry: a key of core.specs
    img_size: Optional[int] = None         # None: the spec's own size (position tables are resampled)
    pretrained: Optional[str] = None       # the pretrained file (any layout `localmim convert` reads)
    num_classes: Optional[int] = None      # None: the number of class folders of the training split
    global_pool: str = "avg"               # avg (mean of the tokens + fc_norm) | token (ViT: cls + norm) |
                                           # norm_avg (Swin: norm + mean, timm's head)
    drop_path: float = 0.1                 # stochastic depth of the last block (linear from 0)


@dataclass
class FinetuneDataConfig:
    path: Optional[str] = None             # a folder with train/ and val/ class folders
    train: Optional[str] = None            # or the two splits' folders
    val: Optional[str] = None
    batch_size: int = 128                  # per rank, per micro-batch
    eval_batch_size: Optional[int] = None  # None: batch_size
    num_workers: int = 8
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = 0.5
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # a timm RandAugment string, or null for none
    re_prob: float = 0.25                  # random erasing (mode pixel, one box)
    eval_crop_fraction: float = 0.875      # evaluation: resize to img_size / this, centre crop


@dataclass
class MixupConfig:
    mixup: float = 0.8                     # Beta alpha of Mixup (0: off)
    cutmix: float = 1.0                    # Beta alpha of CutMix (0: off)
    prob: float = 1.0                      # probability that a batch is mixed
    switch_prob: float = 0.5               # probability of CutMix when both are on
    smoothing: float = 0.1                 # label smoothing, folded into the soft targets


@dataclass
class FinetuneOptimConfig:
    lr: Optional[float] = None             # absolute lr; None: blr * eff_batch / 256
    blr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75              # lr of layer id: decay ** (L - id) (docs/method.md#layer-decay)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    epochs: int = 100
    warmup_epochs: float = 5
    accum_iter: int = 1
    clip_grad: Optional[float] = None


@dataclass
class FinetuneTrainConfig(TrainConfig):
    output_dir: str = "output/finetune"
    save_every_epochs: int = 1
    keep_checkpoints: int = 1              # besides checkpoint-best
    eval_every_epochs: int = 1             # top-1 / top-5 on val/ (and always at the end)


@dataclass
class FinetuneConfig:
    KIND: ClassVar[str] = "finetune"
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)

    def build_spec(self):
        """The validated ViTSpec / SwinSpec of the encoder (at model.img_size when given)."""
        overrides = {"img_size": self.model.img_size} if self.model.img_size is not None else {}
        return get_spec(self.model.name, **overrides)

    effective_batch = PretrainConfig.effective_batch
    resolved_lr = PretrainConfig.resolved_lr


# ---------------------------------------------------------------------------------------- linear probing
# `localmim eval linprobe` (docs/evaluation.md): MAE's protocol by default; configs/linprobe/*.yaml
# scale it to each model and to the CPU demo.

@dataclass
class ProbeModelConfig:
    checkpoint: Optional[str] = None       # the pretrained encoder: any file and layout load_pretrained reads
    layout: Optional[str] = None           # None: recorded in the file or detected from its keys
    img_size: Optional[int] = None         # None: the checkpoint's own size (else position tables resampled)
    pool: str = "avg"                      # avg (mean of the normed patch tokens) | cls (MAE's probe; ViT only)
    random_init: bool = False              # the baseline: a freshly initialised model of the checkpoint's geometry


@dataclass
class ProbeDataConfig:
    path: Optional[str] = None             # a labelled folder with train/ and val/ class folders
    batch_size: int = 1024                 # per micro-batch
    num_workers: int = 4                   # image-decoding threads
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = 0.5


@dataclass
class ProbeOptimConfig:
    lr: Optional[float] = None             # absolute lr; None: blr * eff_batch / 256
    blr: float = 0.1
    min_lr: float = 0.0
    weight_decay: float = 0.0              # LARS, on parameters with more than one axis only
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    epochs: int = 90
    warmup_epochs: float = 10
    accum_iter: int = 1


@dataclass
class ProbeTrainConfig(TrainConfig):
    output_dir: str = "output/linprobe"
    precision: str = "fp32"                # the probe runs in fp32
    save_every_epochs: int = 10


@dataclass
class ProbeEvalConfig:
    every_epochs: int = 1                  # val top-1 / top-5 / loss after every N-th epoch (0: at the end only)


@dataclass
class LinprobeConfig:
    KIND: ClassVar[str] = "linprobe"
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    train: ProbeTrainConfig = field(default_factory=ProbeTrainConfig)
    eval: ProbeEvalConfig = field(default_factory=ProbeEvalConfig)

    effective_batch = PretrainConfig.effective_batch
    resolved_lr = PretrainConfig.resolved_lr


__all__ += ["EvalConfig", "ProbeModelConfig", "ProbeDataConfig", "ProbeOptimConfig", "ProbeTrainConfig",
            "ProbeEvalConfig", "LinprobeConfig"]

CONFIG_KINDS: Dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig}


def sections_of(cls) -> Dict[str, type]:
    """Section name -> its dataclass for a config class (its fields, in order)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _config_class(kind: str) -> type:
    if kind not in CONFIG_KINDS:
        raise ValueError(f"config kind {kind!r} must be one of {', '.join(CONFIG_KINDS)}")
    return CONFIG_KINDS[kind]


SECTIONS: Dict[str, type] = sections_of(PretrainConfig)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AMP_LEVELS = ("O0", "O1", "O2", "O3")   # MindSpore's amp levels (backends/mindspore/amp.py)
JIT_LEVELS = ("O0", "O1")               # mindspore.jit(jit_level=...)
RESUME_KEYWORDS = ("latest_valid", "latest", "none")  # or a checkpoint path (backends/runs.py RESUME_POLICIES)
SAVE_ERROR_POLICIES = ("stop", "warn")
DEVICES = ("auto", "cpu", "cuda", "ascend")
TARGET_KINDS = ("hog", "pixel")
DECODERS = ("cpu", "gpu")                 # data.decode
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)


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
        return " or ".join(_describe(a) for a in inner) + " or null"
    if origin in (list, List):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp) -> Any:
    """`value` converted to type `tp`, or raise TypeError. YAML reads '1e-4' as a string: accept it."""
    origin = typing.get_origin(tp)
    if origin is Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        for option in inner[:-1]:  # Union[float, str, None]: the first type that takes the value
            try:
                return _coerce(value, option)
            except TypeError:
                pass
        return _coerce(value, inner[-1])
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

def _pair(v, lo_ok) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(lo_ok(x) for x in v)


def _rules(cfg) -> List[Tuple[str, Any, bool, str]]:
    """(key, value, ok, requirement) for every constrained value of a config of any kind."""
    if isinstance(cfg, FinetuneConfig):
        return _finetune_rules(cfg)
    if isinstance(cfg, LinprobeConfig):
        return _linprobe_rules(cfg)
    m, t, k = cfg.model, cfg.target, cfg.mask
    return [
        ("model.name", m.name, m.name in list_specs(), f"a known model ({', '.join(list_specs())})"),
        ("model.img_size", m.img_size, m.img_size is None or m.img_size > 0, "a positive integer or null"),
        ("model.taps", m.taps, m.taps is None or len(m.taps) > 0, "a non-empty list of block indices or null"),
        ("target.kind", t.kind, t.kind in TARGET_KINDS, f"one of {', '.join(TARGET_KINDS)}"),
        ("target.nbins", t.nbins, t.nbins >= 1, "a positive integer"),
        ("mask.ratio", k.ratio, 0.0 < k.ratio < 1.0, "a number in (0, 1)"),
        ("eval.every_epochs", cfg.eval.every_epochs, cfg.eval.every_epochs >= 1, "a positive integer"),
        ("data.decode", cfg.data.decode, cfg.data.decode in DECODERS, f"one of {', '.join(DECODERS)}"),
    ] + _data_rules(cfg.data) + _optim_rules(cfg.optim) + _train_rules(cfg.train)


def _pools_of(model_name: str) -> Tuple[str, ...]:
    family = get_spec(model_name).family if model_name in list_specs() else "vit"
    return GLOBAL_POOLS[family]


def _finetune_rules(cfg: "FinetuneConfig") -> List[Tuple[str, Any, bool, str]]:
    m, d, x, o, r = cfg.model, cfg.data, cfg.mixup, cfg.optim, cfg.train

    def prob(key, v):
        return (key, v, 0.0 <= v <= 1.0, "a probability in [0, 1]")

    return [
        ("model.name", m.name, m.name in list_specs(), f"a known model ({', '.join(list_specs())})"),
        ("model.img_size", m.img_size, m.img_size is None or m.img_size > 0, "a positive integer or null"),
        ("model.num_classes", m.num_classes, m.num_classes is None or m.num_classes >= 2,
         "an integer of at least 2, or null (the class folders of the training split)"),
        ("model.global_pool", m.global_pool, m.global_pool in _pools_of(m.name),
         f"one of {', '.join(_pools_of(m.name))} for {m.name}"),
        ("model.drop_path", m.drop_path, 0.0 <= m.drop_path < 1.0, "a number in [0, 1)"),
        ("data.eval_batch_size", d.eval_batch_size, d.eval_batch_size is None or d.eval_batch_size >= 1,
         "a positive integer or null"),
        prob("data.re_prob", d.re_prob),
        ("data.eval_crop_fraction", d.eval_crop_fraction, 0.0 < d.eval_crop_fraction <= 1.0, "a number in (0, 1]"),
        ("mixup.mixup", x.mixup, x.mixup >= 0.0, "a non-negative number (0: off)"),
        ("mixup.cutmix", x.cutmix, x.cutmix >= 0.0, "a non-negative number (0: off)"),
        prob("mixup.prob", x.prob), prob("mixup.switch_prob", x.switch_prob),
        ("mixup.smoothing", x.smoothing, 0.0 <= x.smoothing < 1.0, "a number in [0, 1)"),
        ("optim.layer_decay", o.layer_decay, 0.0 < o.layer_decay <= 1.0, "a number in (0, 1]"),
        ("train.eval_every_epochs", r.eval_every_epochs, r.eval_every_epochs >= 1, "a positive integer"),
    ] + _data_rules(d) + _optim_rules(o) + _train_rules(r)


def _linprobe_rules(cfg: "LinprobeConfig") -> List[Tuple[str, Any, bool, str]]:
    from localmim.core.features import POOLS
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.train
    return [
        ("model.img_size", m.img_size, m.img_size is None or m.img_size > 0, "a positive integer or null"),
        ("model.pool", m.pool, m.pool in POOLS, f"one of {', '.join(POOLS)}"),
        ("data.batch_size", d.batch_size, d.batch_size >= 2, "an integer of at least 2 (the BatchNorm needs two)"),
        ("optim.lr", o.lr, o.lr is None or o.lr > 0, "a positive number or null"),
        ("optim.blr", o.blr, o.blr > 0, "a positive number"),
        ("optim.min_lr", o.min_lr, o.min_lr >= 0, "a non-negative number"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "a non-negative number"),
        ("optim.momentum", o.momentum, 0.0 <= o.momentum < 1.0, "a number in [0, 1)"),
        ("optim.trust_coefficient", o.trust_coefficient, o.trust_coefficient > 0, "a positive number"),
        ("optim.epochs", o.epochs, o.epochs >= 1, "a positive integer"),
        ("optim.warmup_epochs", o.warmup_epochs, 0 <= o.warmup_epochs <= o.epochs,
         f"a number in [0, optim.epochs={o.epochs}]"),
        ("optim.accum_iter", o.accum_iter, o.accum_iter >= 1, "a positive integer"),
        ("train.precision", r.precision, r.precision in ("auto", "fp32"), "fp32 (or auto, which is fp32 here)"),
        ("eval.every_epochs", cfg.eval.every_epochs, cfg.eval.every_epochs >= 0,
         "a non-negative integer (0: at the end only)"),
    ] + _data_rules(d) + _train_rules(r)


def _data_rules(d) -> List[Tuple[str, Any, bool, str]]:
    return [
        ("data.batch_size", d.batch_size, d.batch_size >= 1, "a positive integer"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, "a non-negative integer"),
        ("data.crop_scale", d.crop_scale,
         _pair(d.crop_scale, lambda x: 0.0 < x <= 1.0) and d.crop_scale[0] <= d.crop_scale[1],
         "two numbers [min, max] with 0 < min <= max <= 1"),
        ("data.crop_ratio", d.crop_ratio,
         _pair(d.crop_ratio, lambda x: x > 0.0) and d.crop_ratio[0] <= d.crop_ratio[1],
         "two positive numbers [min, max] with min <= max"),
        ("data.hflip", d.hflip, 0.0 <= d.hflip <= 1.0, "a probability in [0, 1]"),
    ]


def _optim_rules(o) -> List[Tuple[str, Any, bool, str]]:
    return [
        ("optim.lr", o.lr, o.lr is None or o.lr > 0, "a positive number or null"),
        ("optim.blr", o.blr, o.blr > 0, "a positive number"),
        ("optim.min_lr", o.min_lr, o.min_lr >= 0, "a non-negative number"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "a non-negative number"),
        ("optim.betas", o.betas, _pair(o.betas, lambda x: 0.0 <= x < 1.0), "two numbers in [0, 1)"),
        ("optim.eps", o.eps, o.eps > 0, "a positive number"),
        ("optim.epochs", o.epochs, o.epochs >= 1, "a positive integer"),
        ("optim.warmup_epochs", o.warmup_epochs, 0 <= o.warmup_epochs <= o.epochs,
         f"a number in [0, optim.epochs={o.epochs}]"),
        ("optim.accum_iter", o.accum_iter, o.accum_iter >= 1, "a positive integer"),
        ("optim.clip_grad", o.clip_grad, o.clip_grad is None or o.clip_grad > 0, "a positive number or null"),
    ]


def _train_rules(r) -> List[Tuple[str, Any, bool, str]]:
    return [
        ("train.seed", r.seed, r.seed >= 0, "a non-negative integer"),
        ("train.precision", r.precision, r.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        ("train.amp_level", r.amp_level, r.amp_level is None or r.amp_level in AMP_LEVELS,
         f"one of {', '.join(AMP_LEVELS)} or null"),
        ("train.loss_scale", r.loss_scale, r.loss_scale is None or r.loss_scale == "dynamic"
         or (isinstance(r.loss_scale, float) and r.loss_scale >= 1.0),
         "a number >= 1 (a static loss scale), dynamic, or null (dynamic for fp16, none otherwise)"),
        ("train.jit_level", r.jit_level, r.jit_level is None or r.jit_level in JIT_LEVELS,
         f"one of {', '.join(JIT_LEVELS)} or null"),
        ("train.compile_mode", r.compile_mode, r.compile_mode is None or r.compile_mode in COMPILE_MODES,
         f"one of {', '.join(COMPILE_MODES)} or null"),
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


def validate_config(cfg, where: str = "config") -> None:
    """Check every value rule and that the model spec builds; ConfigError names `where` and the key."""
    _validate(cfg, where)


def _validate(cfg, where: str) -> None:
    for key, value, ok, need in _rules(cfg):
        if not ok:
            raise ConfigError(f"{where}: {key} = {value!r} is invalid; it must be {need}")
    if getattr(cfg.model, "taps", None) is not None and cfg.model.name in SWIN_SPECS:
        raise ConfigError(f"{where}: model.taps = {cfg.model.taps!r} is invalid for the Swin model "
                          f"{cfg.model.name!r}; Swin branches read every stage, so leave taps null")
    if isinstance(cfg, LinprobeConfig):  # the encoder's geometry comes from its checkpoint
        return
    try:
        cfg.build_spec()
    except SpecError as e:
        raise ConfigError(f"{where}: the model does not build: {e}") from None


# ----------------------------------------------------------------------------------------------
# Loading

def _all_keys(cls) -> List[str]:
    return [f"{s}.{f.name}" for s, section in sections_of(cls).items() for f in dataclasses.fields(section)]


def _unknown(key: str, where: str, cls=PretrainConfig) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(cls) if "." in key else list(sections_of(cls)), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = "key" if "." in key else "section"
    return ConfigError(f"{where}: unknown {what} {key!r}{hint}")


def _set(cfg, key: str, value: Any, where: str) -> None:
    """Assign `value` to dotted `key` after a type check; errors name `where`, key and value."""
    sections = sections_of(type(cfg))
    section, _, name = key.partition(".")
    if section not in sections or not name:
        raise _unknown(key if name else section, where, type(cfg))
    types = _field_types(sections[section])
    if name not in types:
        raise _unknown(key, where, type(cfg))
    try:
        coerced = _coerce(value, types[name])
    except TypeError:
        raise ConfigError(
            f"{where}: {key} = {value!r} has the wrong type; it must be {_describe(types[name])}") from None
    setattr(getattr(cfg, section), name, coerced)


def config_from_dict(data: Optional[Dict[str, Any]], where: str = "<dict>", kind: str = "pretrain"):
    """A validated config of `kind` (CONFIG_KINDS) from a nested dict {section: {key: value}};
    missing keys keep defaults."""
    cls = _config_class(kind)
    cfg = cls()
    sections = sections_of(cls)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections "
                          f"({', '.join(sections)}), got {type(data).__name__}")
    for section, body in data.items():
        if section not in sections:
            raise _unknown(str(section), where, cls)
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


def load_config(path_or_name: Union[str, os.PathLike], overrides: Sequence[str] = (), kind: str = "pretrain"):
    """Read a YAML recipe of `kind` (a path, or a bundled name of configs/<kind>/), apply
    `key=value` overrides and validate.

    Raises ConfigError naming the file (and the override) for unknown keys, wrong types, bad
    values and model geometries that do not build.
    """
    _config_class(kind)
    path = resolve_config_path(path_or_name, kind)
    where = _label(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot be read ({e})") from None
    cfg = config_from_dict(data, where, kind)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, f"{where}: override {text!r}")
    if overrides:
        _validate(cfg, f"{where} with overrides {' '.join(overrides)}")
    return cfg


# ----------------------------------------------------------------------------------------------
# Saving

def config_to_dict(cfg) -> Dict[str, Dict[str, Any]]:
    """Plain nested dict {section: {key: value}} (lists, not tuples), ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config as YAML atomically (core.files.write_text_atomically)."""
    text = f"# localmim resolved {type(cfg).KIND} config\n" + yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    return Path(write_text_atomically(path, text))
