"""What the ViT and Swin classifiers share (PyTorch; twin of backends/mindspore/classifier.py):
their state as float32 numpy arrays under the keys of core/classifier.py, and taking the encoder
of a pretraining state."""
from __future__ import annotations

from typing import Dict, Mapping

import numpy as np
import torch

from localmim.core.classifier import classifier_state
from localmim.core.state import check_state

__all__ = ["ClassifierState"]


class ClassifierState:
    """Mixin of an nn.Module classifier with `spec` and `global_pool`."""

    def state_shapes(self) -> Dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def export_state(self) -> Dict[str, np.ndarray]:
        """name -> float32 numpy copy (core/classifier.py's keys)."""
        return {k: v.detach().cpu().float().numpy().copy() for k, v in self.state_dict().items()}

    def import_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a whole classifier state strictly (StateError names what does not fit)."""
        check_state(self.state_shapes(), state, what=f"state for {type(self).__name__}({self.spec.name})")
        self.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in state.items()})

    def load_encoder(self, encoder: Mapping[str, np.ndarray], what: str = "checkpoint") -> None:
        """Take the encoder part of a canonical pretraining state (core.classifier.classifier_state);
        the head and its new norm keep their initialisation."""
        state = self.export_state()
        state.update(classifier_state(encoder, self.spec, self.global_pool, what))
        self.import_state(state)
