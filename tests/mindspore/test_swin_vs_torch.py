"""Parity of the MindSpore LocalMIM Swin with its PyTorch twin (docs/method.md#parity-contract): the same
canonical weights, images and plan give the same latents, predictions, targets and loss (1e-5
relative) and the same gradients by canonical name (1e-4 relative), float32 on CPU."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

torch = pytest.importorskip("torch")
torch_swin = pytest.importorskip("localmim.backends.torch.swin")

from localmim.backends.mindspore.swin import LocalMIMSwin, plan_tensors  # noqa: E402
from localmim.core import masking  # noqa: E402
from localmim.core.specs import TargetSpec, get_spec  # noqa: E402
from localmim.core.swin_plan import build_swin_plan  # noqa: E402

RTOL = 1e-5
GRAD_RTOL = 1e-4


def twin_models(spec, seed):
    """A MindSpore model with random weights (every trainable entry perturbed) and a torch model
    loaded from its canonical state."""
    ms.set_seed(seed)
    ms_net = LocalMIMSwin(spec)
    rng = np.random.default_rng(seed)
    state = ms_net.export_state()
    for k, v in state.items():
        if not (k.endswith("pos_embed") or k.startswith("hog_enc.")):
            state[k] = (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
    ms_net.import_state(state)
    th_net = torch_swin.LocalMIMSwin(spec)
    th_net.import_state(state)
    th_state = th_net.export_state()
    assert th_state.keys() == state.keys()
    assert all(np.array_equal(th_state[k], state[k]) for k in state)
    return ms_net, th_net


def test_forward_and_gradients_match_torch(h):
    spec = get_spec("swin_tiny_test")
    ms_net, th_net = twin_models(spec, 0)
    cmask = masking.swin_cell_mask(masking.mask_rng(3, 0, 0, 0), spec.mask_grid, 0.75)
    plan = build_swin_plan(spec, cmask)
    imgs = h.make_images(2, spec.img_size, seed=1)
    ms_plan, th_plan = plan_tensors(plan), torch_swin.plan_tensors(plan)

    ms_lat = ms_net.forward_encoder(Tensor(imgs), ms_plan)
    ms_pred = ms_net.forward_decoders(ms_lat, ms_plan)
    ms_tgt = ms_net.forward_targets(Tensor(imgs))
    th_imgs = torch.from_numpy(imgs)
    th_lat = th_net.forward_encoder(th_imgs, th_plan)
    th_pred = th_net.forward_decoders(th_lat, th_plan)
    th_tgt = th_net.forward_targets(th_imgs)
    for name, ours, theirs in (("latent", ms_lat, th_lat), ("pred", ms_pred, th_pred), ("target", ms_tgt, th_tgt)):
        assert len(ours) == len(theirs) == 4
        for k, (a, b) in enumerate(zip(ours, theirs)):
            assert h.rel_err(a.asnumpy(), b.detach().numpy()) < RTOL, (name, k)

    params = ms_net.trainable_params()

    def loss_fn(x, p):
        return ms_net(x, p)[0]

    ms_loss, ms_grads = ms.value_and_grad(loss_fn, grad_position=None, weights=params)(Tensor(imgs), ms_plan)
    th_net.zero_grad()
    th_loss, th_per = th_net(th_imgs, th_plan)
    th_loss.backward()
    assert h.rel_err(ms_loss.asnumpy(), th_loss.detach().numpy()) < RTOL
    assert h.rel_err(ms_net(Tensor(imgs), ms_plan)[1].asnumpy(), th_per.detach().numpy()) < RTOL

    th_grads = {n: p.grad for n, p in th_net.named_parameters() if p.requires_grad}
    assert {p.name for p in params} == set(th_grads)
    for p, g in zip(params, ms_grads):
        assert th_grads[p.name] is not None, p.name
        assert h.rel_err(g.asnumpy(), th_grads[p.name].numpy()) < GRAD_RTOL, p.name


def test_hog_targets_match_torch(h):
    """HOG with per-scale frozen biases (imported from the MindSpore model) on the tiny Swin geometry."""
    spec = get_spec("swin_tiny_test", target=TargetSpec(kind="hog", nbins=18, hog_bias=True))
    ms_net, th_net = twin_models(spec, 2)
    imgs = h.make_images(2, spec.img_size, seed=3)
    ours = ms_net.forward_targets(Tensor(imgs))
    theirs = th_net.forward_targets(torch.from_numpy(imgs))
    for a, b in zip(ours, theirs):
        a, b = a.asnumpy(), b.numpy()
        assert a.shape == b.shape
        close = np.isclose(a, b, rtol=1e-5, atol=2e-6).all(axis=-1)
        assert 1.0 - close.mean() < 1e-3     # only tokens with a pixel exactly on a bin edge may differ
        np.testing.assert_allclose(a[close], b[close], rtol=1e-5, atol=2e-6)
