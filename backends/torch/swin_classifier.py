"""Swin image classifier for fine-tuning a LocalMIM Swin encoder (docs/method.md#fine-tuning).

The pretraining encoder (patch embedding, stages with their merges) run on every token, with
stochastic depth rising linearly over all blocks, and a pooled head: the mean of the tokens then
`fc_norm` (global_pool "avg", the reference's) or `norm` on every token then the mean
("norm_avg", the official Swin's and timm's), then `head`. Twin of
backends/mindspore/swin_classifier.py.

The stages are the pretraining ones (backends/torch/swin.py), fed the plan of a mask that hides
nothing (core.features.unmasked_swin_plan): with every cell visible its groups are the plain and
shifted windows of a standard Swin, so the forward pass is the shifted-window Swin (a test checks
it against timm). The plan's index tensors are non-persistent buffers, so they follow `.to()` and
stay out of the state dict. State-dict keys are the original Swin's (core/classifier.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from localmim.backends.torch.classifier import ClassifierState
from localmim.backends.torch.layers import LN_EPS
from localmim.backends.torch.model import init_linear_and_norm
from localmim.backends.torch.swin import WINDOW_KEYS, SwinPatchEmbed, SwinStage, plan_tensors
from localmim.core.classifier import HEAD_INIT_STD, check_pool, stage_drop_path_rates, swin_classifier_shapes
from localmim.core.features import unmasked_swin_plan
from localmim.core.specs import SwinSpec
from localmim.core.state import check_state

__all__ = ["SwinClassifier", "load_swin_classifier"]


def _buffer_name(plan_key: str) -> str:
    return "plan_" + plan_key.replace(".", "_")


class SwinClassifier(ClassifierState, nn.Module):
    """Swin classifier built from a `core.specs.SwinSpec` (its encoder geometry; decoders and
    targets unused): images (B, 3, S, S) -> logits (B, num_classes)."""

    def __init__(self, spec: SwinSpec, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0):
        super().__init__()
        if not isinstance(spec, SwinSpec):
            raise TypeError(f"SwinClassifier needs a core.specs.SwinSpec, got {type(spec).__name__}")
        self.spec, self.num_classes = spec, int(num_classes)
        self.global_pool = check_pool("swin", global_pool)
        last = spec.num_stages - 1
        rates = stage_drop_path_rates(drop_path, spec.depths)
        self.patch_embed = SwinPatchEmbed(spec.img_size, spec.patch_size, 3, spec.embed_dim)
        self.layers = nn.ModuleList([
            SwinStage(spec.stage_dim(i), spec.depths[i], spec.num_heads[i], spec.stage_window(i),
                      spec.stage_shift(i) > 0, spec.mlp_ratio, downsample=i < last,
                      drop_path=rates[i])
            for i in range(spec.num_stages)])
        width = spec.stage_dim(last)
        norm = nn.LayerNorm(width, eps=LN_EPS)
        if self.global_pool == "avg":
            self.fc_norm = norm
        else:
            self.norm = norm
        self.head = nn.Linear(width, self.num_classes)
        for key, value in plan_tensors(unmasked_swin_plan(spec)).items():
            if key == "patch_index" or key.startswith("stage"):
                self.register_buffer(_buffer_name(key), value, persistent=False)
        check_state(swin_classifier_shapes(spec, num_classes, global_pool), self.state_dict(),
                    what=f"SwinClassifier({spec.name}, global_pool={global_pool!r})")  # the key contract
        self._init_weights()

    def _init_weights(self) -> None:
        """The pretraining encoder's initialisation (docs/method.md#initialisation; the relative
        tables were drawn trunc_normal(0.02) at construction); the head trunc_normal(std 2e-5),
        zero bias."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        for name, module in self.named_modules():
            if not name.startswith("patch_embed"):
                init_linear_and_norm(module)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def _plan(self, key: str) -> torch.Tensor:
        return getattr(self, _buffer_name(key))

    def _windows(self, stage: int) -> Tuple[Tuple[torch.Tensor, ...], ...]:
        return tuple(tuple(self._plan(f"stage{stage}.win{j}.{a}") for a in WINDOW_KEYS)
                     for j in range(self.layers[stage].num_windows))

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (B, 3, S, S) -> the last stage's tokens (B, N_last, C_last), cell-major (and after
        `norm` in norm_avg mode)."""
        x = self.patch_embed(imgs).index_select(1, self._plan("patch_index"))
        for i, stage in enumerate(self.layers):
            merge_index = self._plan(f"stage{i}.merge_index") if stage.downsample is not None else None
            x = stage(x, self._windows(i), merge_index)
        return x if self.global_pool == "avg" else self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """tokens (B, N_last, C_last) -> logits (B, num_classes)."""
        pooled = x.mean(dim=1)
        return self.head(self.fc_norm(pooled) if self.global_pool == "avg" else pooled)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(imgs))


def load_swin_classifier(path: str, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0,
                         img_size: Optional[int] = None, layout: Optional[str] = None, **arch) -> SwinClassifier:
    """A SwinClassifier whose encoder comes from a pretrained file of any Swin layout (this
    package's checkpoints of either framework, official LocalMIM, the original Swin / SimMIM,
    timm; read by the safe readers of backends/weights.py), at `img_size` when given. A file of
    another family, or an encoder key missing or mis-shaped, raises a ValueError naming the file."""
    from localmim.backends.finetune import read_encoder
    spec, canonical = read_encoder(path, "swin", img_size, layout, **arch)
    model = SwinClassifier(spec, num_classes, global_pool, drop_path)
    model.load_encoder(canonical, what=path)
    return model
