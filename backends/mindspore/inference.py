"""Inference helpers: rebuild a pretrained model from a checkpoint and look at its reconstructions."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

import mindspore as ms

from localmim.backends.mindspore import checkpoint as ckpt
from localmim.backends import runs
from localmim.backends.mindspore import build_model
from localmim.backends.mindspore.swin import plan_tensors
from localmim.core.swin_plan import SwinPlan, build_swin_plan

__all__ = ["load_model", "load_pretrained", "reconstruct"]


def load_model(checkpoint_path: str) -> Tuple[object, object]:
    """(model, spec) from a MindSpore training checkpoint of this package (ViT or Swin).

    The spec is rebuilt from the checkpoint's config (meta.config) through core.config; the
    weights are loaded strictly (a mismatch raises CheckpointError naming the keys).
    """
    payload = ckpt.load_checkpoint(checkpoint_path, require=("model", "config"))
    spec = runs.spec_from_checkpoint(checkpoint_path, payload["config"])
    model = build_model(spec)
    ckpt.check_model_state(checkpoint_path, payload["model"], model.state_shapes())
    model.import_state(payload["model"])
    model.set_train(False)
    return model, spec


def load_pretrained(path: str, layout: Optional[str] = None, **arch):
    """A LocalMIM model (`model.spec` its spec, set_train(False)) with the weights of any readable
    file and layout (core.layouts.LAYOUTS: this package's .pth / .ckpt / .safetensors, official
    LocalMIM ViT and Swin, MAE, timm ViT and Swin, Swin encoders).

    layout: the file's layout (default: recorded in the file, else detected from the keys).
    arch: core.specs.ARCH_KEYS values for what the shapes cannot tell (num_heads, decoder_heads,
    taps, ...; a file written by `localmim convert` records them). img_size / window_size are the
    geometry wanted: position tables (and Swin relative tables) are resampled when the file has
    another (core.resample). Every tensor of the file must fit the model (strict about names and
    shapes); an encoder file leaves the decoders, target convs and absent branch norms as freshly
    initialised. The file is read with the safe readers of localmim.backends.weights (no pickled
    code runs; a .pth needs torch). Raises ConvertError / StateError (ValueErrors) naming the
    file and the keys.
    """
    from localmim.backends.weights import read_pretrained
    spec, canon, _ = read_pretrained(path, layout, **arch)
    model = build_model(spec)
    state = model.export_state()
    state.update(canon)
    model.import_state(state)
    model.set_train(False)
    return model


def _swin_plan(spec, mask):
    """A SwinPlan, a to_arrays() dict, or an (L,) cell mask -> plan Tensors."""
    if isinstance(mask, (SwinPlan, dict)):
        return plan_tensors(mask)
    cell_mask = np.asarray(mask)
    if cell_mask.dtype != np.bool_:
        if cell_mask.size and not np.isin(cell_mask, (0, 1)).all():
            raise ValueError(f"Swin cell mask for {spec.name} must be boolean or 0/1, got values "
                             f"{np.unique(cell_mask)[:5]}")
        cell_mask = cell_mask.astype(bool)
    return plan_tensors(build_swin_plan(spec, cell_mask))


def reconstruct(model, images: np.ndarray, mask) -> Dict[str, List[np.ndarray]]:
    """Per-branch predictions, targets and masks for one batch.

    images: (B, 3, S, S) float32, ImageNet-normalised. mask: ViT: core.masking.VitMask for that batch;
    Swin: a core.swin_plan.SwinPlan (or its to_arrays() dict) or the (L,) bool cell mask of
    core.masking.swin_cell_mask.
    Returns {"targets": [(B, L_k, out_k)], "preds": [(B, L_k, out_k)], "masks": [(B, L_k)]} as float32
    numpy arrays, k over branches (finest scale first), tokens in raster order of each branch's grid.
    """
    spec = model.spec
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (spec.img_size, spec.img_size):
        raise ValueError(f"images of shape {images.shape} do not fit model {spec.name}: expected "
                         f"(B, 3, {spec.img_size}, {spec.img_size})")
    imgs = ms.Tensor(images)
    if getattr(spec, "family", "vit") == "swin":
        masks = _swin_plan(spec, mask)
    else:
        masks = {k: ms.Tensor(v) for k, v in mask.as_dict().items()}
    preds = model.forward_decoders(model.forward_encoder(imgs, masks), masks)
    branch_masks = model.branch_masks(masks, images.shape[0])
    targets = model.forward_targets(imgs)

    def to_np(ts):
        return [t.asnumpy().astype(np.float32) for t in ts]

    return {"targets": to_np(targets), "preds": to_np(preds), "masks": to_np(branch_masks)}
