"""`localmim parity`: compare the PyTorch and MindSpore backends quantity by quantity.

For the same canonical weights, images and core masks (float32, CPU) it measures the worst
relative error of every quantity the parity contract names (docs/method.md#parity-contract):
encoder taps, per-branch predictions, targets, per-branch and total loss, the gradient of every
parameter, parameters after several AdamW steps of each engine's own step object (TrainStep,
with the core's groups and schedule), and a training-loss curve. The forward quantities and
gradients are measured on two kinds of images: smooth Gaussian noise and real photographs (by
default the four scikit-image photographs astronaut, coffee, chelsea and rocket that
`tools.sample_images` writes; `--images DIR` takes a user's own). Photographs matter for HOG targets: 8-bit images have many pixels whose gradient is
exactly zero, where a backend that computed it inexactly would put the pixel into another bin
(docs/method.md#zero-and-bin-edge-gradients). For HOG targets the share of target cells that
differ by more than 1e-4 is reported per branch (scale), next to the value error over all cells.

The relative error of a tensor pair is max|a - b| / max(max|b|, 1e-12): one number per tensor,
insensitive to where the tensor is small.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from localmim.core import masking
from localmim.core.schedule import lr_for_step
from localmim.core.specs import TargetSpec, get_spec
from localmim.core.swin_plan import build_swin_plan

# The parity contract (docs/method.md#parity-contract): forward quantities, gradients, parameters after AdamW steps.
FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4
PARAM_TOL = 1e-4
# A gradient entry below this share of its tensor's largest is at float32 rounding level: AdamW
# turns it into a step of about lr whose sign no two implementations share (docs/method.md#parity-contract).
UNRESOLVED_GRAD = 1e-5
CURVE_TOL = 1e-4
HOG_FLIP_TOL = 1e-4
HOG_CELL_ATOL = 1e-4   # a target cell "differs" when any of its features differs by more than this

# The photographs of issue 10 (bundled with scikit-image, written by tools.sample_images).
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")


class ParityError(ValueError):
    """Bad input to `localmim parity` (no images to compare on, images of the wrong size)."""


@dataclasses.dataclass
class Row:
    """One compared quantity: its worst relative error over all tensors, and the bound it must meet."""
    quantity: str
    worst: float
    tolerance: float
    where: str = ""
    inputs: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.worst <= self.tolerance)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b), initial=0.0) / max(float(np.max(np.abs(b), initial=0.0)), 1e-12))


def worst_of(name: str, pairs: Dict[str, tuple], tol: float) -> Row:
    """The worst relative error over named (a, b) pairs, remembering which name it was."""
    errs = {k: relative_error(a, b) for k, (a, b) in pairs.items()}
    key = max(errs, key=errs.get)
    return Row(name, errs[key], tol, key)


def differing_cells(a: np.ndarray, b: np.ndarray, atol: float = HOG_CELL_ATOL) -> np.ndarray:
    """(B, L) bool: target tokens (B, L, C) whose feature vectors differ anywhere by more than atol."""
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(axis=-1) > atol


def differing_cell_share(a: np.ndarray, b: np.ndarray, atol: float = HOG_CELL_ATOL) -> float:
    """Share of target tokens (B, L, C) whose feature vector differs anywhere by more than atol."""
    return float(differing_cells(a, b, atol).mean())


# ------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class Inputs:
    """One batch as numpy: images (B, 3, S, S) float32, ImageNet-normalised, and the masks dict
    every model method takes after them (ViT: ids_keep, ids_restore, mask; Swin: the grouping
    plan's arrays). `source` names the images in reports ("noise", "photos", a folder)."""
    images: np.ndarray
    masks: Dict[str, np.ndarray]
    source: str = "noise"


def noise_images(spec, batch: int, seed: int, step: int = 0) -> np.ndarray:
    """Smooth Gaussian noise at the ImageNet-normalised scale: (batch, 3, S, S) float32, seeded."""
    rng = np.random.default_rng([seed, step])
    s = spec.img_size
    coarse = rng.standard_normal((batch, 3, s // 4, s // 4)).astype(np.float32)
    images = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)
    return (images + 0.3 * rng.standard_normal(images.shape)).astype(np.float32)


def make_masks(spec, batch: int, seed: int, step: int = 0) -> Dict[str, np.ndarray]:
    """The core's masks for one batch: the ViT mask dict or the Swin plan's arrays, seeded."""
    mask_rng = masking.mask_rng(seed, 0, step, 0)
    if spec.family == "swin":
        return build_swin_plan(spec, masking.swin_cell_mask(mask_rng, spec.mask_grid, 0.75)).to_arrays()
    m = masking.vit_mask(mask_rng, batch, spec.num_patches, 0.75)
    return {"ids_keep": m.ids_keep, "ids_restore": m.ids_restore, "mask": m.mask}


def make_inputs(spec, batch: int, seed: int, step: int = 0) -> Inputs:
    """Noise images and the core's masks or plan, both seeded by (seed, step)."""
    return Inputs(noise_images(spec, batch, seed, step), make_masks(spec, batch, seed, step), "noise")


def bundled_photo_paths(cache_dir: Optional[str] = None) -> List[str]:
    """The PHOTO_NAMES photographs among the bundled sample images (written once by
    tools.sample_images into `cache_dir` or its default cache). Raises
    SampleImagesUnavailable without scikit-image."""
    from localmim.tools.sample_images import sample_image_dir
    folder = sample_image_dir(cache_dir)
    return [os.path.join(folder, f"{name}.png") for name in PHOTO_NAMES]


def folder_image_paths(folder: str, limit: int) -> List[str]:
    """The first `limit` images of a folder (flat or class folders, in `find_images` order)."""
    from localmim.backends.images import find_images
    if limit < 1:
        raise ParityError(f"--max-images must be at least 1, got {limit}")
    return find_images(os.path.expanduser(folder))[0][:limit]


def load_photos(paths: Sequence[str], size: int) -> np.ndarray:
    """(N, 3, size, size) float32, ImageNet-normalised: each file's shorter side resized to `size`
    (bicubic) and centre-cropped, as `localmim visualize` reads an image."""
    from localmim.tools.visualize import load_image, normalize_image
    return np.concatenate([normalize_image(load_image(p, size)) for p in paths])


def photo_inputs(spec, images: np.ndarray, seed: int, source: str = "photos") -> Inputs:
    """Given photographs (N, 3, S, S) with the core's masks for a batch of N."""
    if images.shape[1:] != (3, spec.img_size, spec.img_size):
        raise ParityError(f"{spec.name} takes (N, 3, {spec.img_size}, {spec.img_size}) images, got {images.shape}")
    return Inputs(np.ascontiguousarray(images, dtype=np.float32), make_masks(spec, images.shape[0], seed), source)


# ------------------------------------------------------------------------------- backends

class TorchSide:
    """The PyTorch model driven with numpy in, numpy out."""

    def __init__(self, spec, state):
        import torch
        from localmim.backends.torch import build_model
        self.torch = torch
        # Tiny models next to MindSpore's CPU thread pool: extra torch threads only contend.
        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.model = build_model(spec).float()
        self.model.import_state(state)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _t(self, x):
        if isinstance(x, dict):
            return {k: self._t(v) for k, v in x.items()}
        return self.torch.from_numpy(np.ascontiguousarray(x))

    def forward(self, inputs: Inputs):
        with self.torch.no_grad():
            imgs, masks = self._t(inputs.images), self._t(inputs.masks)
            latents = self.model.forward_encoder(imgs, masks)
            preds = self.model.forward_decoders(latents, masks)
            targets = self.model.forward_targets(imgs)
            loss, branch = self.model(imgs, masks)
        return {"latents": [x.numpy() for x in latents], "preds": [x.numpy() for x in preds],
                "targets": [x.numpy() for x in targets], "loss": loss.numpy(), "branch": branch.numpy()}

    def _loss(self, inputs: Inputs):
        return self.model(self._t(inputs.images), self._t(inputs.masks))[0]

    def gradients(self, inputs: Inputs) -> Dict[str, np.ndarray]:
        self.model.zero_grad(set_to_none=True)
        self._loss(inputs).backward()
        return {n: p.grad.numpy().copy() for n, p in self.params.items()}

    def make_stepper(self, cfg, compile=False):
        """The engine's own optimizer and step object (backends/torch/engine.py), fp32 on the CPU."""
        from localmim.backends.torch import engine
        optimizer = engine.build_optimizer(self.model, cfg)
        self.stepper = engine.TrainStep(self.model, optimizer, accum=1, precision="fp32",
                                        device=self.torch.device("cpu"), compile=False)

    def train_step(self, inputs: Inputs, lr: float) -> float:
        self.stepper.set_lr(lr)
        self.stepper.micro({"images": self._t(inputs.images), "masks": self._t(inputs.masks)})
        return float(self.stepper.gather([self.stepper.apply()])[0, 0])

    def state(self):
        return self.model.export_state()


class MindSporeSide:
    """The MindSpore model driven with numpy in, numpy out.

    Forward passes run in PyNative mode; the training step too unless `compile` asks for ms.jit
    (worth its ~20 s compile only for long ViT runs; Swin plans change shape every step).
    """

    def __init__(self, spec, state):
        import mindspore as ms
        from localmim.backends.mindspore import build_model, ensure_cpu_context
        ensure_cpu_context()
        self.ms = ms
        self.spec = spec
        self.model = build_model(spec)
        self.model.import_state(state)
        self.params = {p.name: p for p in self.model.trainable_params()}

    def _t(self, x):
        if isinstance(x, dict):
            return {k: self._t(v) for k, v in x.items()}
        return self.ms.Tensor(np.ascontiguousarray(x))

    def forward(self, inputs: Inputs):
        imgs, masks = self._t(inputs.images), self._t(inputs.masks)
        latents = self.model.forward_encoder(imgs, masks)
        preds = self.model.forward_decoders(latents, masks)
        targets = self.model.forward_targets(imgs)
        loss, branch = self.model(imgs, masks)
        return {"latents": [x.asnumpy() for x in latents], "preds": [x.asnumpy() for x in preds],
                "targets": [x.asnumpy() for x in targets], "loss": loss.asnumpy(), "branch": branch.asnumpy()}

    def _loss_fn(self, imgs, masks):
        return self.model(imgs, masks)[0]

    def gradients(self, inputs: Inputs) -> Dict[str, np.ndarray]:
        names = list(self.params)
        grad_fn = self.ms.value_and_grad(self._loss_fn, None, [self.params[n] for n in names])
        _, grads = grad_fn(self._t(inputs.images), self._t(inputs.masks))
        return {n: g.asnumpy() for n, g in zip(names, grads)}

    def make_stepper(self, cfg, compile=False):
        """The engine's own optimizer and step object (backends/mindspore/engine.py), fp32; ms.jit
        when `compile` asks for it (ViT only: Swin plans change shape every step)."""
        from localmim.backends.mindspore import engine
        optimizer = engine.build_optimizer(self.model, cfg)
        self.stepper = engine.TrainStep(self.model, optimizer, accum=1,
                                        use_jit=bool(compile and self.spec.family == "vit"))

    def train_step(self, inputs: Inputs, lr: float) -> float:
        self.stepper.set_lr(lr)
        self.stepper.micro({"images": inputs.images, "masks": inputs.masks})
        return float(self.stepper.gather([self.stepper.apply()])[0, 0])

    def state(self):
        return self.model.export_state()


# ------------------------------------------------------------------------------- comparisons

def initial_state(spec) -> Dict[str, np.ndarray]:
    """Fresh canonical weights from the torch initialisation (the reference's init)."""
    import torch
    from localmim.backends.torch import build_model
    torch.manual_seed(0)
    return build_model(spec).export_state()


def hog_cell_rows(spec, targets_m: Sequence[np.ndarray], targets_t: Sequence[np.ndarray]) -> List[Row]:
    """One row per branch: the share of HOG target cells (tokens) that differ by more than
    HOG_CELL_ATOL between the backends; `where` counts them."""
    rows = []
    for k, (br, x, y) in enumerate(zip(spec.branches(), targets_m, targets_t)):
        diff = differing_cells(x, y)
        rows.append(Row(f"HOG cells that differ, branch {k} ({br.cell} px)", float(diff.mean()), HOG_FLIP_TOL,
                        f"{int(diff.sum())} of {diff.size} cells"))
    return rows


def compare_forward(spec, tside, mside, inputs: Inputs) -> List[Row]:
    """Encoder taps, predictions, targets (every cell, no exceptions), losses; for HOG targets
    also the per-branch share of differing cells."""
    a, b = mside.forward(inputs), tside.forward(inputs)
    rows = [worst_of("encoder taps", {f"tap {k}": (x, y) for k, (x, y) in
                                      enumerate(zip(a["latents"], b["latents"]))}, FORWARD_TOL),
            worst_of("predictions", {f"branch {k}": (x, y) for k, (x, y) in
                                     enumerate(zip(a["preds"], b["preds"]))}, FORWARD_TOL),
            worst_of("targets", {f"branch {k}": (x, y) for k, (x, y) in
                                 enumerate(zip(a["targets"], b["targets"]))}, FORWARD_TOL)]
    if spec.target.kind == "hog":
        rows += hog_cell_rows(spec, a["targets"], b["targets"])
    rows.append(worst_of("branch losses", {f"branch {k}": (a["branch"][k], b["branch"][k])
                                           for k in range(len(a["branch"]))}, FORWARD_TOL))
    rows.append(Row("loss", relative_error(a["loss"], b["loss"]), FORWARD_TOL))
    return _tagged(rows, inputs.source)


def compare_gradients(tside, mside, inputs: Inputs) -> Row:
    gt, gm = tside.gradients(inputs), mside.gradients(inputs)
    if set(gt) != set(gm):
        raise AssertionError(f"trainable parameters differ: {sorted(set(gt) ^ set(gm))}")
    return _tagged([worst_of("gradients", {n: (gm[n], gt[n]) for n in gt}, GRAD_TOL)], inputs.source)[0]


def _tagged(rows: List[Row], source: str) -> List[Row]:
    for r in rows:
        r.inputs = source
    return rows


def split_key_bias(state: Dict[str, np.ndarray]) -> tuple:
    """Split the key third out of every fused qkv bias.

    The key bias adds q . b_k to every logit of a query row, which softmax ignores: its gradient is
    zero in exact arithmetic and AdamW turns the rounding noise into +-lr-sized steps that no two
    implementations share. Those entries are compared against an absolute bound instead.
    """
    rest, key_bias = {}, {}
    for name, value in state.items():
        if name.endswith("attn.qkv.bias"):
            q, k, v = np.split(value, 3)
            rest[name] = np.concatenate([q, v])
            key_bias[name] = k
        else:
            rest[name] = value
    return rest, key_bias


def training_config(weight_decay: float = 0.05, betas=(0.9, 0.95), eps: float = 1e-8):
    """The optimizer keys both engines' build_optimizer read (the pretraining defaults)."""
    from localmim.core.config import PretrainConfig
    cfg = PretrainConfig()
    cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps = weight_decay, list(betas), eps
    return cfg


def compare_training(spec, state, batches: Sequence, lr=1e-3, min_lr=1e-5, warmup=1, epochs=4,
                     steps_per_epoch=None, compile=False) -> tuple:
    """Train both backends on the same batches with each engine's own AdamW groups and step
    object (TrainStep), the lr of every step from core.schedule.

    Returns (parameters row, key-bias row, worst relative loss-curve error, (torch, mindspore) losses).
    """
    tside, mside = TorchSide(spec, state), MindSporeSide(spec, state)
    cfg = training_config()
    steps_per_epoch = steps_per_epoch or max(1, len(batches) // epochs)
    for side in (tside, mside):
        side.make_stepper(cfg, compile=compile)
    curve_t, curve_m = [], []
    for step, inputs in enumerate(batches):
        step_lr = lr_for_step(step, steps_per_epoch, lr, min_lr, warmup, epochs)
        curve_t.append(tside.train_step(inputs, step_lr))
        curve_m.append(mside.train_step(inputs, step_lr))
    (st, kt), (sm, km) = split_key_bias(tside.state()), split_key_bias(mside.state())
    params = worst_of(f"parameters after {len(batches)} AdamW steps", {n: (sm[n], st[n]) for n in st}, PARAM_TOL)
    # Each AdamW step moves a parameter by at most about lr (|m_hat / sqrt(v_hat)| <= ~1).
    key_bound = 2.0 * lr * len(batches)
    key_diff = max((float(np.abs(km[n] - kt[n]).max()) for n in kt), default=0.0)
    key_row = Row("qkv key-bias drift (absolute, zero gradient)", key_diff, key_bound)
    curve_err = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(curve_m, curve_t))
    return params, key_row, curve_err, (curve_t, curve_m)


def run_parity(spec, batch: int = 2, seed: int = 0, adam_steps: int = 5, curve_steps: int = 0,
               curve_spec=None, photos: Optional[np.ndarray] = None, photo_source: str = "photos") -> List[Row]:
    """Every parity row for `spec`: forward quantities and gradients on a noise batch and, when
    `photos` (N, 3, S, S) are given, on them; then parameters after `adam_steps` AdamW steps on
    noise batches (none for 0) and optionally a `curve_steps` loss curve."""
    state = initial_state(spec)
    tside, mside = TorchSide(spec, state), MindSporeSide(spec, state)
    input_sets = [make_inputs(spec, batch, seed)]
    if photos is not None:
        input_sets.append(photo_inputs(spec, photos, seed, photo_source))
    rows = []
    for inputs in input_sets:
        rows += compare_forward(spec, tside, mside, inputs)
        rows.append(compare_gradients(tside, mside, inputs))
    if adam_steps:
        batches = [make_inputs(spec, batch, seed, step) for step in range(adam_steps)]
        params_row, key_row, _, _ = compare_training(spec, state, batches)
        rows += _tagged([params_row, key_row], "noise")
    if curve_steps:
        cspec = curve_spec or spec
        cstate = initial_state(cspec)
        cbatches = [make_inputs(cspec, batch, seed, step) for step in range(curve_steps)]
        _, _, curve_err, _ = compare_training(cspec, cstate, cbatches, lr=5e-4, warmup=5, epochs=curve_steps,
                                              steps_per_epoch=1, compile=True)
        rows += _tagged([Row(f"loss curve, {curve_steps} steps ({cspec.name})", curve_err, CURVE_TOL)], "noise")
    return rows


def _first_gradients(tmodel, mmodel, batch: Dict, t_ft, ms_ft) -> Dict[str, tuple]:
    """{name: (MindSpore gradient, torch gradient)} of the soft-target loss of one batch (drop path off)."""
    import mindspore as ms
    import torch
    images, targets = batch["images"], batch["targets"]
    tmodel.zero_grad(set_to_none=True)
    t_ft.soft_target_cross_entropy(tmodel(torch.from_numpy(images)), torch.from_numpy(targets)).backward()
    params = mmodel.trainable_params()
    grads = ms.grad(lambda x, y: ms_ft.soft_target_cross_entropy(mmodel(x), y), grad_position=None,
                    weights=params)(ms.Tensor(images), ms.Tensor(targets))
    by_name = {p.name: g.asnumpy() for p, g in zip(params, grads)}
    out = {n: (by_name[n], p.grad.numpy().copy()) for n, p in tmodel.named_parameters()}
    tmodel.zero_grad(set_to_none=True)
    return out


def finetune_rows(model: str = "vit_tiny_test", pool: str = "avg", photos: Optional[Sequence[str]] = None,
                  batch: int = 4, steps: int = 5, classes: int = 5, seed: int = 0, layer_decay: float = 0.75,
                  perturb_head: bool = False) -> List[Row]:
    """Fine-tuning parity of the ViT or Swin classifier of `model`: the same classifier weights
    (drop path off), images (photographs when `photos` paths are given, else noise) and mixed soft
    targets (core.mixup) -> rows for the logits, the soft-target loss and the first batch's
    gradients, then the parameters after `steps` AdamW steps with layer-wise lr decay, each
    backend through its own FinetuneStep. Entries whose torch gradient falls below
    UNRESOLVED_GRAD of its tensor's largest at some step (and the key third of every qkv bias)
    are held to the absolute drift bound 2 lr steps instead. perturb_head: shift one weight of
    the MindSpore head (a check that the rows can fail)."""
    import torch
    from localmim.backends.mindspore import ensure_cpu_context
    from localmim.backends.mindspore import finetune as ms_ft
    from localmim.backends.torch import finetune as t_ft
    from localmim.backends.torch.engine import build_optimizer as t_optimizer
    from localmim.backends.mindspore.engine import build_optimizer as ms_optimizer
    from localmim.core import mixup
    from localmim.core.config import FinetuneConfig
    import mindspore as ms

    ensure_cpu_context()
    spec = get_spec(model)
    torch.manual_seed(seed)
    tmodel = t_ft.CLASSIFIERS[spec.family][0](spec, classes, pool).float()
    state = tmodel.export_state()
    rng = np.random.default_rng(seed)
    state["head.weight"] = (0.02 * rng.standard_normal(state["head.weight"].shape)).astype(np.float32)
    tmodel.import_state(state)
    mmodel = ms_ft.CLASSIFIERS[spec.family][0](spec, classes, pool)
    mstate = dict(state)
    if perturb_head:  # one weight (a uniform shift would cancel: fc_norm's output sums to ~0)
        mstate["head.weight"] = state["head.weight"].copy()
        mstate["head.weight"][0, 0] += 1e-2
    mmodel.import_state(mstate)
    if photos:
        images = load_photos(photos, spec.img_size)
        source = "photos"
    else:
        images, source = noise_images(spec, batch, seed), "noise"
    images = images[: batch - batch % 2] if len(images) >= 2 else images
    labels = np.arange(len(images)) % classes
    cfg = FinetuneConfig()
    cfg.optim.layer_decay, cfg.optim.weight_decay = layer_decay, 0.05
    batches = [dict(zip(("images", "targets"), mixup.mix_batch(images, labels, classes, mixup.MixupConfig(),
                                                                mixup.mix_rng(seed, 0, k))))
               for k in range(steps)]

    tmodel.eval()
    mmodel.set_train(False)
    with torch.no_grad():
        t_logits = tmodel(torch.from_numpy(images)).numpy()
        t_loss = float(t_ft.soft_target_cross_entropy(torch.from_numpy(t_logits),
                                                      torch.from_numpy(batches[0]["targets"])))
    m_logits = mmodel(ms.Tensor(images)).asnumpy()
    m_loss = float(ms_ft.soft_target_cross_entropy(ms.Tensor(m_logits), ms.Tensor(batches[0]["targets"])).asnumpy())
    rows = [Row("logits", relative_error(m_logits, t_logits), FORWARD_TOL),
            Row("loss", relative_error(np.float64(m_loss), np.float64(t_loss)), FORWARD_TOL)]

    rows.append(worst_of("gradients (first batch)", _first_gradients(tmodel, mmodel, batches[0], t_ft, ms_ft),
                         GRAD_TOL))
    tstep = t_ft.FinetuneStep(tmodel, t_optimizer(tmodel, cfg, groups=t_ft.finetune_groups(tmodel, cfg)), seed=seed,
                              accum=1, precision="fp32", device=torch.device("cpu"))
    mstep = ms_ft.FinetuneStep(mmodel, ms_optimizer(mmodel, cfg, groups=ms_ft.finetune_groups(mmodel, cfg)), accum=1)
    lr = 1e-3
    resolved = {n: np.ones(p.shape, bool) for n, p in tmodel.named_parameters()}
    for k, b in enumerate(batches):
        tstep.set_lr(lr)
        tstep.micro({"images": torch.from_numpy(b["images"]), "targets": torch.from_numpy(b["targets"]),
                     "key": torch.tensor([0, k])})
        for n, p in tmodel.named_parameters():
            g = np.abs(p.grad.numpy())
            resolved[n] &= g > UNRESOLVED_GRAD * g.max()
        tstep.apply()
        mstep.set_lr(lr)
        mstep.micro(dict(b, key=np.asarray([0, k])))
        mstep.apply()
    for n, mask in resolved.items():
        if n.endswith("attn.qkv.bias"):  # the key third: zero gradient (split_key_bias)
            mask[mask.shape[0] // 3: 2 * mask.shape[0] // 3] = False
    t_state, m_state = tmodel.export_state(), mmodel.export_state()
    rows.append(worst_of(f"parameters after {steps} AdamW steps (layer decay {layer_decay})",
                         {n: (np.where(resolved[n], m_state[n], t_state[n]), t_state[n]) for n in t_state},
                         PARAM_TOL))
    drift = max(float(np.abs(m_state[n] - t_state[n])[~resolved[n]].max(initial=0.0)) for n in t_state)
    rows.append(Row("drift where a gradient is below float32 resolution (absolute)", drift, 2.0 * lr * steps))
    return _tagged(rows, f"{source}, {pool} pool")


def format_rows(title: str, rows: Sequence[Row]) -> str:
    width = max([6] + [len(r.inputs) for r in rows])
    lines = [title, f"{'inputs':{width}s} {'quantity':44s} {'worst rel. err':>14s} {'bound':>8s}  ok  worst at"]
    for r in rows:
        lines.append(f"{r.inputs:{width}s} {r.quantity:44s} {r.worst:14.3e} {r.tolerance:8.0e}  "
                     f"{'yes' if r.ok else 'NO ':3s} {r.where}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="vit_tiny_test", help="a ViT or Swin model name from core.specs")
    parser.add_argument("--target", default=None, choices=["hog", "pixel"], help="default: the model's")
    parser.add_argument("--hog-bias", action="store_true")
    parser.add_argument("--batch", type=int, default=2, help="noise and AdamW batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adam-steps", type=int, default=5)
    parser.add_argument("--curve-steps", type=int, default=0,
                        help="also compare a training-loss curve of this many steps")
    parser.add_argument("--finetune", action="store_true",
                        help="also compare fine-tuning (classifier logits, loss, 5 AdamW steps with layer decay) "
                             "on the same images")
    parser.add_argument("--images", metavar="DIR", default=None,
                        help="compare on these images (flat or class folders) instead of the bundled "
                             f"photographs ({', '.join(PHOTO_NAMES)})")
    parser.add_argument("--max-images", type=int, default=8, metavar="N",
                        help="with --images: use the first N images (one batch; default 8)")


def _photos_for(args, spec) -> tuple:
    """(images, source name) from --images DIR or the bundled photographs, at the model's size."""
    if args.images:
        paths = folder_image_paths(args.images, args.max_images)
        return load_photos(paths, spec.img_size), os.path.basename(os.path.normpath(args.images)) or "images"
    return load_photos(bundled_photo_paths(), spec.img_size), "photos"


def run(args) -> int:
    spec = get_spec(args.model)
    if args.target or args.hog_bias:
        t = spec.target
        spec = spec.with_(target=TargetSpec(kind=args.target or t.kind, nbins=t.nbins,
                                            hog_bias=args.hog_bias or t.hog_bias, norm_pix=t.norm_pix))
    photos, source = _photos_for(args, spec)
    rows = run_parity(spec, args.batch, args.seed, args.adam_steps, args.curve_steps, photos=photos,
                      photo_source=source)
    if args.finetune:
        paths = folder_image_paths(args.images, args.max_images) if args.images else bundled_photo_paths()
        rows += finetune_rows(spec.name, photos=paths, seed=args.seed)
    print(format_rows(f"PyTorch vs MindSpore, {spec.name}, target {spec.target.kind}, float32 CPU; "
                      f"{photos.shape[0]} images from {source}", rows))
    return 0 if all(r.ok for r in rows) else 1
