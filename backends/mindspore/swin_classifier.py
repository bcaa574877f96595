"""Swin image classifier for fine-tuning a LocalMIM Swin encoder in MindSpore (twin of
backends/torch/swin_classifier.py; docs/method.md#fine-tuning).

The pretraining stages (backends/mindspore/swin.py) run on the plan of a mask that hides nothing
(core.features.unmasked_swin_plan: the plain and shifted windows of a standard Swin), with
stochastic depth rising linearly over all blocks, and a pooled head: the mean of the tokens then
`fc_norm` (global_pool "avg") or `norm` on every token then the mean ("norm_avg"), then `head`.
The plan's index Tensors are constant attributes (tuples per stage, so graph mode folds them in).
Parameter names are the original Swin's keys (core/classifier.py), so `export_state()` is what
the torch twin's state_dict holds. Cells start in eval mode: `set_train(True)` turns drop path on.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from mindspore import nn, ops
from mindspore.common.initializer import TruncatedNormal, Uniform

from localmim.backends.mindspore.classifier import ClassifierState, set_initial, xavier_uniform
from localmim.backends.mindspore.layers import LN_EPS, LayerNorm, Linear
from localmim.backends.mindspore.swin import SwinPatchEmbed, SwinStage, WindowAttention, plan_tensors, window_inputs
from localmim.core.classifier import HEAD_INIT_STD, check_pool, stage_drop_path_rates, swin_classifier_shapes
from localmim.core.features import unmasked_swin_plan
from localmim.core.specs import SwinSpec
from localmim.core.state import check_state

__all__ = ["SwinClassifier", "load_swin_classifier"]


class SwinClassifier(ClassifierState, nn.Cell):
    """Swin classifier built from a `core.specs.SwinSpec`: images (B, 3, S, S) -> logits (B, num_classes)."""

    def __init__(self, spec: SwinSpec, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0):
        super().__init__()
        if not isinstance(spec, SwinSpec):
            raise TypeError(f"SwinClassifier needs a core.specs.SwinSpec, got {type(spec).__name__}")
        self.spec, self.num_classes = spec, int(num_classes)
        self.global_pool = check_pool("swin", global_pool)
        self.norm_first = global_pool == "norm_avg"  # a compile-time constant under ms.jit
        last = spec.num_stages - 1
        rates = stage_drop_path_rates(drop_path, spec.depths)
        self.stage_starts = tuple(int(s) for s in np.cumsum((0,) + tuple(spec.depths)))  # drop_draws rows
        self.patch_embed = SwinPatchEmbed(spec.img_size, spec.patch_size, 3, spec.embed_dim)
        self.layers = nn.CellList([
            SwinStage(spec.stage_dim(i), spec.depths[i], spec.num_heads[i], spec.stage_window(i),
                      spec.stage_shift(i) > 0, spec.mlp_ratio, downsample=i < last,
                      drop_path=rates[i])
            for i in range(spec.num_stages)])
        width = spec.stage_dim(last)
        if self.norm_first:
            self.norm = LayerNorm(width, LN_EPS)
        else:
            self.fc_norm = LayerNorm(width, LN_EPS)
        self.head = Linear(width, self.num_classes)
        plan = plan_tensors(unmasked_swin_plan(spec))
        self.patch_index = plan["patch_index"]
        self.stage_windows = tuple(tuple(window_inputs(plan, i, j) for j in range(stage.num_windows))
                                   for i, stage in enumerate(self.layers))
        self.merge_indices = tuple(plan[f"stage{i}.merge_index"] for i in range(last))
        check_state(swin_classifier_shapes(spec, num_classes, global_pool),
                    {p.name: p for p in self.get_parameters()},
                    what=f"SwinClassifier({spec.name}, global_pool={global_pool!r})")  # the key contract
        self._init_weights()

    def _init_weights(self) -> None:
        """The pretraining encoder's initialisation (xavier Linears with zero bias, LN 1/0,
        trunc_normal(0.02) relative tables, xavier patch conv with PyTorch's default bias); the
        head trunc_normal(std 2e-5), zero bias."""
        proj = self.patch_embed.proj
        xavier_uniform(proj.weight)
        set_initial(proj.bias, Uniform(1.0 / math.sqrt(int(np.prod(proj.weight.shape[1:])))))
        for _, cell in self.layers.cells_and_names():
            if isinstance(cell, Linear):
                xavier_uniform(cell.weight)
                if cell.has_bias:
                    set_initial(cell.bias, "zeros")
            elif isinstance(cell, WindowAttention):
                set_initial(cell.relative_position_bias_table, TruncatedNormal(0.02))
        set_initial(self.head.weight, TruncatedNormal(HEAD_INIT_STD))
        set_initial(self.head.bias, "zeros")

    def forward_features(self, imgs, drop_draws=None):
        """imgs (B, 3, S, S) -> the last stage's tokens (B, N_last, C_last), cell-major (and after
        `norm` in norm_avg mode); drop_draws: None (drop path draws from ops.rand) or
        (sum(depths), 2, B) uniform draws."""
        x = ops.gather(self.patch_embed(imgs), self.patch_index, 1)
        for i, stage in enumerate(self.layers):
            merge_index = self.merge_indices[i] if stage.downsample is not None else None
            if drop_draws is None:
                x = stage(x, self.stage_windows[i], merge_index)
            else:
                x = stage(x, self.stage_windows[i], merge_index,
                          drop_draws[self.stage_starts[i]:self.stage_starts[i + 1]])
        if self.norm_first:
            return self.norm(x)
        return x

    def forward_head(self, x):
        """tokens (B, N_last, C_last) -> logits (B, num_classes)."""
        pooled = x.mean(axis=1)
        if self.norm_first:
            return self.head(pooled)
        return self.head(self.fc_norm(pooled))

    def construct(self, imgs, drop_draws=None):
        return self.forward_head(self.forward_features(imgs, drop_draws))


def load_swin_classifier(path: str, num_classes: int, global_pool: str = "avg", drop_path: float = 0.0,
                         img_size: Optional[int] = None, layout: Optional[str] = None, **arch) -> SwinClassifier:
    """A SwinClassifier whose encoder comes from a pretrained file of any Swin layout (read by the
    safe readers of backends/weights.py), at `img_size` when given. A file of another family, or an
    encoder key missing or mis-shaped, raises a ValueError naming the file."""
    from localmim.backends.finetune import read_encoder
    spec, canonical = read_encoder(path, "swin", img_size, layout, **arch)
    model = SwinClassifier(spec, num_classes, global_pool, drop_path)
    model.load_encoder(canonical, what=path)
    return model
