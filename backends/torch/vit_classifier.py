"""ViT image classifier for fine-tuning a LocalMIM encoder (docs/method.md#fine-tuning).

The pretraining encoder (patch embedding, cls token, position table, blocks) with stochastic depth
rising linearly over the blocks, and a pooled head: the mean of the patch tokens then `fc_norm`
(global_pool "avg", the reference's default) or the cls token after `norm` ("token"), then
`head`. State-dict keys are timm's VisionTransformer keys (core/classifier.py), so a fine-tuned
state loads into timm unchanged. The position table is a trainable copy of the pretraining one.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from localmim.backends.torch.classifier import ClassifierState
from localmim.backends.torch.layers import LN_EPS, Block, PatchEmbed
from localmim.backends.torch.model import init_linear_and_norm
from localmim.core.classifier import HEAD_INIT_STD, drop_path_rates, vit_classifier_shapes
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import ViTSpec
from localmim.core.state import check_state

__all__ = ["ViTClassifier", "load_vit_classifier"]


class ViTClassifier(ClassifierState, nn.Module):
    """ViT classifier built from a `core.specs.ViTSpec` (its encoder geometry; decoders and
    targets unused): images (B, 3, S, S) -> logits (B, num_classes)."""

    def __init__(self, spec: ViTSpec, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0):
        super().__init__()
        if not isinstance(spec, ViTSpec):
            raise TypeError(f"ViTClassifier needs a core.specs.ViTSpec, got {type(spec).__name__}")
        self.spec, self.num_classes, self.global_pool = spec, int(num_classes), global_pool
        d = spec.embed_dim
        self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, 3, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        table = np.asarray(sincos_2d(d, spec.grid, cls_token=True), np.float32)[None]
        self.pos_embed = nn.Parameter(torch.from_numpy(table))
        self.blocks = nn.ModuleList([Block(d, spec.num_heads, spec.mlp_ratio, rate)
                                     for rate in drop_path_rates(drop_path, spec.depth)])
        norm = nn.LayerNorm(d, eps=LN_EPS)
        if global_pool == "avg":
            self.fc_norm = norm
        else:
            self.norm = norm
        self.head = nn.Linear(d, self.num_classes)
        check_state(vit_classifier_shapes(spec, num_classes, global_pool), self.state_dict(),
                    what=f"ViTClassifier({spec.name}, global_pool={global_pool!r})")  # the key contract
        self._init_weights()

    def _init_weights(self) -> None:
        """The pretraining encoder's initialisation (docs/method.md#initialisation); the head
        trunc_normal(std 2e-5) with zero bias."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if not name.startswith("patch_embed"):
                init_linear_and_norm(module)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (B, 3, S, S) -> tokens (B, 1+N, D) after the blocks (and `norm` in token mode)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x if self.global_pool == "avg" else self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1+N, D) -> logits (B, num_classes)."""
        if self.global_pool == "avg":
            return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))
        return self.head(x[:, 0])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(imgs))


def load_vit_classifier(path: str, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0,
                        img_size: Optional[int] = None, layout: Optional[str] = None, **arch) -> ViTClassifier:
    """A ViTClassifier whose encoder comes from a pretrained file of any layout (this package's
    checkpoints of either framework, official LocalMIM, MAE, timm; read by the safe readers of
    backends/weights.py), its position table resampled to `img_size` when given (core.resample).
    A file of another family, or an encoder key missing or mis-shaped, raises a ValueError
    naming the file."""
    from localmim.backends.finetune import read_encoder
    spec, canonical = read_encoder(path, "vit", img_size, layout, **arch)
    model = ViTClassifier(spec, num_classes, global_pool, drop_path)
    model.load_encoder(canonical, what=path)
    return model
