"""The integer plan of one batch's masked Swin forward (numpy only, built in the data loader).

LocalMIM's Swin encoder attends among visible tokens only (GreenMIM "group window attention",
docs/method.md#swin-window-attention). Everything integer about that forward depends only on the
batch's cell mask (one mask per batch, #swin-masking), so it is computed here on the CPU and a
backend only gathers and scatters with the arrays below: no Python loops over windows and no host
sync inside the step.

Token order inside the encoder is "cell-major" (docs/method.md#swin-token-order): (cell_row,
cell_col, local_row, local_col) over the visible mask cells taken in raster order of the mask grid.
Coordinates are the true ones at every stage (defect D1 fixed) and patch merging concatenates its
2x2 sources in Swin's order TL, BL, TR, BR (defect D2 fixed).

Grouped form (both modes), for one stage and one window configuration (plain or shifted):

    x_grouped = pad(x)[:, group_index]               # (B, G, S, C), -1 reads a zero pad row
    attn      = q k^T * scale + bias[rel_index] * (attn_mask == 0) + attn_mask   # (B*G, h, S, S)
    x         = out.reshape(B, G * S, C)[:, ungroup_index]                          # (B, N_vis, C)

"masking" mode is one group holding the whole visible sequence in order (G = 1, S = N_vis);
"grouping" mode packs whole windows into groups of S slots (repeated 0/1 knapsack). Both give the
same attention up to exp(-100) terms.

Units: coordinates and resolutions are in tokens of the stage in question; all index arrays are
int64, masks are float32 (attention, 0 / -100) or bool / float32 binary (cell and branch masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from localmim.core import masking
from localmim.core.specs import SwinSpec

__all__ = [
    "MASK_VALUE", "WindowPlan", "StagePlan", "BranchPlan", "SwinPlan", "SwinPlanError",
    "build_swin_plan", "static_plan_bounds", "cell_major_coords", "window_ids", "pack_windows",
]

MASK_VALUE = -100.0  # additive mask between windows and on pads (docs/method.md#swin-window-attention)

# Swin's PatchMerging concatenation order (row offset, col offset): x0 TL, x1 BL, x2 TR, x3 BR.
MERGE_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))

PadSpec = Union[None, int, Sequence[Optional[int]]]


class SwinPlanError(ValueError):
    """A cell mask or geometry that cannot give a valid masked Swin forward."""


@dataclass
class WindowPlan:
    """Window attention of one stage for one window configuration (plain or shifted).

    window: window side w in tokens. shift: s (0 for plain windows).
    mode: "grouping" (N_vis > 2 w^2) or "masking" (one group with every visible token, in order).
    window_id: (N_vis,) int64, window of each visible token by the offset-window formula
        g = (r + (w - s) % w) // w per axis, id = g_row * (windows per side + 1) + g_col.
    group_index: (G, S) int64, position in the stage's visible sequence of each group slot,
        -1 for pads. Real groups come first; groups added by padding are all -1.
    ungroup_index: (N_vis,) int64, position in the flattened (G * S) grouped sequence of each
        visible token (gather with it to merge back and drop pads).
    attn_mask: (G, S, S) float32, 0 where query and key are real tokens of the same window,
        else -100 (pad rows and pad columns included).
    rel_index: (G, S, S) int64, Swin relative-position index (dy + w - 1)(2w - 1) + (dx + w - 1)
        from true coordinates for same-window pairs, 0 elsewhere; a backend multiplies the
        gathered bias by (attn_mask == 0).
    num_real_groups: groups that hold tokens (G minus the padding groups).
    """
    window: int
    shift: int
    mode: str
    window_id: np.ndarray
    group_index: np.ndarray
    ungroup_index: np.ndarray
    attn_mask: np.ndarray
    rel_index: np.ndarray
    num_real_groups: int

    @property
    def num_groups(self) -> int:
        return int(self.group_index.shape[0])

    @property
    def group_size(self) -> int:
        return int(self.group_index.shape[1])


@dataclass
class StagePlan:
    """One encoder stage's visible tokens.

    resolution: tokens per side entering the stage. coords: (N_vis, 2) int64 true (row, col) of
    each visible token, cell-major order. windows: (plain,) or (plain, shifted); block b of the
    stage uses windows[b % len(windows)]. merge_index: (N_vis_next, 4) int64 positions in this
    stage's visible sequence of the 2x2 sources of each next-stage token in the order TL, BL, TR,
    BR (None for the last stage).
    """
    index: int
    resolution: int
    coords: np.ndarray
    windows: Tuple[WindowPlan, ...]
    merge_index: Optional[np.ndarray]

    @property
    def num_visible(self) -> int:
        return int(self.coords.shape[0])

    def window_for_block(self, block: int) -> WindowPlan:
        """The window configuration of block `block` (odd blocks shifted when a shift exists)."""
        return self.windows[block % len(self.windows)]


@dataclass
class BranchPlan:
    """Decoder k's view of the visible tokens.

    source_stage: stage whose visible sequence feeds the branch (min(k + 1, last), docs/method.md#swin-branches).
    grid: g, tokens per side of the branch's output (raster order, g * g tokens).
    scatter: (N_vis at source_stage,) int64 raster index in the g x g grid of each visible token;
        a decoder fills (B, g*g, d) with its mask token and writes the embedded tokens there.
    mask: (g*g,) float32, 1 = masked, the cell mask nearest-upsampled to g x g (docs/method.md#swin-targets-and-loss).
    """
    source_stage: int
    grid: int
    scatter: np.ndarray
    mask: np.ndarray


@dataclass
class SwinPlan:
    """Everything integer about one batch's masked Swin forward.

    cell_mask: (mask_grid**2,) bool, True = masked, raster order of the mask grid.
    patch_index: (N0_vis,) int64, raster index into the stage-0 patch grid (res0 * res0) of each
        visible token in cell-major order: the encoder's first gather after the patch embedding.
    stages: one StagePlan per stage. branches: one BranchPlan per decoder.
    """
    cell_mask: np.ndarray
    patch_index: np.ndarray
    stages: Tuple[StagePlan, ...]
    branches: Tuple[BranchPlan, ...]

    @property
    def coords(self) -> List[np.ndarray]:
        return [st.coords for st in self.stages]

    @property
    def merge_index(self) -> List[np.ndarray]:
        return [st.merge_index for st in self.stages[:-1]]

    @property
    def decoder_scatter(self) -> List[np.ndarray]:
        return [br.scatter for br in self.branches]

    @property
    def branch_mask(self) -> List[np.ndarray]:
        return [br.mask for br in self.branches]

    def to_arrays(self) -> Dict[str, np.ndarray]:
        """Flatten to a dict of arrays with stable keys (for data-loader workers).

        Keys: "cell_mask", "patch_index", "stage{i}.coords", "stage{i}.merge_index" (i < last),
        "stage{i}.win{j}.{window_id,group_index,ungroup_index,attn_mask,rel_index}" (j = 0 plain,
        1 shifted), "branch{k}.scatter", "branch{k}.mask".
        """
        out = {"cell_mask": self.cell_mask, "patch_index": self.patch_index}
        for st in self.stages:
            out[f"stage{st.index}.coords"] = st.coords
            if st.merge_index is not None:
                out[f"stage{st.index}.merge_index"] = st.merge_index
            for j, wp in enumerate(st.windows):
                for name in _WINDOW_ARRAYS:
                    out[f"stage{st.index}.win{j}.{name}"] = getattr(wp, name)
        for k, br in enumerate(self.branches):
            out[f"branch{k}.scatter"] = br.scatter
            out[f"branch{k}.mask"] = br.mask
        return out

    @classmethod
    def from_arrays(cls, spec: SwinSpec, arrays: Dict[str, np.ndarray]) -> "SwinPlan":
        """Rebuild a plan from `to_arrays()` output (window, shift and mode come from `spec`)."""
        def get(key):
            if key not in arrays:
                raise SwinPlanError(f"Swin plan arrays lack key {key!r} needed by {spec.name}")
            return np.asarray(arrays[key])

        stages = []
        for i in range(spec.num_stages):
            coords = get(f"stage{i}.coords")
            windows = []
            for j, shift in enumerate(_stage_shifts(spec, i)):
                w = spec.stage_window(i)
                groups = get(f"stage{i}.win{j}.group_index")
                real = int(np.count_nonzero((groups >= 0).any(axis=1)))
                windows.append(WindowPlan(
                    window=w, shift=shift, mode=_mode(coords.shape[0], w),
                    num_real_groups=real,
                    **{name: get(f"stage{i}.win{j}.{name}") for name in _WINDOW_ARRAYS}))
            merge = get(f"stage{i}.merge_index") if i < spec.num_stages - 1 else None
            stages.append(StagePlan(i, spec.stage_resolution(i), coords, tuple(windows), merge))
        branches = []
        for k, b in enumerate(spec.branches()):
            branches.append(BranchPlan(min(k + 1, spec.num_stages - 1), b.grid,
                                       get(f"branch{k}.scatter"), get(f"branch{k}.mask")))
        return cls(get("cell_mask"), get("patch_index"), tuple(stages), tuple(branches))


_WINDOW_ARRAYS = ("window_id", "group_index", "ungroup_index", "attn_mask", "rel_index")


def _stage_shifts(spec: SwinSpec, i: int) -> Tuple[int, ...]:
    s = spec.stage_shift(i)
    return (0, s) if s > 0 else (0,)


def _mode(num_visible: int, window: int) -> str:
    return "grouping" if num_visible > 2 * window * window else "masking"


def cell_major_coords(cell_mask_2d: np.ndarray, cell: int) -> np.ndarray:
    """True (row, col) of the visible tokens in cell-major order.

    cell_mask_2d: (M, M) bool, True = masked. cell: tokens per cell side at this stage.
    Returns (N_vis, 2) int64 with N_vis = (#visible cells) * cell**2, ordered
    (cell_row, cell_col, local_row, local_col).
    """
    vis_cells = np.argwhere(~cell_mask_2d).astype(np.int64)                     # (Nc, 2) raster
    local = np.stack(np.divmod(np.arange(cell * cell, dtype=np.int64), cell), axis=1)  # (c*c, 2)
    return (vis_cells[:, None, :] * cell + local[None, :, :]).reshape(-1, 2)


def window_ids(coords: np.ndarray, resolution: int, window: int, shift: int) -> np.ndarray:
    """Window id of each token by the offset-window formula of docs/method.md#swin-window-attention.

    coords: (N, 2) int64 true (row, col). Returns (N,) int64, g_row * n + g_col with
    g = (r + (w - s) % w) // w and n = resolution // w + 2 (more than the windows per side).
    """
    offset = (window - shift) % window
    g = (coords + offset) // window
    n = resolution // window + 2
    return g[:, 0] * n + g[:, 1]


def pack_windows(counts: Sequence[int], capacity: int) -> List[List[int]]:
    """Pack windows into groups by repeated 0/1 knapsack (weight = value = token count).

    counts: tokens per window (each 1..capacity). Each round picks, among the windows left, the
    subset with the largest total not above `capacity` (ties: the subset whose last window comes
    earliest, recursively), removes it and repeats. Returns groups as lists of window positions, ascending.
    """
    left = list(range(len(counts)))
    full = (1 << (capacity + 1)) - 1
    groups = []
    while left:
        # reach[k]: bitset of sums reachable with the first k windows left (bit t = sum t).
        reach = [1]
        for pos in left:
            r = reach[-1]
            reach.append((r | (r << counts[pos])) & full)
        best = reach[-1].bit_length() - 1
        chosen = []
        for k in range(len(left) - 1, -1, -1):
            if not (reach[k] >> best) & 1:   # the sum needs window k
                chosen.append(left[k])
                best -= counts[left[k]]
        chosen.reverse()
        groups.append(chosen)
        taken = set(chosen)
        left = [p for p in left if p not in taken]
    return groups


def _group_slots(window_id: np.ndarray, window: int, mode: str,
                 group_size: Optional[int]) -> np.ndarray:
    """(G, S) int64 group_index for one window configuration, -1 for pads."""
    n = window_id.shape[0]
    if mode == "masking":
        return np.arange(n, dtype=np.int64)[None, :]
    order = np.argsort(window_id, kind="stable")
    _, starts, counts = np.unique(window_id[order], return_index=True, return_counts=True)
    size = min(window * window, int(counts.max()))
    if group_size is not None:
        if group_size < size:
            raise SwinPlanError(
                f"group_size {group_size} is smaller than the largest window ({size} visible tokens)")
        size = group_size
    groups = pack_windows(counts.tolist(), size)
    out = np.full((len(groups), size), -1, dtype=np.int64)
    for g, members in enumerate(groups):
        idx = np.concatenate([order[starts[m]:starts[m] + counts[m]] for m in members])
        out[g, :idx.shape[0]] = idx
    return out


def _pad_groups(group_index: np.ndarray, target: Optional[int], where: str) -> np.ndarray:
    if target is None:
        return group_index
    g, s = group_index.shape
    if target < g:
        raise SwinPlanError(f"pad_groups_to={target} is smaller than the {g} groups needed at {where}")
    return np.concatenate([group_index, np.full((target - g, s), -1, dtype=np.int64)], axis=0)


def _window_plan(coords: np.ndarray, resolution: int, window: int, shift: int,
                 pad_to: Optional[int], group_size: Optional[int], where: str) -> WindowPlan:
    wid = window_ids(coords, resolution, window, shift)
    mode = _mode(coords.shape[0], window)
    groups = _group_slots(wid, window, mode, group_size if mode == "grouping" else None)
    real = groups.shape[0]
    if mode == "grouping":
        groups = _pad_groups(groups, pad_to, where)
    valid = groups >= 0
    safe = np.where(valid, groups, 0)
    gid = np.where(valid, wid[safe], -1)
    same = (gid[:, :, None] == gid[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    attn_mask = np.where(same, np.float32(0.0), np.float32(MASK_VALUE)).astype(np.float32)
    rc = coords[safe]                                                       # (G, S, 2)
    d = rc[:, :, None, :] - rc[:, None, :, :] + (window - 1)               # (G, S, S, 2)
    rel = d[..., 0] * (2 * window - 1) + d[..., 1]
    rel_index = np.where(same, rel, 0).astype(np.int64)
    flat = groups.ravel()
    keep = np.flatnonzero(flat >= 0)
    ungroup = np.empty(coords.shape[0], dtype=np.int64)
    ungroup[flat[keep]] = keep
    return WindowPlan(window=window, shift=shift, mode=mode, window_id=wid, group_index=groups,
                      ungroup_index=ungroup, attn_mask=attn_mask, rel_index=rel_index,
                      num_real_groups=real)


def _merge_index(coords: np.ndarray, resolution: int, coords_next: np.ndarray, stage: int) -> np.ndarray:
    """(N_next, 4) positions in `coords` of each next-stage token's sources, TL, BL, TR, BR."""
    lookup = np.full(resolution * resolution, -1, dtype=np.int64)
    lookup[coords[:, 0] * resolution + coords[:, 1]] = np.arange(coords.shape[0], dtype=np.int64)
    offsets = np.asarray(MERGE_OFFSETS, dtype=np.int64)                       # (4, 2)
    src = coords_next[:, None, :] * 2 + offsets[None]                          # (N_next, 4, 2)
    index = lookup[src[..., 0] * resolution + src[..., 1]]
    if (index < 0).any() or 4 * coords_next.shape[0] != coords.shape[0]:
        bad = coords_next[(index < 0).any(axis=1)]
        raise SwinPlanError(
            f"patch merging after stage {stage}: visible 2x2 groups are incomplete (a mask cell is "
            f"split) at next-stage positions {bad[:4].tolist()} of {coords_next.shape[0]}")
    return index


def _per_stage(value: PadSpec, num_stages: int, name: str) -> List[Optional[int]]:
    if value is None or isinstance(value, (int, np.integer)):
        return [None if value is None else int(value)] * num_stages
    value = list(value)
    if len(value) != num_stages:
        raise SwinPlanError(f"{name} needs one entry per stage ({num_stages}), got {value}")
    return [None if v is None else int(v) for v in value]


def build_swin_plan(spec: SwinSpec, cell_mask: np.ndarray, pad_groups_to: PadSpec = None,
                    group_size: PadSpec = None) -> SwinPlan:
    """Build the integer plan of a masked Swin forward for one batch's cell mask.

    spec: the SwinSpec. cell_mask: (spec.mask_grid**2,) bool (or 0/1), True = masked, raster order
    of the mask grid; at least one cell must be visible.
    pad_groups_to: None, an int, or one entry (int or None) per stage: in grouping mode, pad every
        window configuration of that stage to exactly this many groups with all-pad groups
        (attn_mask -100 everywhere, outputs discarded) for static shapes; an error if more groups
        are needed. Masking-mode stages (always one group) are left as they are.
    group_size: None, an int, or one entry per stage: in grouping mode, use this many slots per
        group (knapsack capacity) instead of the largest window count; it must be at least the
        largest window count (w*w always is). With pad_groups_to this gives fully static shapes.
    """
    if not isinstance(spec, SwinSpec):
        raise SwinPlanError(f"build_swin_plan needs a SwinSpec, got {type(spec).__name__}")
    m = spec.mask_grid
    mask = np.asarray(cell_mask)
    if mask.shape != (m * m,):
        raise SwinPlanError(
            f"cell_mask for {spec.name} must have shape ({m * m},) (a {m}x{m} mask grid), got {mask.shape}")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise SwinPlanError(f"cell_mask for {spec.name} must be boolean or 0/1, got values {np.unique(mask)[:5]}")
        mask = mask.astype(bool)
    if mask.all():
        raise SwinPlanError(f"cell_mask for {spec.name} masks all {m * m} cells; at least one must be visible")
    mask2d = mask.reshape(m, m)
    pads = _per_stage(pad_groups_to, spec.num_stages, "pad_groups_to")
    sizes = _per_stage(group_size, spec.num_stages, "group_size")

    coords = [cell_major_coords(mask2d, spec.stage_resolution(i) // m) for i in range(spec.num_stages)]
    stages = []
    for i in range(spec.num_stages):
        res, w = spec.stage_resolution(i), spec.stage_window(i)
        windows = tuple(
            _window_plan(coords[i], res, w, s, pads[i], sizes[i], f"stage {i} (shift {s})")
            for s in _stage_shifts(spec, i))
        merge = (_merge_index(coords[i], res, coords[i + 1], i)
                 if i < spec.num_stages - 1 else None)
        stages.append(StagePlan(i, res, coords[i], windows, merge))

    res0 = spec.stage_resolution(0)
    patch_index = coords[0][:, 0] * res0 + coords[0][:, 1]

    branches = []
    for k, b in enumerate(spec.branches()):
        src = min(k + 1, spec.num_stages - 1)
        g = b.grid
        if g != spec.stage_resolution(src) or g % m:
            raise SwinPlanError(f"{spec.name}: branch {k} grid {g} does not match stage {src}")
        scatter = coords[src][:, 0] * g + coords[src][:, 1]
        f = g // m
        up = np.repeat(np.repeat(mask2d, f, axis=0), f, axis=1).reshape(-1).astype(np.float32)
        branches.append(BranchPlan(src, g, scatter, up))
    return SwinPlan(mask, patch_index, tuple(stages), tuple(branches))


def _windows_per_side(resolution: int, window: int, shift: int) -> int:
    """Windows per side of one window configuration (window_ids' offset grid)."""
    offset = (window - shift) % window
    return (resolution - 1 + offset) // window + 1


def static_plan_bounds(spec: SwinSpec, mask_ratio: float) -> Tuple[List[Optional[int]], List[Optional[int]]]:
    """(pad_groups_to, group_size) per stage that make every Swin plan of `spec` at `mask_ratio`
    the same shape, for compiled training (MindSpore ms.jit, torch.compile with static shapes and
    CUDA graphs). None for stages in masking mode.

    The visible token count of stage i is fixed (the ratio fixes the number of visible cells,
    each holding (res_i / mask_grid)^2 tokens), so only the grouping of grouping-mode stages
    (N_vis > 2 w^2) varies. group_size = w*w: no window holds more. pad_groups_to = the largest
    number of groups any mask can need, bounded three ways (per window configuration, the
    largest over the stage's configurations):
    - every group holds at least one non-empty window, and the windows a visible cell of c x c
      tokens can touch are at most ((c - 1) // w + 2)^2, so G <= visible_cells * that, and G is
      at most the windows of the configuration;
    - pack_windows takes, each round, a subset of the remaining windows with the
      largest total <= w*w. Two groups chosen in that order cannot sum to <= w*w (the later one's
      windows were available to the earlier round, whose union would have been a larger feasible
      subset), so any two groups hold >= w*w + 1 tokens; pairing them, G <= 2 * (N_vis // (w*w + 1)) + 1.
    """
    m = spec.mask_grid
    visible_cells = m * m - masking.num_masked_cells(m * m, mask_ratio)
    if visible_cells < 1:
        raise SwinPlanError(f"mask.ratio {mask_ratio} leaves no visible cell of the {m}x{m} mask grid of {spec.name}")
    pads: List[Optional[int]] = []
    sizes: List[Optional[int]] = []
    for i in range(spec.num_stages):
        res, w, shift = spec.stage_resolution(i), spec.stage_window(i), spec.stage_shift(i)
        cell = res // m
        n_vis = visible_cells * cell * cell
        if n_vis <= 2 * w * w:      # masking mode: one group of the whole (fixed-length) sequence
            pads.append(None)
            sizes.append(None)
            continue
        per_cell = ((cell - 1) // w + 2) ** 2
        pair_bound = 2 * (n_vis // (w * w + 1)) + 1
        bound = 0
        for s in ((0, shift) if shift > 0 else (0,)):
            windows = _windows_per_side(res, w, s) ** 2
            bound = max(bound, min(n_vis, windows, visible_cells * per_cell, pair_bound))
        pads.append(bound)
        sizes.append(w * w)
    return pads, sizes
