"""Both backends give the same frozen-encoder features from the same checkpoint and images
(1e-5 relative): embeddings, feature maps, the ViT pyramid and a linear probe's logits, on the
bundled photographs and on noise; and the same k-NN predictions on real handwritten digits."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")
pytest.importorskip("skimage")

from mindspore import Tensor  # noqa: E402

from localmim.backends.mindspore import ensure_cpu_context  # noqa: E402
from localmim.backends.mindspore import features as msf  # noqa: E402
from localmim.backends.mindspore import linprobe as msl  # noqa: E402
from localmim.backends.torch import build_model  # noqa: E402
from localmim.backends.torch import features as tf  # noqa: E402
from localmim.backends.torch import linprobe as tl  # noqa: E402
from localmim.core import knn  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402
from localmim.tools import parity  # noqa: E402

ensure_cpu_context()
TOL = 1e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Factory: a perturbed random model of `name` saved as a torch checkpoint -> its path."""
    folder = tmp_path_factory.mktemp("ckpt")

    def make(name, seed=0):
        torch.manual_seed(seed)
        model = build_model(get_spec(name))
        state = model.export_state()
        rng = np.random.default_rng(seed)
        for k in state:
            if ("norm" in k or k.endswith(".bias")) and not k.startswith("hog_enc"):
                state[k] = (state[k] + 0.1 * rng.standard_normal(state[k].shape)).astype(np.float32)
        model.import_state(state)
        path = folder / f"{name}.pth"
        torch.save({"model": model.state_dict()}, str(path))
        return str(path)

    return make


def _inputs(sample_dir, size):
    photos = parity.load_photos(parity.bundled_photo_paths(os.path.dirname(sample_dir)), size)
    noise = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    return {"photos": photos, "noise": noise}


@pytest.mark.parametrize("name,pools", [("vit_tiny_test", ("avg", "cls")), ("vit_mini", ("avg",)),
                                        ("swin_tiny_test", ("avg",))])
def test_embeddings_and_maps_agree(name, pools, checkpoint, sample_dir):
    path = checkpoint(name)
    spec = get_spec(name)
    for source, imgs in _inputs(sample_dir, spec.img_size).items():
        for pool in pools:
            a, b = tf.load_encoder(path, pool=pool), msf.load_encoder(path, pool=pool)
            assert rel(b.encode(imgs), a.encode(imgs)) < TOL, (source, pool)
        for k, (m_t, m_m) in enumerate(zip(a.feature_maps(imgs), b.feature_maps(imgs))):
            assert rel(m_m, m_t) < TOL, (source, k)


def test_pyramid_and_probe_logits_agree(checkpoint, sample_dir):
    path = checkpoint("vit_tiny_test", 1)
    imgs = _inputs(sample_dir, 32)["photos"]
    t_enc, m_enc = tf.load_encoder(path), msf.load_encoder(path)
    t_bb, m_bb = tf.ViTBackbone(t_enc.model).eval(), msf.ViTBackbone(m_enc.model)
    m_bb.set_train(False)
    state = {k: v.detach().numpy() for k, v in t_bb.pyramid.state_dict().items()}
    for name, p in m_bb.pyramid.parameters_and_names():
        p.set_data(Tensor(state[name]))
    with torch.no_grad():
        t_out = t_bb(torch.from_numpy(imgs))
    for k, (a, b) in enumerate(zip(t_out, m_bb(Tensor(imgs)))):
        assert rel(b.asnumpy(), a.numpy()) < TOL, k
    t_probe, m_probe = tl.build_probe(32, 5, seed=2).eval(), msl.build_probe(32, 5)
    m_probe.import_state(t_probe.export_state())
    m_probe.set_train(False)
    with torch.no_grad():
        t_logits = t_probe(t_enc.encode(torch.from_numpy(imgs))).numpy()
    m_logits = m_probe(Tensor(m_enc.encode(imgs))).asnumpy()
    assert rel(m_logits, t_logits) < TOL


def test_knn_predictions_are_identical_on_digits(checkpoint, tmp_path):
    pytest.importorskip("sklearn")
    from localmim.tools.datasets import write_digits
    from localmim.tools.evaluate import knn_evaluate
    data = tmp_path / "digits"
    write_digits(data, per_class=15)  # 10 digits: 120 train / 30 val
    path = checkpoint("vit_tiny_test", 3)
    recs = [knn_evaluate(mod.load_encoder(path), str(data), backend, progress=False)
            for mod, backend in ((tf, "torch"), (msf, "mindspore"))]
    np.testing.assert_array_equal(recs[0]["predictions"], recs[1]["predictions"])
    assert recs[0]["val_acc1"] == recs[1]["val_acc1"] and recs[0]["val_acc5"] == recs[1]["val_acc5"]
    assert recs[0]["val_images"] == 30 and recs[0]["train_images"] == 120
    assert recs[0]["val_acc1"] > 10.0  # better than chance on real digits, even with random weights
    assert knn.summary_line("knn", recs[0]["val_acc1"], recs[0]["val_acc5"]).startswith("knn top-1: ")
