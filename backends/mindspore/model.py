"""What the LocalMIM ViT and Swin models share: targets and the canonical state."""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from localmim.backends.mindspore import targets as T
from localmim.core.state import check_hog_kernels, check_state


class LocalMIMModel(nn.Cell):
    """Base of LocalMIMViT and LocalMIMSwin.

    `__init__(spec)` keeps the spec's branch and target facts as plain attributes (compile-time
    constants under ms.jit); subclasses add `hog_enc` (one frozen HOGLayer per branch) for HOG.
    """

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.branch_specs = spec.branches()
        self.num_branches = len(self.branch_specs)
        self.cell_sizes = tuple(b.cell for b in self.branch_specs)
        self.out_dims = spec.out_dims()
        self.target_kind = spec.target.kind
        self.nbins = spec.target.nbins
        self.hog_bias = bool(spec.target.hog_bias)
        self.norm_pix = bool(spec.target.norm_pix)

    def construct(self, imgs, masks):
        """Pretraining loss of one batch -> (loss scalar, branch_losses (num_branches,)), both
        float32. masks: the loader's masks dict as Tensors (ViT: ids_keep, ids_restore, mask;
        Swin: its grouping plan)."""
        latents = self.forward_encoder(imgs, masks)
        preds = self.forward_decoders(latents, masks)
        targets = self.forward_targets(imgs)
        return T.localmim_loss(preds, targets, self.branch_masks(masks, imgs.shape[0]))

    def forward_targets(self, imgs) -> List[Tensor]:
        """Per-branch targets (B, L_k, out_k), float32, no gradient (HOG or pixel:
        docs/method.md#hog-targets, #pixel-targets)."""
        imgs = ops.stop_gradient(imgs.astype(ms.float32))
        if self.target_kind == "hog":
            if self.hog_bias:
                biases = [self.hog_enc[k].conv.bias for k in range(self.num_branches)]
                outs = T.hog_targets(imgs, self.cell_sizes, self.nbins, biases)
            else:
                outs = T.hog_targets(imgs, self.cell_sizes, self.nbins)
        else:
            outs = T.pixel_targets(imgs, self.cell_sizes, self.norm_pix)
        return [ops.stop_gradient(t) for t in outs]

    def state_shapes(self) -> Dict[str, tuple]:
        """Canonical name -> shape of every parameter (trainable and frozen)."""
        return {p.name: tuple(p.shape) for p in self.get_parameters()}

    def export_state(self) -> Dict[str, np.ndarray]:
        """Canonical state: name -> float32 numpy copy, PyTorch layouts (docs/internals.md)."""
        return {p.name: p.asnumpy().astype(np.float32, copy=True) for p in self.get_parameters()}

    def import_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Load a canonical state strictly.

        Raises core.state.StateError (a ValueError) naming the missing, unexpected and mis-shaped
        keys (key, expected, found), or a HOG kernel that is not the Sobel filter; nothing is
        written unless the whole state fits.
        """
        check_state(self.state_shapes(), state,
                    what=f"state for {self.spec.name} (MindSpore {type(self).__name__})")
        check_hog_kernels(state)
        for p in self.get_parameters():
            p.set_data(Tensor(np.asarray(state[p.name], dtype=np.float32).copy()))
