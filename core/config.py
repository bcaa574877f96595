"""Typed, validated configuration: YAML recipes plus command-line `key=value` overrides.

SCHEMA ONLY (the loader, validation and overrides are to be written here): the dataclasses below
are the contract that both backends' engines read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from localmim.core.specs import TargetSpec, get_spec


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
    compile: bool = False                  # torch.compile / ms.jit where applicable
    progress: Optional[bool] = None        # None: a bar only when stderr is a terminal


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
