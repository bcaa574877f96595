"""core/knn.py: the weighted k-NN vote against a brute-force loop and hand-computed cases."""
import math

import numpy as np
import pytest

from localmim.core import knn


def brute_force_scores(train, labels, query, num_classes, k, temperature):
    """Plain Python: cosine similarity to every training row, the k largest (ties: lower index),
    exp(sim / T) summed per class."""
    out = np.zeros((len(query), num_classes))
    for qi, q in enumerate(query):
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for ti, t in enumerate(train):
            tn = math.sqrt(sum(v * v for v in t))
            sims.append((-(sum(a * b for a, b in zip(q, t)) / (qn * tn)), ti))
        for neg_sim, ti in sorted(sims)[:k]:
            out[qi, labels[ti]] += math.exp(-neg_sim / temperature)
    return out


@pytest.mark.parametrize("k", [1, 7, 20, 100])
def test_scores_and_accuracies_match_brute_force(k):
    rng = np.random.default_rng(k)
    centres = rng.standard_normal((6, 5))
    labels = rng.integers(0, 6, 40)
    train = centres[labels] + 0.8 * rng.standard_normal((40, 5))
    q_labels = rng.integers(0, 6, 13)
    query = centres[q_labels] + 0.8 * rng.standard_normal((13, 5))
    ref = brute_force_scores(train.tolist(), labels.tolist(), query.tolist(), 6, k, 0.07)
    got = knn.knn_scores(train.astype(np.float32), labels, query.astype(np.float32), 6, k, 0.07, chunk=4)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    result = knn.knn_classify(train, labels, query, q_labels, 6, k, 0.07)
    ranking = np.argsort(-ref, axis=1, kind="stable")
    np.testing.assert_array_equal(result.predictions, ranking[:, 0])
    assert result.top1 == pytest.approx(100 * np.mean(ranking[:, 0] == q_labels))
    assert result.top5 == pytest.approx(100 * np.mean([q in r[:5] for q, r in zip(q_labels, ranking)]))


def test_hand_computed_vote():
    # unit vectors at 0, 30 and 90 degrees (classes 0, 1, 1); query at 10 degrees, k = 2, T = 0.5
    deg = np.deg2rad([0.0, 30.0, 90.0])
    train = np.stack([np.cos(deg), np.sin(deg)], 1) * np.array([[2.0], [1.0], [3.0]])  # norms do not matter
    query = np.array([[math.cos(math.radians(10)), math.sin(math.radians(10))]])
    scores = knn.knn_scores(train, np.array([0, 1, 1]), query, 2, k=2, temperature=0.5)
    expected = [math.exp(math.cos(math.radians(10)) / 0.5), math.exp(math.cos(math.radians(20)) / 0.5)]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-12)
    # the 90-degree neighbour is third, outside k = 2, so it adds nothing to class 1


def test_equal_similarities_keep_the_lower_index():
    train = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scores = knn.knn_scores(train, np.array([2, 1, 0]), np.array([[1.0, 0.0]]), 3, k=1, temperature=1.0)
    assert scores[0].tolist() == [0.0, 0.0, math.e]  # training row 0 (class 2), not row 1


def test_topk_accuracy_and_summary_line():
    ranking = np.array([[2, 0, 1], [0, 1, 2], [1, 2, 0], [0, 2, 1]])
    acc = knn.topk_accuracy(ranking, np.array([2, 1, 1, 1]), ks=(1, 2, 5))
    assert acc == {1: 50.0, 2: 75.0, 5: 100.0}
    assert knn.summary_line("knn", 61.25, 97.5) == "knn top-1: 61.25 top-5: 97.50"
    assert knn.summary_line("linprobe", 100.0, 100.0) == "linprobe top-1: 100.00 top-5: 100.00"


def test_classification_metrics_by_hand():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    m = knn.classification_metrics(logits, np.array([1, 2]))
    ce0 = -(1.0 - math.log(math.exp(2) + math.exp(1) + 1))
    ce1 = -(3.0 - math.log(2 + math.exp(3)))
    assert m["val_acc1"] == 50.0 and m["val_acc5"] == 100.0
    assert m["val_loss"] == pytest.approx((ce0 + ce1) / 2, rel=1e-12)


def test_bad_features_are_one_sentence():
    train = np.ones((3, 2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        knn.knn_scores(np.array([[np.nan, 0.0]] * 3), np.zeros(3, int), train, 1)
    with pytest.raises(ValueError, match=r"\(N, D\) training and \(Q, D\) query"):
        knn.knn_scores(train, np.zeros(3, int), np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match="labels of shape"):
        knn.knn_scores(train, np.zeros(2, int), train, 1)


def test_evaluation_modules_import_no_framework():
    import subprocess
    import sys
    mods = ["localmim.core.knn", "localmim.core.features", "localmim.backends.labelled", "localmim.tools.evaluate",
            "localmim.tools.datasets"]
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            "loaded = [f for f in ('torch', 'mindspore', 'timm') if f in sys.modules]\nassert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
