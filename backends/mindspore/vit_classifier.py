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
from typing import Dict, Mapping, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, TruncatedNormal, Uniform, initializer

from localmim.backends.mindspore.layers import LN_EPS, Block, LayerNorm, Linear, PatchEmbed
from localmim.core.classifier import HEAD_INIT_STD, drop_path_rates, vit_classifier_shapes, vit_classifier_state
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import ViTSpec
from localmim.core.state import check_state

__all__ = ["ViTClassifier", "load_vit_classifier"]



def _set(param: Parameter, init) -> None:
    param.set_data(initializer(init, param.shape, ms.float32))


def _xavier(param: Parameter) -> None:
    """xavier_uniform over (out, in...) as torch computes the fans of a Linear or a conv weight."""
    fan_out, fan_in = param.shape[0], int(np.prod(param.shape[1:]))
    _set(param, Uniform(math.sqrt(6.0 / (fan_in + fan_out))))


class ViTClassifier(nn.Cell):
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
        _xavier(proj.weight)
        _set(proj.bias, Uniform(1.0 / math.sqrt(int(np.prod(proj.weight.shape[1:])))))
        _set(self.cls_token, Normal(0.02))
        for _, cell in self.blocks.cells_and_names():
            if isinstance(cell, Linear):
                _xavier(cell.weight)
                _set(cell.bias, "zeros")
        _set(self.head.weight, TruncatedNormal(HEAD_INIT_STD))
        _set(self.head.bias, "zeros")

    def forward_features(self, imgs):
        """imgs (B, 3, S, S) -> tokens (B, 1+N, D) after the blocks (and `norm` in token mode)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        b, _, d = x.shape
        cls = ops.broadcast_to(self.cls_token + self.pos_embed[:, :1, :], (b, 1, d))
        x = ops.concat((cls, x), axis=1)
        for blk in self.blocks:
            x = blk(x)
        if self.pool_tokens:
            return x
        return self.norm(x)

    def forward_head(self, x):
        """tokens (B, 1+N, D) -> logits (B, num_classes)."""
        if self.pool_tokens:
            return self.head(self.fc_norm(x[:, 1:, :].mean(axis=1)))
        return self.head(x[:, 0, :])

    def construct(self, imgs):
        return self.forward_head(self.forward_features(imgs))

    def state_shapes(self) -> Dict[str, tuple]:
        return {p.name: tuple(p.shape) for p in self.get_parameters()}

    def export_state(self) -> Dict[str, np.ndarray]:
        """name -> float32 numpy copy (timm's keys)."""
        return {p.name: p.asnumpy().astype(np.float32, copy=True) for p in self.get_parameters()}

    def import_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a whole classifier state strictly (StateError names what does not fit)."""
        check_state(self.state_shapes(), state, what=f"state for ViTClassifier({self.spec.name})")
        for p in self.get_parameters():
            p.set_data(Tensor(np.asarray(state[p.name], dtype=np.float32).copy()))

    def load_encoder(self, encoder: Mapping[str, np.ndarray], what: str = "checkpoint") -> None:
        """Take the encoder part of a canonical pretraining state (core.classifier.
        vit_classifier_state); fc_norm / head keep their initialisation."""
        state = self.export_state()
        state.update(vit_classifier_state(encoder, self.spec, self.global_pool, what))
        self.import_state(state)


def load_vit_classifier(path: str, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0,
                        img_size: Optional[int] = None, layout: Optional[str] = None, **arch) -> ViTClassifier:
    """A ViTClassifier whose encoder comes from a pretrained file of any layout (read by the safe
    readers of backends/weights.py), its position table resampled to `img_size` when given. A file
    of another family, or an encoder key missing or mis-shaped, raises a ValueError naming the file."""
    from localmim.backends.finetune import read_vit_encoder
    spec, canonical = read_vit_encoder(path, img_size, layout, **arch)
    model = ViTClassifier(spec, num_classes, global_pool, drop_path)
    model.load_encoder(canonical, what=path)
    return model
