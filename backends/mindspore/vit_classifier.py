"""ViT image classifier for fine-tuning a LocalMIM encoder in MindSpore (twin of
backends/torch/vit_classifier.py; docs/method.md#fine-tuning).

The pretraining encoder with stochastic depth rising linearly over the blocks and a pooled head:
mean of the patch tokens then `fc_norm` (global_pool "avg") or the cls token after `norm`
("token"), then `head`. Parameter names are timm's VisionTransformer keys (core/classifier.py),
so `export_state()` is what the torch twin's state_dict holds. Cells start in eval mode:
`set_train(True)` turns drop path on.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, TruncatedNormal, Uniform

from localmim.backends.mindspore.classifier import ClassifierState, set_initial, xavier_uniform
from localmim.backends.mindspore.layers import LN_EPS, Block, LayerNorm, Linear, PatchEmbed
from localmim.core.classifier import HEAD_INIT_STD, drop_path_rates, vit_classifier_shapes
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import ViTSpec
from localmim.core.state import check_state

__all__ = ["ViTClassifier", "load_vit_classifier"]



class ViTClassifier(ClassifierState, nn.Cell):
    """ViT classifier built from a `core.specs.ViTSpec`: images (B, 3, S, S) -> logits (B, num_classes)."""

    def __init__(self, spec: ViTSpec, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0):
        super().__init__()
        if not isinstance(spec, ViTSpec):
            raise TypeError(f"ViTClassifier needs a core.specs.ViTSpec, got {type(spec).__name__}")
        self.spec, self.num_classes, self.global_pool = spec, int(num_classes), global_pool
        self.pool_tokens = global_pool == "avg"  # a compile-time constant under ms.jit
        d = spec.embed_dim
        self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, 3, d)
        self.cls_token = Parameter(Tensor(np.zeros((1, 1, d), np.float32)), name="cls_token")
        self.pos_embed = Parameter(Tensor(np.asarray(sincos_2d(d, spec.grid, cls_token=True), np.float32)[None]),
                                   name="pos_embed")
        self.blocks = nn.CellList([Block(d, spec.num_heads, spec.mlp_ratio, rate)
                                   for rate in drop_path_rates(drop_path, spec.depth)])
        if self.pool_tokens:
            self.fc_norm = LayerNorm(d, LN_EPS)
        else:
            self.norm = LayerNorm(d, LN_EPS)
        self.head = Linear(d, self.num_classes)
        check_state(vit_classifier_shapes(spec, num_classes, global_pool), {p.name: p for p in self.get_parameters()},
                    what=f"ViTClassifier({spec.name}, global_pool={global_pool!r})")  # the key contract
        self._init_weights()

    def _init_weights(self) -> None:
        """The pretraining encoder's initialisation; the head trunc_normal(std 2e-5), zero bias."""
        proj = self.patch_embed.proj
        xavier_uniform(proj.weight)
        set_initial(proj.bias, Uniform(1.0 / math.sqrt(int(np.prod(proj.weight.shape[1:])))))
        set_initial(self.cls_token, Normal(0.02))
        for _, cell in self.blocks.cells_and_names():
            if isinstance(cell, Linear):
                xavier_uniform(cell.weight)
                set_initial(cell.bias, "zeros")
        set_initial(self.head.weight, TruncatedNormal(HEAD_INIT_STD))
        set_initial(self.head.bias, "zeros")

    def forward_features(self, imgs, drop_draws=None):
        """imgs (B, 3, S, S) -> tokens (B, 1+N, D) after the blocks (and `norm` in token mode);
        drop_draws: None (drop path draws from ops.rand) or (depth, 2, B) uniform draws."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        b, _, d = x.shape
        cls = ops.broadcast_to(self.cls_token + self.pos_embed[:, :1, :], (b, 1, d))
        x = ops.concat((cls, x), axis=1)
        for i, blk in enumerate(self.blocks):
            if drop_draws is None:
                x = blk(x)
            else:
                x = blk(x, drop_draws[i])
        if self.pool_tokens:
            return x
        return self.norm(x)

    def forward_head(self, x):
        """tokens (B, 1+N, D) -> logits (B, num_classes)."""
        if self.pool_tokens:
            return self.head(self.fc_norm(x[:, 1:, :].mean(axis=1)))
        return self.head(x[:, 0, :])

    def construct(self, imgs, drop_draws=None):
        return self.forward_head(self.forward_features(imgs, drop_draws))


def load_vit_classifier(path: str, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0,
                        img_size: Optional[int] = None, layout: Optional[str] = None, **arch) -> ViTClassifier:
    """A ViTClassifier whose encoder comes from a pretrained file of any layout (read by the safe
    readers of backends/weights.py), its position table resampled to `img_size` when given. A file
    of another family, or an encoder key missing or mis-shaped, raises a ValueError naming the file."""
    from localmim.backends.finetune import read_encoder
    spec, canonical = read_encoder(path, "vit", img_size, layout, **arch)
    model = ViTClassifier(spec, num_classes, global_pool, drop_path)
    model.load_encoder(canonical, what=path)
    return model
