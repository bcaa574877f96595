"""What the ViT and Swin classifiers share (MindSpore; twin of backends/torch/classifier.py):
their state as float32 numpy arrays under the keys of core/classifier.py, taking the encoder of a
pretraining state, and the initialisers both draw with."""
from __future__ import annotations

import math
from typing import Dict, Mapping

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor
from mindspore.common.initializer import Uniform, initializer

from localmim.core.classifier import classifier_state
from localmim.core.state import check_state

__all__ = ["ClassifierState", "set_initial", "xavier_uniform"]


def set_initial(param: Parameter, init) -> None:
    """Redraw `param` from a mindspore.common.initializer (or its name) in float32."""
    param.set_data(initializer(init, param.shape, ms.float32))


def xavier_uniform(param: Parameter) -> None:
    """xavier_uniform over (out, in...) as torch computes the fans of a Linear or a conv weight."""
    fan_out, fan_in = param.shape[0], int(np.prod(param.shape[1:]))
    set_initial(param, Uniform(math.sqrt(6.0 / (fan_in + fan_out))))


class ClassifierState:
    """Mixin of an nn.Cell classifier with `spec` and `global_pool`."""

    def state_shapes(self) -> Dict[str, tuple]:
        return {p.name: tuple(p.shape) for p in self.get_parameters()}

    def export_state(self) -> Dict[str, np.ndarray]:
        """name -> float32 numpy copy (core/classifier.py's keys)."""
        return {p.name: p.asnumpy().astype(np.float32, copy=True) for p in self.get_parameters()}

    def import_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a whole classifier state strictly (StateError names what does not fit)."""
        check_state(self.state_shapes(), state, what=f"state for {type(self).__name__}({self.spec.name})")
        for p in self.get_parameters():
            p.set_data(Tensor(np.asarray(state[p.name], dtype=np.float32).copy()))

    def load_encoder(self, encoder: Mapping[str, np.ndarray], what: str = "checkpoint") -> None:
        """Take the encoder part of a canonical pretraining state (core.classifier.classifier_state);
        the head and its new norm keep their initialisation."""
        state = self.export_state()
        state.update(classifier_state(encoder, self.spec, self.global_pool, what))
        self.import_state(state)
