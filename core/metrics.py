"""Classification metrics (numpy only): top-k hits and their sums over batches and ranks.

logits (B, C) float, labels (B,) int. A sample is a top-k hit when its label is among the k
largest logits; ties are broken towards the lower class index (a stable sort of -logits), so the
count does not depend on the framework's topk.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

__all__ = ["TOPK", "rank_classes", "topk_hits", "cross_entropy_sum", "EvalSums"]

TOPK = (1, 5)


def rank_classes(scores: np.ndarray) -> np.ndarray:
    """(Q, C) class indices by decreasing score; equal scores keep the lower class first."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def topk_hits(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = TOPK) -> np.ndarray:
    """(len(ks),) int64: how many samples have their label among the k largest logits, for each k
    (k is capped at the number of classes)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    order = rank_classes(logits)
    rank = np.argmax(order == labels[:, None], axis=1)  # position of the label in the ranking
    return np.asarray([int((rank < min(k, logits.shape[1])).sum()) for k in ks], np.int64)


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Sum over samples of -log softmax(logits)[label], in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(z)), np.asarray(labels, np.int64)]).sum())


class EvalSums:
    """Running sums of an evaluation: samples, top-k hits, cross-entropy. `as_array()` packs them
    for one all-reduce (sum over ranks); `metrics()` gives {"val_acc1", "val_acc5" (percent),
    "val_loss" (mean cross-entropy)}: the same numbers from one process or from disjoint shards."""

    def __init__(self, ks: Sequence[int] = TOPK):
        self.ks = tuple(int(k) for k in ks)
        self.count, self.hits, self.loss = 0, np.zeros(len(self.ks), np.int64), 0.0

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        self.count += int(len(labels))
        self.hits += topk_hits(logits, labels, self.ks)
        self.loss += cross_entropy_sum(logits, labels)

    def as_array(self) -> np.ndarray:
        return np.concatenate([[self.count], self.hits, [self.loss]]).astype(np.float64)

    def load_array(self, packed: np.ndarray) -> "EvalSums":
        packed = np.asarray(packed, np.float64)
        self.count, self.hits, self.loss = int(round(packed[0])), np.rint(packed[1:-1]).astype(np.int64), float(packed[-1])
        return self

    def metrics(self) -> Dict[str, float]:
        if self.count == 0:
            raise ValueError("no samples were evaluated")
        out = {f"val_acc{k}": 100.0 * float(h) / self.count for k, h in zip(self.ks, self.hits)}
        out["val_loss"] = self.loss / self.count
        return out
