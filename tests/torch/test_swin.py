"""LocalMIM Swin (PyTorch) against independent dense references.

The references here never read the plan's index arrays: they run Swin on the full feature map
(cyclic shift, window partition, region masks, standard relative-position index), exclude masked
tokens from attention by a key mask, merge patches on the full grid, and build the decoders' raster
sequences from the cell mask. Visible positions are listed in cell-major order by a plain loop.
"""
import numpy as np
import pytest
import torch

from localmim.backends.torch.swin import (
    LocalMIMSwin, plan_tensors, window_inputs)
from localmim.core import masking
from localmim.core import targets as core_targets
from localmim.core.pos_embed import sincos_2d
from localmim.core.specs import SwinSpec, TargetSpec, get_spec
from localmim.core.state import StateError
from localmim.core.swin_plan import build_swin_plan

T224 = SwinSpec("t224", embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1), window_size=7,
                decoder_dims=(8, 8, 8, 8), decoder_heads=1)


def _tiny():
    return get_spec("swin_tiny_test")


def _cell_mask(spec, seed, ratio=0.75):
    return masking.swin_cell_mask(masking.mask_rng(seed, 0, 0, 0), spec.mask_grid, ratio)


def _model(spec, seed=0):
    torch.manual_seed(seed)
    return LocalMIMSwin(spec).eval()


# ---------------------------------------------------------------------------------------------
# independent dense references


def cell_major_positions(cell_mask, mask_grid, res):
    """(N, 2) true (row, col) of visible tokens at resolution `res`, cell-major, by plain loops."""
    c = res // mask_grid
    out = []
    for cell in range(mask_grid * mask_grid):
        if cell_mask[cell]:
            continue
        cr, cc = divmod(cell, mask_grid)
        for lr in range(c):
            for lc in range(c):
                out.append((cr * c + lr, cc * c + lc))
    return np.asarray(out, dtype=np.int64)


def visible_map(cell_mask, mask_grid, res):
    """(res, res) bool, True = visible."""
    m = np.asarray(cell_mask, dtype=bool).reshape(mask_grid, mask_grid)
    f = res // mask_grid
    return ~np.repeat(np.repeat(m, f, axis=0), f, axis=1)


def std_relative_index(w):
    """Swin's (w*w, w*w) relative-position index inside one window."""
    rc = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    d = rc[:, None, :] - rc[None, :, :] + (w - 1)
    return torch.from_numpy(d[..., 0] * (2 * w - 1) + d[..., 1])


def region_mask(res, w, s):
    """Swin's shifted-window mask (nW, w*w, w*w): -100 between different regions of the rolled map."""
    img = torch.zeros(res, res)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[hs, ws] = cnt
            cnt += 1
    mw = img.view(res // w, w, res // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    diff = mw[:, None, :] - mw[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def to_windows(x, w):
    """(B, H, W, C) -> (B, nW, w*w, C)."""
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, w * w, c)


def from_windows(x, res, w):
    b, _, _, c = x.shape
    return x.view(b, res // w, res // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, res, res, c)


def dense_window_attention(attn, h, vis, w, s):
    """Full-map (shifted) window attention with masked keys excluded. h: (B, H, W, C) normed."""
    b, res, _, c = h.shape
    heads, hd = attn.num_heads, c // attn.num_heads
    vis_t = torch.as_tensor(vis)
    if s:
        h = torch.roll(h, (-s, -s), (1, 2))
        vis_t = torch.roll(vis_t, (-s, -s), (0, 1))
    hw = to_windows(h, w)
    vw = to_windows(vis_t[None, :, :, None].float(), w)[0, :, :, 0]            # (nW, w*w)
    nw = hw.shape[1]
    qkv = attn.qkv(hw).view(b, nw, w * w, 3, heads, hd).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]                                           # (B, nW, h, n, hd)
    logits = (q * hd ** -0.5) @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[std_relative_index(w).reshape(-1)]
    logits = logits + bias.view(w * w, w * w, heads).permute(2, 0, 1)
    extra = region_mask(res, w, s) if s else torch.zeros(nw, w * w, w * w)
    extra = extra + torch.where(vw[:, None, :] > 0, 0.0, -1e9)
    out = torch.softmax(logits + extra[None, :, None], dim=-1) @ v
    out = attn.proj(out.permute(0, 1, 3, 2, 4).reshape(b, nw, w * w, c))
    out = from_windows(out, res, w)
    return torch.roll(out, (s, s), (1, 2)) if s else out


def dense_encoder(model, imgs, cell_mask):
    """Full-grid encoder: per branch (branch-normed (B, g, g, C) map, (g, g) visible map)."""
    spec = model.spec
    enc = model.encoder
    res = spec.stage_resolution(0)
    x = enc.patch_embed(imgs).view(imgs.shape[0], res, res, -1)
    vis = visible_map(cell_mask, spec.mask_grid, res)
    out = []
    for i, stage in enumerate(enc.layers):
        w, s = spec.stage_window(i), spec.stage_shift(i)
        for b, blk in enumerate(stage.blocks):
            x = x + dense_window_attention(blk.attn, blk.norm1(x), vis, w, s if b % 2 else 0)
            x = x + blk.mlp(blk.norm2(x))
        if stage.downsample is not None:
            x = dense_merge(stage.downsample, x)
            vis = vis[0::2, 0::2]
        out.append((enc.norm[i](x), vis))
    return out


def dense_merge(merge, x):
    """Swin PatchMerging on a full (B, H, W, C) map, sources TL, BL, TR, BR."""
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    return merge.reduction(merge.norm(cat))


def dense_decoders(model, dense_latents):
    preds = []
    for dec, (z, vis) in zip(model.decoder, dense_latents):
        b, g, _, _ = z.shape
        e = dec.embed(z).reshape(b, g * g, -1)
        keep = torch.as_tensor(vis.reshape(1, -1, 1))
        x = torch.where(keep, e, dec.mask_token.expand_as(e)) + dec.pos_embed
        for blk in dec.blocks:
            x = blk(x)
        preds.append(dec.pred(dec.norm(x)))
    return preds


def numpy_loss(spec, imgs, preds, cell_mask, hog_biases=None):
    """core.targets loss with targets from core (numpy) and nearest-upsampled binary masks."""
    imgs = imgs.numpy()
    cells = [br.cell for br in spec.branches()]
    if spec.target.kind == "pixel":
        tg = core_targets.pixel_targets(imgs, cells, spec.target.norm_pix)
    else:
        tg = core_targets.hog_targets(imgs, cells, spec.target.nbins, hog_biases)
    masks = []
    m = np.asarray(cell_mask, dtype=np.float32).reshape(spec.mask_grid, spec.mask_grid)
    for br in spec.branches():
        f = br.grid // spec.mask_grid
        up = np.repeat(np.repeat(m, f, axis=0), f, axis=1).reshape(1, -1)
        masks.append(np.repeat(up, imgs.shape[0], axis=0))
    return core_targets.localmim_loss([p.detach().numpy() for p in preds], tg, masks)


# ---------------------------------------------------------------------------------------------
# attention, merging and the whole forward against the dense references


def _visible_attention_reference(attn, x, pos, res, w, s):
    """Dense attention over all N visible tokens; allowed pairs share a Swin (shifted) window."""
    n, c = x.shape[1], x.shape[2]
    heads, hd = attn.num_heads, c // attn.num_heads
    rolled = (pos - s) % res
    win = rolled // w
    region = np.zeros_like(rolled) if not s else np.digitize(rolled, [res - w, res - s])
    key = np.stack([win[:, 0], win[:, 1], region[:, 0], region[:, 1]], 1)
    allowed = (key[:, None, :] == key[None, :, :]).all(-1)
    d = pos[:, None, :] - pos[None, :, :] + (w - 1)
    rel = torch.from_numpy(np.where(allowed, d[..., 0] * (2 * w - 1) + d[..., 1], 0))
    qkv = attn.qkv(x).view(x.shape[0], n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] * hd ** -0.5) @ qkv[1].transpose(-2, -1)
    bias = attn.relative_position_bias_table[rel.reshape(-1)].view(n, n, heads).permute(2, 0, 1)
    logits = logits + bias + torch.from_numpy(np.where(allowed, 0.0, -1e9)).float()
    out = torch.softmax(logits, dim=-1) @ qkv[2]
    return attn.proj(out.transpose(1, 2).reshape(x.shape[0], n, c))


@pytest.mark.parametrize("spec_name,seed", [("tiny", 0), ("tiny", 1), ("t224", 2), ("t224", 3)])
def test_grouped_attention_equals_dense_visible_attention(spec_name, seed, h):
    spec = _tiny() if spec_name == "tiny" else T224
    model = _model(spec, seed)
    cm = _cell_mask(spec, seed)
    plan = plan_tensors(build_swin_plan(spec, cm))
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    for i, stage in enumerate(model.encoder.layers):
        res, w = spec.stage_resolution(i), spec.stage_window(i)
        pos = cell_major_positions(cm, spec.mask_grid, res)
        x = torch.randn(2, pos.shape[0], spec.stage_dim(i), generator=gen)
        for j, shift in enumerate((0, spec.stage_shift(i)) if spec.stage_shift(i) else (0,)):
            attn = stage.blocks[j].attn
            got = attn(x, window_inputs(plan, i, j))
            want = _visible_attention_reference(attn, x, pos, res, w, shift)
            assert h.rel_err(got, want) < 1e-5, (i, j)
            checked += 1
    assert checked == 7  # 3 shifted stages + the last, unshifted one


def test_grouped_attention_equals_full_map_attention(h):
    """The same check through the standard cyclic-shift implementation on the full map."""
    spec = _tiny()
    model = _model(spec, 4)
    cm = _cell_mask(spec, 4)
    plan = plan_tensors(build_swin_plan(spec, cm))
    res, w, s = spec.stage_resolution(0), spec.stage_window(0), spec.stage_shift(0)
    xfull = torch.randn(2, res, res, spec.embed_dim, generator=torch.Generator().manual_seed(0))
    pos = cell_major_positions(cm, spec.mask_grid, res)
    vis = visible_map(cm, spec.mask_grid, res)
    for j, shift in enumerate((0, s)):
        attn = model.encoder.layers[0].blocks[j].attn
        got = attn(xfull[:, pos[:, 0], pos[:, 1]], window_inputs(plan, 0, j))
        want = dense_window_attention(attn, xfull, vis, w, shift)[:, pos[:, 0], pos[:, 1]]
        assert h.rel_err(got, want) < 1e-5


@pytest.mark.parametrize("spec_name,seed", [("tiny", 5), ("t224", 6)])
def test_patch_merging_equals_full_grid_merging(spec_name, seed, h):
    spec = _tiny() if spec_name == "tiny" else T224
    model = _model(spec, seed)
    cm = _cell_mask(spec, seed)
    plan = plan_tensors(build_swin_plan(spec, cm))
    gen = torch.Generator().manual_seed(seed)
    for i in range(spec.num_stages - 1):
        res = spec.stage_resolution(i)
        merge = model.encoder.layers[i].downsample
        xfull = torch.randn(2, res, res, spec.stage_dim(i), generator=gen)
        pos = cell_major_positions(cm, spec.mask_grid, res)
        pos_next = cell_major_positions(cm, spec.mask_grid, res // 2)
        got = merge(xfull[:, pos[:, 0], pos[:, 1]], plan[f"stage{i}.merge_index"])
        want = dense_merge(merge, xfull)[:, pos_next[:, 0], pos_next[:, 1]]
        assert h.rel_err(got, want) < 1e-6


def _perturb(model, seed):
    """Non-trivial LayerNorm affines and tables so that the reference checks see every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith(("norm1.weight", "relative_position_bias_table", ".bias")):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("spec_name,seed", [("tiny", 0), ("tiny", 7), ("tiny", 8), ("t224", 9), ("t224", 10)])
def test_whole_forward_equals_dense_reference(spec_name, seed, h):
    spec = _tiny() if spec_name == "tiny" else T224
    model = _model(spec, seed)
    _perturb(model, seed)
    cm = _cell_mask(spec, seed)
    plan = plan_tensors(build_swin_plan(spec, cm))
    imgs = torch.randn(2, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        latents = model.forward_encoder(imgs, plan)
        dense = dense_encoder(model, imgs, cm)
        for k, (z, (zf, _)) in enumerate(zip(latents, dense)):
            pos = cell_major_positions(cm, spec.mask_grid, zf.shape[1])
            assert h.rel_err(z, zf[:, pos[:, 0], pos[:, 1]]) < 1e-5, k
        preds = model.forward_decoders(latents, plan)
        dense_preds = dense_decoders(model, dense)
        for p, q in zip(preds, dense_preds):
            assert h.rel_err(p, q) < 1e-5
        loss, branch = model(imgs, plan)
    want_total, want_branch = numpy_loss(spec, imgs, dense_preds, cm)
    assert loss.dtype == torch.float32 and branch.shape == (4,)
    assert abs(loss.item() - want_total) <= 1e-5 * abs(want_total)
    np.testing.assert_allclose(branch.numpy(), want_branch, rtol=1e-5)


def test_static_shape_plan_gives_the_same_loss(h):
    """Padding groups (pad_groups_to) and fixed group sizes only add fully masked slots."""
    spec = _tiny()
    model = _model(spec, 11)
    cm = _cell_mask(spec, 11)
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    dynamic = build_swin_plan(spec, cm)
    sizes = [spec.stage_window(i) ** 2 for i in range(spec.num_stages)]
    need = [max(wp.num_groups for wp in st.windows) for st in build_swin_plan(spec, cm, group_size=sizes).stages]
    static = build_swin_plan(spec, cm, pad_groups_to=[n + 3 for n in need], group_size=sizes)
    assert static.stages[0].windows[1].num_groups > static.stages[0].windows[1].num_real_groups
    with torch.no_grad():
        a, ab = model(imgs, plan_tensors(dynamic))
        b, bb = model(imgs, plan_tensors(static))
    assert h.rel_err(bb, ab) < 1e-6


# ---------------------------------------------------------------------------------------------
# shapes, loss, gradients, state, init, autocast


def test_shapes_at_224_pixel_and_hog():
    spec = T224
    for seed in (0, 1, 2):
        model = _model(spec, seed)
        cm = _cell_mask(spec, seed)
        assert int((~cm).sum()) == 12
        plan = plan_tensors(build_swin_plan(spec, cm))
        seen = []
        hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
                 for layer in model.encoder.layers]
        imgs = torch.randn(3, 3, 224, 224)
        with torch.no_grad():
            latents = model.forward_encoder(imgs, plan)
            preds = model.forward_decoders(latents, plan)
        for hk in hooks:
            hk.remove()
        assert seen == [(3, 768, 8), (3, 192, 16), (3, 48, 32), (3, 12, 64)]
        assert [tuple(z.shape) for z in latents] == [(3, 192, 16), (3, 48, 32), (3, 12, 64), (3, 12, 64)]
        assert [tuple(p.shape) for p in preds] == [(3, 784, 192), (3, 196, 768), (3, 49, 3072), (3, 49, 3072)]
    hog = spec.with_(target=TargetSpec(kind="hog", nbins=18, hog_bias=True))
    model = _model(hog)
    cm = _cell_mask(hog, 0)
    imgs = torch.randn(2, 3, 224, 224)
    plan = plan_tensors(build_swin_plan(hog, cm))
    with torch.no_grad():
        preds = model.forward_decoders(model.forward_encoder(imgs, plan), plan)
        tg = model.forward_targets(imgs)
        loss, _ = model(imgs, plan)
    shapes = [(2, 784, 54), (2, 196, 54), (2, 49, 54), (2, 49, 54)]
    assert [tuple(p.shape) for p in preds] == shapes and [tuple(t.shape) for t in tg] == shapes
    assert torch.isfinite(loss)


def test_hog_targets_and_loss_match_core():
    spec = _tiny().with_(target=TargetSpec(kind="hog", nbins=18, hog_bias=True))
    model = _model(spec, 12)
    cm = _cell_mask(spec, 12)
    plan = plan_tensors(build_swin_plan(spec, cm))
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    biases = np.stack([h.conv.bias.detach().numpy() for h in model.hog_enc])
    assert np.abs(biases).max() <= 1 / 3 and np.abs(biases).min() > 0
    with torch.no_grad():
        preds = model.forward_decoders(model.forward_encoder(imgs, plan), plan)
        tg = model.forward_targets(imgs)
        loss, branch = model(imgs, plan)
    want = core_targets.hog_targets(imgs.numpy(), [4, 8, 16, 16], 18, biases)
    for t, w in zip(tg, want):
        assert t.dtype == torch.float32
        # bins can flip where atan2 lands on an edge: compare the share of differing cells
        close = np.isclose(t.numpy(), w, atol=1e-4).all(-1)
        assert close.mean() > 0.99
    total, per = numpy_loss(spec, imgs, preds, cm, biases)
    np.testing.assert_allclose(branch.numpy(), per, rtol=1e-3)
    masks = model.branch_masks(plan, 2)
    total2, per2 = core_targets.localmim_loss([p.numpy() for p in preds], [t.numpy() for t in tg],
                                              [m.numpy() for m in masks])
    assert abs(loss.item() - total2) <= 1e-5 * total2


def test_gradients_reach_every_trainable_parameter():
    spec = _tiny()
    model = _model(spec, 13).train()
    cm = _cell_mask(spec, 13)
    loss, _ = model(torch.randn(2, 3, 64, 64), plan_tensors(build_swin_plan(spec, cm)))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 100
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == [f"decoder.{k}.pos_embed" for k in range(4)]


def test_canonical_names_and_shapes():
    spec = _tiny().with_(target=TargetSpec(kind="hog", nbins=9, hog_bias=True))
    state = _model(spec).export_state()
    c = spec.embed_dim
    assert state["encoder.patch_embed.proj.weight"].shape == (c, 3, 2, 2)
    assert state["encoder.patch_embed.norm.weight"].shape == (c,)
    for s in range(4):
        w, h, d = spec.stage_window(s), spec.num_heads[s], spec.stage_dim(s)
        for b in range(2):
            pre = f"encoder.layers.{s}.blocks.{b}."
            assert state[pre + "attn.relative_position_bias_table"].shape == ((2 * w - 1) ** 2, h)
            assert state[pre + "attn.qkv.weight"].shape == (3 * d, d)
            for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                assert pre + part + ".weight" in state and pre + part + ".bias" in state
        if s < 3:
            assert state[f"encoder.layers.{s}.downsample.reduction.weight"].shape == (2 * d, 4 * d)
            assert f"encoder.layers.{s}.downsample.reduction.bias" not in state
            assert state[f"encoder.layers.{s}.downsample.norm.weight"].shape == (4 * d,)
        else:
            assert not any(k.startswith("encoder.layers.3.downsample") for k in state)
    for k, br in enumerate(spec.branches()):
        assert state[f"encoder.norm.{k}.weight"].shape == (br.in_dim,)
        d = br.decoder_dim
        assert state[f"decoder.{k}.embed.weight"].shape == (d, br.in_dim)
        assert state[f"decoder.{k}.mask_token"].shape == (1, 1, d)
        assert state[f"decoder.{k}.pos_embed"].shape == (1, br.grid ** 2, d)
        assert state[f"decoder.{k}.blocks.0.attn.qkv.bias"].shape == (3 * d,)
        assert state[f"decoder.{k}.pred.weight"].shape == (27, d)
        assert state[f"hog_enc.{k}.conv.weight"].shape == (2, 1, 3, 3)
        assert state[f"hog_enc.{k}.conv.bias"].shape == (2,)
    assert not any("relative_position_index" in k for k in state)
    assert all(v.dtype == np.float32 for v in state.values())
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"encoder", "decoder", "hog_enc"}


def test_export_import_round_trip_and_errors():
    spec = _tiny()
    a, b = _model(spec, 14), _model(spec, 15)
    state = a.export_state()
    b.import_state(state)
    got = b.export_state()
    assert got.keys() == state.keys()
    assert all(np.array_equal(got[k], state[k]) for k in state)
    cm = _cell_mask(spec, 14)
    plan = plan_tensors(build_swin_plan(spec, cm))
    imgs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(imgs, plan)[1], b(imgs, plan)[1])

    before = b.export_state()
    bad = dict(state)
    del bad["encoder.layers.1.downsample.norm.bias"]
    bad["encoder.layers.0.blocks.0.attn.relative_position_index"] = np.zeros((49, 49))
    bad["decoder.0.pred.weight"] = np.zeros((5, 8), np.float32)
    with pytest.raises(StateError) as err:
        b.import_state(bad)
    msg = str(err.value)
    assert "encoder.layers.1.downsample.norm.bias" in msg and "relative_position_index" in msg
    assert "decoder.0.pred.weight" in msg
    assert all(np.array_equal(before[k], v) for k, v in b.export_state().items())

    hog = spec.with_(target=TargetSpec(kind="hog", nbins=9))
    m = _model(hog)
    st = m.export_state()
    st["hog_enc.2.conv.weight"] = st["hog_enc.2.conv.weight"] * 2
    with pytest.raises(StateError, match="hog_enc.2.conv.weight"):
        m.import_state(st)


def test_initialisation_statistics():
    spec = T224.with_(embed_dim=32, num_heads=(1, 2, 4, 8), decoder_dims=(32, 64, 64, 64), decoder_heads=4)
    model = _model(spec, 16)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach()
            bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5
            assert w.abs().max() <= bound, name
            if w.numel() >= 4096:
                assert abs(w.std().item() / (bound / 3 ** 0.5) - 1) < 0.1, name
            if mod.bias is not None:
                assert torch.count_nonzero(mod.bias) == 0, name
        elif isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    proj = model.encoder.patch_embed.proj
    w = proj.weight.detach().reshape(proj.weight.shape[0], -1)
    xavier = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= xavier and w.abs().max() > 0.8 * xavier
    default = 1 / (3 * 4 * 4) ** 0.5
    assert proj.bias.abs().max() <= default and proj.bias.abs().max() > 0.5 * default
    tables = torch.cat([m.attn.relative_position_bias_table.detach().reshape(-1)
                        for st in model.encoder.layers for m in st.blocks])
    assert abs(tables.std().item() - 0.02) < 0.002 and tables.abs().max() < 0.1
    tokens = torch.cat([d.mask_token.detach().reshape(-1) for d in model.decoder])
    assert abs(tokens.std().item() - 0.02) < 0.006
    for dec, br in zip(model.decoder, spec.branches()):
        assert not dec.pos_embed.requires_grad
        np.testing.assert_array_equal(dec.pos_embed.detach().numpy()[0], sincos_2d(br.decoder_dim, br.grid))


def test_bf16_autocast_forward_gives_float32_loss():
    spec = _tiny()
    model = _model(spec, 17)
    plan = plan_tensors(build_swin_plan(spec, _cell_mask(spec, 17)))
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, _ = model(imgs, plan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, branch = model(imgs, plan)
        tg = model.forward_targets(imgs)
    assert loss.dtype == torch.float32 and branch.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in tg)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    loss.backward()
    assert model.encoder.layers[0].blocks[1].attn.relative_position_bias_table.grad is not None


def test_bad_inputs_get_clear_errors():
    with pytest.raises(TypeError, match="SwinSpec"):
        LocalMIMSwin(get_spec("vit_tiny_test"))
    spec = _tiny()
    model = _model(spec)
    plan = plan_tensors(build_swin_plan(spec, _cell_mask(spec, 0)))
    with pytest.raises(ValueError, match="64, 64"):
        model(torch.randn(1, 3, 32, 32), plan)
    del plan["stage1.merge_index"]
    with pytest.raises(KeyError, match="stage1.merge_index"):
        model(torch.randn(1, 3, 64, 64), plan)
