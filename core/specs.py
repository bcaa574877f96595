"""Model sizes and the LocalMIM branch layout of each, validated at construction.

Everything the backends must agree on about geometry lives here: which blocks (ViT) or stages
(Swin) are tapped, the scale and target cell size of each branch, the output grid, the decoder
width/depth/heads and the output dimension for HOG and pixel targets.

Units: sizes in pixels, grids in tokens per side. Block and stage indices are 0-based.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

__all__ = [
    "SpecError", "TargetSpec", "BranchSpec", "ViTSpec", "SwinSpec",
    "VIT_SPECS", "SWIN_SPECS", "get_spec", "list_specs", "default_taps",
    "ARCH_KEYS", "spec_to_arch", "spec_from_arch",
]

VIT_SCALES = (4.0, 2.0, 1.0, 0.5)
SUPPORTED_VIT_SCALES = (4.0, 2.0, 1.0, 0.5)


class SpecError(ValueError):
    """A model geometry that cannot work (duplicate taps, non-integer cells, grids that do not divide)."""


@dataclass(frozen=True)
class TargetSpec:
    """What the decoders reconstruct.

    kind: "hog" (3 * nbins features per cell) or "pixel" (the cell's normalised RGB values).
    nbins: HOG orientation bins over [0, pi).
    hog_bias: give each scale's Sobel conv a frozen random 2-vector bias (reference `--hog_bias`).
    norm_pix: normalise each pixel target cell by its mean and unbiased std (MAE `norm_pix_loss`).
    """
    kind: str = "hog"
    nbins: int = 9
    hog_bias: bool = False
    norm_pix: bool = True

    def __post_init__(self):
        if self.kind not in ("hog", "pixel"):
            raise SpecError(f"target kind must be 'hog' or 'pixel', got {self.kind!r}")
        if self.kind == "hog" and (not isinstance(self.nbins, int) or self.nbins < 1):
            raise SpecError(f"HOG nbins must be a positive integer, got {self.nbins!r}")

    def out_dim(self, cell: int) -> int:
        """Features per target token for a cell of `cell` x `cell` pixels."""
        return 3 * self.nbins if self.kind == "hog" else 3 * cell * cell


@dataclass(frozen=True)
class BranchSpec:
    """One local reconstruction branch.

    tap: ViT block index or Swin stage index whose output feeds this branch.
    scale: output grid relative to the encoder's patch grid (ViT: 4, 2, 1, 0.5; Swin: 1).
    grid: output tokens per side; the branch predicts grid * grid tokens in raster order.
    cell: pixels per target token side (img_size == grid * cell).
    in_dim: width of the tapped features.
    decoder_dim, decoder_depth, decoder_heads: the branch's transformer decoder.
    """
    tap: int
    scale: float
    grid: int
    cell: int
    in_dim: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int


def default_taps(depth: int) -> Tuple[int, ...]:
    """The reference rule ID = [1, 3, depth-3, depth-1] (0-based blocks)."""
    return (1, 3, depth - 3, depth - 1)


def _check_taps(taps, limit, what):
    if len(set(taps)) != len(taps):
        raise SpecError(
            f"{what} taps {list(taps)} contain duplicates; the reference silently drops loss terms "
            f"in that case (e.g. depth <= 6 gives [1, 3, 3, 5]): pass explicit distinct taps")
    if any(t < 0 or t >= limit for t in taps):
        raise SpecError(f"{what} taps {list(taps)} must lie in [0, {limit - 1}]")
    if list(taps) != sorted(taps):
        raise SpecError(f"{what} taps {list(taps)} must be increasing (finest scale first)")


@dataclass(frozen=True)
class ViTSpec:
    """A LocalMIM ViT: encoder size, input geometry, taps and decoders."""
    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    img_size: int = 224
    taps: Optional[Tuple[int, ...]] = None
    scales: Tuple[float, ...] = VIT_SCALES
    decoder_dim: int = 256
    decoder_depth: int = 1
    decoder_heads: int = 8
    target: TargetSpec = field(default_factory=TargetSpec)
    family: str = "vit"

    def __post_init__(self):
        if self.taps is None:
            object.__setattr__(self, "taps", default_taps(self.depth))
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        self.validate()

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def validate(self):
        if self.img_size % self.patch_size:
            raise SpecError(
                f"{self.name}: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise SpecError(f"{self.name}: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4 or self.decoder_dim % 4:
            raise SpecError(f"{self.name}: sin-cos position tables need widths divisible by 4")
        if self.decoder_dim % self.decoder_heads:
            raise SpecError(
                f"{self.name}: decoder_dim {self.decoder_dim} not divisible by decoder_heads {self.decoder_heads}")
        if len(self.taps) != len(self.scales):
            raise SpecError(f"{self.name}: {len(self.taps)} taps but {len(self.scales)} scales")
        _check_taps(self.taps, self.depth, self.name)
        for s in self.scales:
            if s not in SUPPORTED_VIT_SCALES:
                raise SpecError(f"{self.name}: scale {s} unsupported; rescaling heads exist for {SUPPORTED_VIT_SCALES}")
            cell = self.patch_size / s
            if cell != int(cell):
                raise SpecError(
                    f"{self.name}: scale {s} with patch {self.patch_size} needs a {cell}-px target cell; "
                    f"cell sizes must be integers (ViT-H/14 cannot use HOG cells at scale 4)")
            if (self.grid * s) != int(self.grid * s):
                raise SpecError(
                    f"{self.name}: scale {s} needs an even patch grid, got {self.grid} "
                    f"(img_size {self.img_size} / patch {self.patch_size})")

    def branches(self) -> Tuple[BranchSpec, ...]:
        return tuple(
            BranchSpec(tap=t, scale=s, grid=int(self.grid * s), cell=int(self.patch_size / s),
                       in_dim=self.embed_dim, decoder_dim=self.decoder_dim,
                       decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads)
            for t, s in zip(self.taps, self.scales))

    def out_dims(self) -> Tuple[int, ...]:
        return tuple(self.target.out_dim(b.cell) for b in self.branches())

    def with_(self, **changes) -> "ViTSpec":
        """A copy with fields replaced and re-validated (e.g. img_size, target)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class SwinSpec:
    """A LocalMIM Swin (GreenMIM-style, attends among visible tokens only).

    Masking works on cells of `mask_cell` px (32 for the standard 4-stage Swin), so the mask grid
    is img_size / mask_cell and equals the last stage's resolution.
    """
    name: str
    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: int
    patch_size: int = 4
    mlp_ratio: float = 4.0
    img_size: int = 224
    decoder_dims: Tuple[int, ...] = (64, 128, 128, 128)
    decoder_depth: int = 1
    decoder_heads: int = 4
    target: TargetSpec = field(default_factory=lambda: TargetSpec(kind="pixel", norm_pix=True))
    family: str = "swin"

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "decoder_dims", tuple(int(d) for d in self.decoder_dims))
        self.validate()

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def mask_cell(self) -> int:
        """Pixels per mask cell: the last stage's stride."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    @property
    def mask_grid(self) -> int:
        return self.img_size // self.mask_cell

    def stage_resolution(self, i: int) -> int:
        """Tokens per side entering stage i."""
        return self.img_size // (self.patch_size * 2 ** i)

    def stage_dim(self, i: int) -> int:
        return self.embed_dim * 2 ** i

    def stage_window(self, i: int) -> int:
        """Window side at stage i: the stage resolution when it is not larger than the window."""
        return min(self.window_size, self.stage_resolution(i))

    def stage_shift(self, i: int) -> int:
        """Shift of the odd blocks at stage i (0 when the window covers the stage)."""
        return 0 if self.window_size >= self.stage_resolution(i) else self.window_size // 2

    def validate(self):
        if len(self.depths) != len(self.num_heads):
            raise SpecError(f"{self.name}: {len(self.depths)} stage depths but {len(self.num_heads)} head counts")
        if len(self.decoder_dims) != self.num_stages:
            raise SpecError(f"{self.name}: need one decoder width per stage, got {self.decoder_dims}")
        if self.img_size % self.mask_cell:
            raise SpecError(
                f"{self.name}: img_size {self.img_size} must be a multiple of the {self.mask_cell}-px mask cell")
        for i in range(self.num_stages):
            if self.stage_dim(i) % self.num_heads[i]:
                raise SpecError(f"{self.name}: stage {i} width {self.stage_dim(i)} not divisible by {self.num_heads[i]} heads")
        for d, h in zip(self.decoder_dims, (self.decoder_heads,) * self.num_stages):
            if d % h or d % 4:
                raise SpecError(f"{self.name}: decoder width {d} must be divisible by {h} heads and by 4")

    def branches(self) -> Tuple[BranchSpec, ...]:
        """Branch k reads stage k's output after its patch merging (the last stage has none)."""
        out = []
        for k in range(self.num_stages):
            after = min(k + 1, self.num_stages - 1)
            grid = self.stage_resolution(after)
            out.append(BranchSpec(tap=k, scale=1.0, grid=grid, cell=self.img_size // grid,
                                  in_dim=self.stage_dim(after), decoder_dim=self.decoder_dims[k],
                                  decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads))
        return tuple(out)

    def out_dims(self) -> Tuple[int, ...]:
        return tuple(self.target.out_dim(b.cell) for b in self.branches())

    def with_(self, **changes) -> "SwinSpec":
        return replace(self, **changes)


_HOG9 = TargetSpec(kind="hog", nbins=9, hog_bias=False)
_HOG18_BIAS = TargetSpec(kind="hog", nbins=18, hog_bias=True)
_PIXEL = TargetSpec(kind="pixel", norm_pix=True)
_PIXEL_PLAIN = TargetSpec(kind="pixel", norm_pix=False)

VIT_SPECS: Dict[str, ViTSpec] = {
    "vit_tiny_test": ViTSpec("vit_tiny_test", patch_size=8, embed_dim=32, depth=4, num_heads=2,
                             img_size=32, taps=(0, 1, 2, 3), decoder_dim=16, decoder_heads=2, target=_HOG9),
    "vit_demo": ViTSpec("vit_demo", patch_size=8, embed_dim=192, depth=8, num_heads=3,
                        img_size=64, decoder_dim=128, decoder_heads=4, target=_HOG9),
    # The quick-start model (`localmim demo`): small enough to beat predicting the mean on held-out
    # photographs after ~300 CPU steps; 96 px gives a 12x12 patch grid, so the 36 visible patches
    # surround the hidden ones closely. Taps start at block 1: a 4-block variant tapping blocks 0-3
    # left its two finest branches at the mean after 300 steps; 96- and 64-wide decoders reached 0.68
    # and 0.82 of the baseline where 128 reaches 0.64.
    "vit_mini": ViTSpec("vit_mini", patch_size=8, embed_dim=128, depth=6, num_heads=4, img_size=96,
                        taps=(1, 2, 4, 5), decoder_dim=128, decoder_heads=4, target=_PIXEL_PLAIN),
    "vit_small_patch16": ViTSpec("vit_small_patch16", 16, 384, 12, 6, target=_HOG9),
    "vit_base_patch16": ViTSpec("vit_base_patch16", 16, 768, 12, 12, target=_HOG9),
    "vit_large_patch16": ViTSpec("vit_large_patch16", 16, 1024, 24, 16, target=_HOG18_BIAS),
}
# ViT-H/14 is not registered: with HOG cells at scale 4 it needs 3.5-px cells (docs/method.md#h1);
# ViTSpec("vit_huge_patch14", 14, 1280, 32, 16) raises SpecError saying so.

SWIN_SPECS: Dict[str, SwinSpec] = {
    # Tiny sizes use 2-px patches so that the 16-px mask cells give a 4x4 (tests) or 6x6 (demo) mask grid.
    "swin_tiny_test": SwinSpec("swin_tiny_test", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                               window_size=4, patch_size=2, img_size=64, decoder_dims=(8, 16, 16, 16),
                               decoder_heads=2, target=_PIXEL),
    "swin_demo": SwinSpec("swin_demo", embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 8),
                          window_size=6, patch_size=2, img_size=96, decoder_dims=(32, 64, 64, 64),
                          decoder_heads=4, target=_PIXEL),
    "swin_base_patch4_win7": SwinSpec("swin_base_patch4_win7", 128, (2, 2, 18, 2), (4, 8, 16, 32), 7,
                                      target=_PIXEL),
    "swin_base_patch4_win14": SwinSpec("swin_base_patch4_win14", 128, (2, 2, 18, 2), (4, 8, 16, 32), 14,
                                       target=_PIXEL),
    "swin_large_patch4_win14": SwinSpec("swin_large_patch4_win14", 192, (2, 2, 18, 2), (6, 12, 24, 48), 14,
                                        target=_HOG18_BIAS),
}


def list_specs():
    return sorted(VIT_SPECS) + sorted(SWIN_SPECS)


def get_spec(name: str, **overrides):
    """Look up a registered spec by name and apply field overrides (img_size, target, taps, ...)."""
    if name in VIT_SPECS:
        base = VIT_SPECS[name]
    elif name in SWIN_SPECS:
        base = SWIN_SPECS[name]
    else:
        raise SpecError(f"unknown model {name!r}; known models: {', '.join(list_specs())}")
    return base.with_(**overrides) if overrides else base


# ----------------------------------------------------------------------------------------------
# architectures as flat dicts: what `localmim convert` writes beside the weights and reads back
# (JSON-friendly values), and the keys of its `--arch key=value` options

_TARGET_KEYS = ("target", "nbins", "hog_bias", "norm_pix")
ARCH_KEYS: Dict[str, Tuple[str, ...]] = {
    "vit": ("name", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "taps",
            "scales", "decoder_dim", "decoder_depth", "decoder_heads") + _TARGET_KEYS,
    "swin": ("name", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio",
             "img_size", "decoder_dims", "decoder_depth", "decoder_heads") + _TARGET_KEYS,
}


def spec_to_arch(spec) -> Dict[str, object]:
    """A spec as a flat dict {"family", the ARCH_KEYS of its family}: tuples become lists and the
    target's fields sit at the top ("target" = its kind), so the dict is JSON text's round trip."""
    out: Dict[str, object] = {"family": spec.family}
    for key in ARCH_KEYS[spec.family]:
        if key == "target":
            out[key] = spec.target.kind
        elif key in _TARGET_KEYS:
            out[key] = getattr(spec.target, key)
        else:
            value = getattr(spec, key)
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def spec_from_arch(arch) -> "ViTSpec | SwinSpec":
    """The spec a flat arch dict describes (the inverse of `spec_to_arch`).

    "family" ("vit" or "swin") and every field without a default (ViT: patch_size, embed_dim,
    depth, num_heads; Swin: embed_dim, depths, num_heads, window_size) are required; "name"
    defaults to "custom_<family>". Raises SpecError naming an unknown or missing key.
    """
    family = arch.get("family")
    if family not in ARCH_KEYS:
        raise SpecError(f"architecture family must be 'vit' or 'swin', got {family!r}")
    allowed = ARCH_KEYS[family]
    unknown = sorted(k for k in arch if k != "family" and k not in allowed)
    if unknown:
        raise SpecError(f"unknown {family} architecture key(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
    fields = {k: v for k, v in arch.items() if k in allowed and k not in _TARGET_KEYS}
    fields.setdefault("name", f"custom_{family}")
    target = {k: arch[k] for k in _TARGET_KEYS if k in arch}
    if target:
        default = TargetSpec() if family == "vit" else TargetSpec(kind="pixel", norm_pix=True)
        kind = target.pop("target", default.kind)
        fields["target"] = replace(default, kind=kind, **target)
    for key in ("taps", "scales", "depths", "num_heads", "decoder_dims"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    cls = ViTSpec if family == "vit" else SwinSpec
    try:
        return cls(**fields)
    except TypeError as exc:  # a required field is absent
        raise SpecError(f"incomplete or ill-typed {family} architecture: {exc}") from None
