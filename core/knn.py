"""Weighted k-nearest-neighbour classification of frozen features (docs/method.md#knn-protocol).

The protocol of DINO's k-NN evaluation: features are L2-normalised, the k training features of
highest cosine similarity to a query vote for their class with weight exp(similarity / T), and
the classes are ranked by their summed votes. numpy only, so both backends score their features
with the same arithmetic.

Shapes: train features (N, D), query features (Q, D), labels (N,) / (Q,) int, scores (Q, C).
Accuracies are percentages in [0, 100].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

from localmim.core.metrics import EvalSums, rank_classes

__all__ = ["KNN_K", "KNN_TEMPERATURE", "KnnResult", "l2_normalize", "knn_scores", "rank_classes",
           "topk_accuracy", "knn_classify", "classification_metrics", "summary_line"]

KNN_K = 20
KNN_TEMPERATURE = 0.07


@dataclass
class KnnResult:
    """top1, top5: accuracy in percent; predictions: (Q,) the top-ranked class of each query;
    ranking: (Q, C) classes by decreasing score."""
    top1: float
    top5: float
    predictions: np.ndarray
    ranking: np.ndarray


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of (n, D) scaled to unit Euclidean norm (a zero row stays zero), float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / np.maximum(norm, eps)


def knn_scores(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, num_classes: int,
               k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> np.ndarray:
    """(Q, C) summed vote of the k most similar training features per class.

    Neighbours are the k largest cosine similarities; equal similarities are broken by the lower
    training index, so the result does not depend on how the sort is implemented. k larger than
    the training set uses every training feature. Queries are processed `chunk` at a time.
    """
    train_labels = np.asarray(train_labels, dtype=np.int64)
    if train.ndim != 2 or query.ndim != 2 or train.shape[1] != query.shape[1]:
        raise ValueError(f"k-NN needs (N, D) training and (Q, D) query features, got {train.shape} and {query.shape}")
    if train_labels.shape != (train.shape[0],):
        raise ValueError(f"{train.shape[0]} training features but labels of shape {train_labels.shape}")
    if not np.isfinite(train).all() or not np.isfinite(query).all():
        raise ValueError("k-NN features contain NaN or infinite values")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(int(k), train.shape[0])
    train_n, query_n = l2_normalize(train), l2_normalize(query)
    scores = np.zeros((query.shape[0], num_classes), dtype=np.float64)
    for start in range(0, query.shape[0], chunk):
        sim = query_n[start:start + chunk] @ train_n.T                         # (q, N)
        # a stable sort of -sim keeps the lower training index first among equal similarities
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]                # (q, k)
        top_sim = np.take_along_axis(sim, order, axis=1)
        weights = np.exp(top_sim / temperature)
        rows = np.repeat(np.arange(order.shape[0]), k)
        np.add.at(scores[start:start + chunk], (rows, train_labels[order].reshape(-1)), weights.reshape(-1))
    return scores


def topk_accuracy(ranking: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """{k: percentage of queries whose label is among the first k ranked classes}."""
    labels = np.asarray(labels, dtype=np.int64)
    out = {}
    for k in ks:
        hit = (ranking[:, :min(k, ranking.shape[1])] == labels[:, None]).any(axis=1)
        out[int(k)] = 100.0 * float(hit.mean()) if len(labels) else 0.0
    return out


def knn_classify(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, query_labels: np.ndarray,
                 num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> KnnResult:
    """Score the queries against the training features -> KnnResult (top-1 / top-5 in percent)."""
    ranking = rank_classes(knn_scores(train, train_labels, query, num_classes, k, temperature))
    acc = topk_accuracy(ranking, query_labels)
    return KnnResult(top1=acc[1], top5=acc[5], predictions=ranking[:, 0].copy(), ranking=ranking)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """(Q, C) logits and (Q,) labels -> {"val_acc1", "val_acc5" (percent), "val_loss" (mean
    cross-entropy, nats)}: core.metrics.EvalSums, the keys fine-tuning logs too."""
    sums = EvalSums()
    sums.add(logits, labels)
    return sums.metrics()


def summary_line(what: str, top1: float, top5: float) -> str:
    """The one line an evaluation command ends with, e.g. 'knn top-1: 61.25 top-5: 97.50'."""
    return f"{what} top-1: {top1:.2f} top-5: {top5:.2f}"
