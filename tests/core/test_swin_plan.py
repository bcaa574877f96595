"""Swin masking/grouping plan against independent references (numpy only).

The window relation is re-derived the standard Swin way (cyclic shift of the full grid plus the
region labels of the shifted attention mask), coordinates from a (row, col) label image, and
grouped attention is compared with dense masked attention over all visible tokens.
"""
import itertools

import numpy as np
import pytest

from localmim.core.specs import get_spec
from localmim.core.swin_plan import (
    MASK_VALUE, SwinPlan, SwinPlanError, build_swin_plan, pack_windows, static_plan_bounds)

SPECS = ("swin_tiny_test", "swin_demo", "swin_base_patch4_win7", "swin_base_patch4_win14")


def random_cell_mask(spec, seed, ratio=0.75):
    """The reference rule (docs/method.md#swin-masking): randperm(L) <= floor(r L), i.e. floor(r L) + 1 masked cells."""
    num = spec.mask_grid ** 2
    return np.random.default_rng(seed).permutation(num) <= int(np.floor(ratio * num))


def plans(names=SPECS, seeds=(0, 1, 2)):
    for name in names:
        spec = get_spec(name)
        for seed in seeds:
            yield spec, build_swin_plan(spec, random_cell_mask(spec, seed))


def swin_region_relation(coords, resolution, window, shift):
    """Same-window relation of Swin's cyclic shift: roll by -shift, windows of `window`, and for the
    shifted case the region labels of Swin's attention mask (slices (0, H-w), (H-w, H-s), (H-s, H)).

    coords: (N, 2) true (row, col). Returns (N, N) bool.
    """
    rolled = (coords - shift) % resolution
    win = rolled // window
    if shift > 0:
        edges = np.array([resolution - window, resolution - shift])
        region = np.searchsorted(edges, rolled, side="right")
    else:
        region = np.zeros_like(rolled)
    key = np.concatenate([win, region], axis=1)
    return (key[:, None, :] == key[None, :, :]).all(axis=-1)


def plan_relation(wp, n):
    """(N, N) bool: pairs the plan lets attend (attn_mask == 0), over the visible sequence."""
    rel = np.zeros((n, n), dtype=bool)
    for g in range(wp.num_groups):
        idx = wp.group_index[g]
        ok = np.argwhere(wp.attn_mask[g] == 0)
        rel[idx[ok[:, 0]], idx[ok[:, 1]]] = True
    return rel


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def grouped_attention(q, k, v, table, wp):
    """How a backend runs it: gather with group_index, bias * (mask == 0) + mask, ungroup."""
    n, d = q.shape
    pad = lambda x: np.concatenate([x, np.zeros((1, d))], axis=0)
    gi = np.where(wp.group_index >= 0, wp.group_index, n)                  # -1 -> zero row
    qg, kg, vg = pad(q)[gi], pad(k)[gi], pad(v)[gi]                        # (G, S, d)
    bias = table[wp.rel_index] * (wp.attn_mask == 0)
    logits = qg @ kg.transpose(0, 2, 1) / np.sqrt(d) + bias + wp.attn_mask
    out = softmax(logits) @ vg                                             # (G, S, d)
    return out.reshape(-1, d)[wp.ungroup_index]


def dense_attention(q, k, v, table, coords, relation, window):
    d = q.shape[1]
    dy = coords[:, None, 0] - coords[None, :, 0] + window - 1
    dx = coords[:, None, 1] - coords[None, :, 1] + window - 1
    bias = table[np.clip(dy * (2 * window - 1) + dx, 0, table.shape[0] - 1)]
    logits = np.where(relation, q @ k.T / np.sqrt(d) + bias, -np.inf)
    return softmax(logits) @ v


def test_group_index_is_a_permutation_and_ungroup_inverts_it():
    for spec, plan in plans():
        for st in plan.stages:
            for wp in st.windows:
                flat = wp.group_index.ravel()
                real = flat[flat >= 0]
                assert np.array_equal(np.sort(real), np.arange(st.num_visible))
                assert np.array_equal(flat[wp.ungroup_index], np.arange(st.num_visible))
                assert wp.group_index.dtype == np.int64 and wp.ungroup_index.dtype == np.int64


def test_no_attention_across_windows_matches_cyclic_shift_reference():
    for spec, plan in plans():
        for st in plan.stages:
            for wp in st.windows:
                ref = swin_region_relation(st.coords, st.resolution, wp.window, wp.shift)
                assert np.array_equal(plan_relation(wp, st.num_visible), ref), (spec.name, st.index, wp.shift)
                # a window never straddles two groups, and only real same-window pairs get 0
                assert wp.attn_mask.dtype == np.float32
                assert set(np.unique(wp.attn_mask)) <= {0.0, MASK_VALUE}
                pads = wp.group_index < 0
                assert (wp.attn_mask[pads] == MASK_VALUE).all()
                assert (wp.attn_mask.transpose(0, 2, 1)[pads] == MASK_VALUE).all()


def test_grouped_attention_equals_dense_masked_attention():
    rng = np.random.default_rng(7)
    for spec, plan in plans(seeds=(3, 4)):
        for st in plan.stages:
            for wp in st.windows:
                n, d, w = st.num_visible, 8, wp.window
                q, k, v = rng.normal(size=(3, n, d))
                table = rng.normal(size=(2 * w - 1) ** 2)
                ref = dense_attention(q, k, v, table, st.coords,
                                      swin_region_relation(st.coords, st.resolution, w, wp.shift), w)
                got = grouped_attention(q, k, v, table, wp)
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_rel_index_range_and_formula():
    for spec, plan in plans():
        for st in plan.stages:
            for wp in st.windows:
                w = wp.window
                assert wp.rel_index.dtype == np.int64
                assert wp.rel_index.min() >= 0 and wp.rel_index.max() < (2 * w - 1) ** 2
                for g in range(wp.num_groups):
                    qs, ks = np.nonzero(wp.attn_mask[g] == 0)
                    ci = st.coords[wp.group_index[g, qs]]
                    cj = st.coords[wp.group_index[g, ks]]
                    want = (ci[:, 0] - cj[:, 0] + w - 1) * (2 * w - 1) + (ci[:, 1] - cj[:, 1] + w - 1)
                    assert np.array_equal(wp.rel_index[g, qs, ks], want)
                    assert (wp.rel_index[g][wp.attn_mask[g] != 0] == 0).all()


def test_coordinates_follow_label_image_through_patch_index_and_merges():
    for spec, plan in plans():
        res0 = spec.stage_resolution(0)
        rows, cols = np.meshgrid(np.arange(res0), np.arange(res0), indexing="ij")
        labels = np.stack([rows.ravel(), cols.ravel()], axis=1)                 # raster tokens
        seq = labels[plan.patch_index]
        assert np.array_equal(seq, plan.coords[0])
        for i, merge in enumerate(plan.merge_index):
            src = seq[merge]                                                    # (N', 4, 2)
            seq = src[:, 0] // 2                                                # TL // 2
            assert np.array_equal(seq, plan.coords[i + 1])
            offs = src - 2 * seq[:, None, :]
            assert np.array_equal(offs, np.broadcast_to([[0, 0], [1, 0], [0, 1], [1, 1]], offs.shape))
            assert np.array_equal(np.sort(merge.ravel()), np.arange(plan.stages[i].num_visible))


def test_coordinates_are_cell_major_and_match_the_mask():
    for spec, plan in plans():
        m = spec.mask_grid
        for st in plan.stages:
            c = st.resolution // m
            cell = st.coords // c
            cell_id = cell[:, 0] * m + cell[:, 1]
            assert not plan.cell_mask[cell_id].any()
            assert st.num_visible == (~plan.cell_mask).sum() * c * c
            local = st.coords % c
            key = (cell_id * c + local[:, 0]) * c + local[:, 1]
            assert (np.diff(key) > 0).all()                                     # cell-major order


def test_merge_order_hand_case():
    spec = get_spec("swin_tiny_test")                 # 4x4 mask grid; stage 2 has 2x2-token cells
    mask = np.ones(16, dtype=bool)
    mask[5] = False                                   # one visible cell at (1, 1)
    plan = build_swin_plan(spec, mask)
    # stage 2 (res 8): cell (1, 1) holds (2,2) (2,3) (3,2) (3,3) in that order
    assert plan.coords[2].tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    assert plan.merge_index[2].tolist() == [[0, 2, 1, 3]]                    # TL, BL, TR, BR
    assert plan.coords[3].tolist() == [[1, 1]]
    # stage 0 (res 32, 8x8-token cells): first merged token takes (8,8) (9,8) (8,9) (9,9)
    assert plan.coords[0][:2].tolist() == [[8, 8], [8, 9]]
    assert plan.merge_index[0][0].tolist() == [0, 8, 1, 9]
    assert plan.patch_index[:3].tolist() == [8 * 32 + 8, 8 * 32 + 9, 8 * 32 + 10]


def test_mode_selection_win7_and_win14():
    for name, modes in (("swin_base_patch4_win7", ["grouping", "grouping", "masking", "masking"]),
                        ("swin_base_patch4_win14", ["grouping", "masking", "masking", "masking"])):
        spec = get_spec(name)
        plan = build_swin_plan(spec, random_cell_mask(spec, 0))
        assert int((~plan.cell_mask).sum()) == 12
        assert [st.num_visible for st in plan.stages] == [768, 192, 48, 12]
        assert [st.windows[0].mode for st in plan.stages] == modes
        assert all(wp.mode == st.windows[0].mode for st in plan.stages for wp in st.windows)
        assert [len(st.windows) for st in plan.stages] == ([2, 2, 2, 1] if name.endswith("7") else [2, 2, 1, 1])
        for st in plan.stages:
            if st.windows[0].mode == "masking":
                assert st.windows[0].group_index.tolist() == [list(range(st.num_visible))]


def test_group_counts_and_sizes_in_reference_ranges():
    spec = get_spec("swin_base_patch4_win7")
    hits, stage1 = 0, []
    for seed in range(20):
        wp = build_swin_plan(spec, random_cell_mask(spec, 100 + seed)).stages[0].windows[0]
        hits += 47 <= wp.group_size <= 49 and 16 <= wp.num_groups <= 18
        stage1.append((wp.group_size, wp.num_groups))
        assert wp.group_size <= 49 and wp.num_groups * wp.group_size >= 768
    assert hits >= 14, stage1


def test_knapsack_fills_each_group_optimally():
    assert pack_windows([5, 4, 3, 2], 7) == [[1, 2], [0, 3]]
    assert pack_windows([7, 1, 1], 7) == [[0], [1, 2]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.integers(1, 10, size=rng.integers(1, 9)).tolist()
        cap = max(counts) + int(rng.integers(0, 4))
        groups = pack_windows(counts, cap)
        assert sorted(p for g in groups for p in g) == list(range(len(counts)))
        left = list(range(len(counts)))
        for g in groups:                       # each round: brute-force best subset of what is left
            sums = {sum(counts[left[b]] for b in range(len(left)) if mask >> b & 1)
                    for mask in range(1 << len(left))}
            assert sum(counts[p] for p in g) == max(s for s in sums if s <= cap)
            left = [p for p in left if p not in g]


def test_decoder_scatter_and_branch_mask_agree():
    for spec, plan in plans():
        for k, (br, b) in enumerate(zip(plan.branches, spec.branches())):
            assert br.grid == b.grid and br.source_stage == min(k + 1, spec.num_stages - 1)
            assert br.mask.dtype == np.float32 and br.mask.shape == (b.grid ** 2,)
            filled = np.zeros(b.grid ** 2, dtype=np.float32)
            filled[br.scatter] = 1.0
            np.testing.assert_array_equal(filled, 1.0 - br.mask)
            # nearest upsampling of the cell mask, checked cell by cell
            f = b.grid // spec.mask_grid
            m2 = br.mask.reshape(b.grid, b.grid)
            for cell in range(spec.mask_grid ** 2):
                r, c = divmod(cell, spec.mask_grid)
                assert (m2[r * f:(r + 1) * f, c * f:(c + 1) * f] == plan.cell_mask[cell]).all()


def test_padding_to_static_group_counts():
    spec = get_spec("swin_base_patch4_win7")
    mask = random_cell_mask(spec, 5)
    plain = build_swin_plan(spec, mask)
    padded = build_swin_plan(spec, mask, pad_groups_to=[24, 12, None, None], group_size=[49, 49, None, None])
    rng = np.random.default_rng(1)
    for i in range(2):
        for wp, base in zip(padded.stages[i].windows, plain.stages[i].windows):
            assert wp.group_index.shape == (24 if i == 0 else 12, 49)
            assert (wp.group_index[wp.num_real_groups:] == -1).all()
            assert (wp.attn_mask[wp.num_real_groups:] == MASK_VALUE).all()
            st = padded.stages[i]
            q, k, v = rng.normal(size=(3, st.num_visible, 4))
            table = rng.normal(size=13 * 13)
            np.testing.assert_allclose(grouped_attention(q, k, v, table, wp),
                                       grouped_attention(q, k, v, table, base), rtol=1e-9, atol=1e-9)
    for i in (2, 3):
        assert padded.stages[i].windows[0].num_groups == 1
    with pytest.raises(SwinPlanError, match="pad_groups_to=3"):
        build_swin_plan(spec, mask, pad_groups_to=3)
    with pytest.raises(SwinPlanError, match="group_size 10"):
        build_swin_plan(spec, mask, group_size=10)


def test_array_dict_round_trip():
    spec = get_spec("swin_tiny_test")
    plan = build_swin_plan(spec, random_cell_mask(spec, 9))
    arrays = plan.to_arrays()
    assert "stage0.win1.group_index" in arrays and "stage3.win1.group_index" not in arrays
    assert "stage2.merge_index" in arrays and "stage3.merge_index" not in arrays
    again = SwinPlan.from_arrays(spec, arrays).to_arrays()
    assert sorted(again) == sorted(arrays)
    for key in arrays:
        assert np.array_equal(again[key], arrays[key]) and again[key].dtype == arrays[key].dtype, key
    del arrays["branch1.scatter"]
    with pytest.raises(SwinPlanError, match="branch1.scatter"):
        SwinPlan.from_arrays(spec, arrays)


def test_bad_masks_are_rejected_with_a_clear_sentence():
    spec = get_spec("swin_tiny_test")
    with pytest.raises(SwinPlanError, match=r"shape \(16,\)"):
        build_swin_plan(spec, np.zeros(49, dtype=bool))
    with pytest.raises(SwinPlanError, match="masks all 16 cells"):
        build_swin_plan(spec, np.ones(16, dtype=bool))
    with pytest.raises(SwinPlanError, match="boolean or 0/1"):
        build_swin_plan(spec, np.full(16, 2))
    ints = build_swin_plan(spec, random_cell_mask(spec, 0).astype(np.int64))
    assert np.array_equal(ints.patch_index, build_swin_plan(spec, random_cell_mask(spec, 0)).patch_index)


def test_fully_visible_mask_tiles_the_whole_grid():
    spec = get_spec("swin_tiny_test")
    plan = build_swin_plan(spec, np.zeros(16, dtype=bool))
    assert np.array_equal(np.sort(plan.patch_index), np.arange(32 * 32))
    for br in plan.branches:
        assert not br.mask.any() and np.array_equal(np.sort(br.scatter), np.arange(br.grid ** 2))


def test_mode_boundary_is_strictly_more_than_two_windows():
    spec = get_spec("swin_tiny_test")               # stage 1: res 16, window 4, 16 tokens per cell
    for visible, mode in ((2, "masking"), (3, "grouping")):
        mask = np.ones(16, dtype=bool)
        mask[:visible] = False
        st = build_swin_plan(spec, mask).stages[1]
        assert st.num_visible == 16 * visible
        assert [wp.mode for wp in st.windows] == [mode, mode]


def test_blocks_alternate_plain_and_shifted_windows():
    spec = get_spec("swin_base_patch4_win7")
    plan = build_swin_plan(spec, random_cell_mask(spec, 0))
    assert [plan.stages[0].window_for_block(b).shift for b in range(4)] == [0, 3, 0, 3]
    assert [plan.stages[3].window_for_block(b).shift for b in range(2)] == [0, 0]
    assert [st.windows[0].window for st in plan.stages] == [7, 7, 7, 7]


def test_window_not_dividing_the_stage_still_gives_windows_of_at_most_w():
    spec = get_spec("swin_base_patch4_win7", img_size=192)     # resolutions 48, 24, 12, 6
    for seed in range(3):
        plan = build_swin_plan(spec, random_cell_mask(spec, seed))
        for st in plan.stages:
            for wp in st.windows:
                flat = wp.group_index.ravel()
                assert np.array_equal(np.sort(flat[flat >= 0]), np.arange(st.num_visible))
                for wid in np.unique(wp.window_id):
                    c = st.coords[wp.window_id == wid]
                    assert (np.ptp(c, axis=0) < wp.window).all()


def test_merge_rejects_a_split_2x2_group():
    from localmim.core.swin_plan import _merge_index
    coords = np.array([[0, 0], [0, 1], [1, 0], [2, 2]], dtype=np.int64)   # (1, 1) missing
    with pytest.raises(SwinPlanError, match=r"stage 0: visible 2x2 groups are incomplete .*\[\[0, 0\]\]"):
        _merge_index(coords, 4, np.array([[0, 0]], dtype=np.int64), 0)


def test_static_plan_bounds_hold_for_every_mask():
    """Hand-derived bounds of swin_tiny_test at ratio 0.75 (3 visible cells of 16), checked
    against all C(16, 3) = 560 cell masks: every plan builds and has the same shapes."""
    spec = get_spec("swin_tiny_test")
    pads, sizes = static_plan_bounds(spec, 0.75)
    # stage 0: 32x32 tokens, window 4, 8x8 tokens per cell, N_vis = 192 > 2*16: grouping;
    #   min(192, windows 81, 3 cells * 9 windows = 27, pairs 2 * (192 // 17) + 1 = 23) = 23
    # stage 1: 16x16, cells of 4x4, N_vis = 48: min(48, 81, 3 * 4 = 12, 2 * (48 // 17) + 1 = 5) = 5
    # stages 2, 3: N_vis 12 and 3 <= 32: masking mode, one group, nothing to pad
    assert pads == [23, 5, None, None] and sizes == [16, 16, None, None]
    shapes, most = None, [0, 0]
    for visible in itertools.combinations(range(16), 3):
        cell = np.ones(16, bool)
        cell[list(visible)] = False
        plan = build_swin_plan(spec, cell, pad_groups_to=pads, group_size=sizes)
        arrays = plan.to_arrays()
        these = {k: v.shape for k, v in arrays.items()}
        assert shapes is None or these == shapes
        shapes = these
        for i in (0, 1):
            most[i] = max(most[i], max(w.num_real_groups for w in plan.stages[i].windows))
    # the bounds are safe, not tight: over all 560 masks the most groups needed are 12 and 3
    assert most[0] <= 23 and most[1] <= 5
    with pytest.raises(ValueError, match="mask.ratio 0.95 leaves no visible cell"):
        static_plan_bounds(spec, 0.95)


@pytest.mark.parametrize("name", ["swin_base_patch4_win7", "swin_base_patch4_win14", "swin_demo"])
def test_static_plan_bounds_hold_for_random_masks_of_the_recipes(name):
    """Every plan of 40 random masks builds within the bounds, with one set of shapes."""
    spec = get_spec(name)
    pads, sizes = static_plan_bounds(spec, 0.75)
    if name == "swin_base_patch4_win7":
        # 12 visible cells of 49 (37 masked). stage 0: 56x56 tokens, 8x8 per cell, N_vis = 768, w 7:
        #   min(768, windows 64 | 81 shifted, 12 * 9 = 108, pairs 2 * (768 // 50) + 1 = 31) = 31;
        # stage 1: 28x28, 4x4 per cell, N_vis = 192: min(192, 16 | 25, 12 * 4, 2 * (192 // 50) + 1 = 7) = 7;
        # stages 2, 3: N_vis 48 and 12 <= 98: masking mode
        assert pads == [31, 7, None, None] and sizes == [49, 49, None, None]
    shapes = set()
    for seed in range(40):
        plan = build_swin_plan(spec, random_cell_mask(spec, seed), pad_groups_to=pads, group_size=sizes)
        shapes.add(tuple(sorted((k, v.shape) for k, v in plan.to_arrays().items())))
    assert len(shapes) == 1
