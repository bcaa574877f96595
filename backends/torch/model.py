"""What the LocalMIM ViT and Swin models share: targets and the canonical state."""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np
import torch
from torch import nn

from localmim.backends.torch import targets as T
from localmim.core.state import check_hog_kernels, check_state


def init_linear_and_norm(module: nn.Module) -> None:
    """docs/method.md#initialisation: xavier_uniform Linear weights (a fused qkv as one matrix), zero biases;
    LayerNorm weight 1, bias 0. Use with `module.apply`."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class LocalMIMModel(nn.Module):
    """Base of LocalMIMViT and LocalMIMSwin.

    Subclasses set `spec` (its `target` says HOG or pixels), `branches` (the spec's BranchSpecs)
    and, for HOG targets, `hog_enc` (one frozen HOGLayer per branch).
    """

    def forward(self, imgs: torch.Tensor, masks: Mapping[str, torch.Tensor]):
        """Pretraining loss of one batch -> (loss, branch_losses): float32 scalar and
        (num_branches,) float32. masks: the loader's masks dict (ViT: ids_keep, ids_restore,
        mask; Swin: its grouping plan)."""
        latents = self.forward_encoder(imgs, masks)
        preds = self.forward_decoders(latents, masks)
        targets = self.forward_targets(imgs)
        return T.localmim_loss(preds, targets, self.branch_masks(masks, imgs.shape[0]))

    def forward_targets(self, imgs: torch.Tensor) -> List[torch.Tensor]:
        """One float32 (B, L_k, out_k) target per branch, no grad, autocast off
        (docs/method.md#hog-targets, #pixel-targets)."""
        cells = [br.cell for br in self.branches]
        tgt = self.spec.target
        with torch.no_grad(), torch.autocast(device_type=imgs.device.type, enabled=False):
            imgs = imgs.float()
            if tgt.kind == "pixel":
                return T.pixel_targets(imgs, cells, tgt.norm_pix)
            biases = None
            if tgt.hog_bias:
                biases = torch.stack([h.conv.bias for h in self.hog_enc]).float()
            return T.hog_targets(imgs, cells, tgt.nbins, biases)

    def state_shapes(self) -> Dict[str, tuple]:
        """Canonical name -> shape of every parameter and buffer of the state (trainable and frozen)."""
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def export_state(self) -> Dict[str, np.ndarray]:
        """Canonical state: {name: float32 numpy copy} with the PyTorch names and layouts."""
        return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in self.state_dict().items()}

    def import_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a canonical state strictly.

        Raises core.state.StateError (a ValueError) naming missing, unexpected and mis-shaped keys,
        or a HOG kernel that is not the fixed Sobel filter; the model is untouched on error.
        """
        own = self.state_dict()
        check_state({k: tuple(v.shape) for k, v in own.items()}, state,
                    what=f"state for {self.spec.name} (torch {type(self).__name__})")
        check_hog_kernels(state)
        tensors = {k: torch.as_tensor(np.asarray(v)).to(own[k].dtype) for k, v in state.items()}
        self.load_state_dict(tensors, strict=True)
