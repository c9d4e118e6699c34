"""Ranking metrics at a cut-off k with binary relevance (an item is relevant or not), averaged
over the evaluated customers, plus what a list does to the catalog (coverage, popularity bias).

For one customer with relevant set R (|R| >= 1) and recommended list L (best first, at most k
items; a shorter list is padded with misses), hits h_i = 1 if L[i] is in R (positions i from 1):

- precision@k = (sum of h_i) / k
- recall@k    = (sum of h_i) / |R|
- NDCG@k      = DCG / IDCG, DCG = sum h_i / log2(i + 1), IDCG = sum_{i <= min(|R|, k)} 1 / log2(i + 1)
- AP@k        = (sum of h_i x precision@i) / min(|R|, k); MAP@k is its mean over customers.

Catalog coverage: the share of the catalog's items recommended to at least one customer.
Popularity bias: the mean popularity percentile of the recommended items (0 = least popular
item, 1 = most popular; ties share their average rank): a popularity baseline scores near 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

K = 10


def _hits(recommended: Sequence[str], relevant: frozenset[str] | set[str], k: int) -> list[int]:
    return [1 if item in relevant else 0 for item in list(recommended)[:k]]


def precision_at_k(recommended: Sequence[str], relevant: frozenset[str] | set[str], k: int = K) -> float:
    """Hits in the first k over k."""
    return sum(_hits(recommended, relevant, k)) / k


def recall_at_k(recommended: Sequence[str], relevant: frozenset[str] | set[str], k: int = K) -> float:
    """Hits in the first k over the number of relevant items."""
    return sum(_hits(recommended, relevant, k)) / len(relevant) if relevant else 0.0


def ndcg_at_k(recommended: Sequence[str], relevant: frozenset[str] | set[str], k: int = K) -> float:
    """DCG of the first k (a hit at position i counts 1 / log2(i + 1)) over the DCG of a list
    with every relevant item first."""
    if not relevant:
        return 0.0
    dcg = sum(h / math.log2(i + 2) for i, h in enumerate(_hits(recommended, relevant, k)))
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal


def average_precision_at_k(
    recommended: Sequence[str], relevant: frozenset[str] | set[str], k: int = K
) -> float:
    """The precision at each hit's position, summed, over min(|relevant|, k)."""
    if not relevant:
        return 0.0
    total, hits = 0.0, 0
    for i, h in enumerate(_hits(recommended, relevant, k)):
        if h:
            hits += 1
            total += hits / (i + 1)
    return total / min(len(relevant), k)


def popularity_percentiles(popularity: np.ndarray) -> np.ndarray:
    """Each item's popularity percentile in [0, 1] (1 = the most popular; ties averaged)."""
    n = len(popularity)
    if n <= 1:
        return np.ones(n)
    return (rankdata(popularity, method="average") - 1.0) / (n - 1)


@dataclass(frozen=True)
class Metrics:
    """A model's figures on one split (see the module docstring for the definitions)."""

    users: int
    precision10: float
    recall10: float
    ndcg10: float
    map10: float
    coverage: float
    popularity_bias: float

    def as_dict(self) -> dict[str, float]:
        return {key: (float(v) if key != "users" else int(v)) for key, v in asdict(self).items()}


def evaluate_lists(
    recommended: Sequence[Sequence[str]],
    relevant: Sequence[frozenset[str]],
    item_ids: Sequence[str],
    popularity: np.ndarray,
    k: int = K,
) -> Metrics:
    """Mean precision/recall/NDCG/MAP at k over the customers, coverage of `item_ids` and the
    popularity bias (percentiles from `popularity`, aligned with `item_ids`)."""
    if len(recommended) != len(relevant):
        raise ValueError("one recommended list per relevant set")
    n = len(relevant)
    index = {item: i for i, item in enumerate(item_ids)}
    percentile = popularity_percentiles(np.asarray(popularity, dtype=np.float64))
    shown: set[str] = set()
    percentiles: list[float] = []
    sums = np.zeros(4)
    for recs, rel in zip(recommended, relevant, strict=True):
        top = list(recs)[:k]
        sums += (
            precision_at_k(top, rel, k),
            recall_at_k(top, rel, k),
            ndcg_at_k(top, rel, k),
            average_precision_at_k(top, rel, k),
        )
        shown.update(top)
        percentiles.extend(float(percentile[index[i]]) for i in top if i in index)
    means = sums / n if n else sums
    return Metrics(
        users=n,
        precision10=float(means[0]),
        recall10=float(means[1]),
        ndcg10=float(means[2]),
        map10=float(means[3]),
        coverage=len(shown & index.keys()) / len(index) if index else 0.0,
        popularity_bias=float(np.mean(percentiles)) if percentiles else 0.0,
    )


def long_tail_profile(
    recommended: Sequence[Sequence[str]], item_ids: Sequence[str], popularity: np.ndarray, bins: int = 10
) -> list[float]:
    """The share of recommendation slots falling in each popularity decile of the catalog
    (bin 0 = the least popular tenth of the items, the last bin = the most popular tenth)."""
    index = {item: i for i, item in enumerate(item_ids)}
    percentile = popularity_percentiles(np.asarray(popularity, dtype=np.float64))
    counts = np.zeros(bins)
    for recs in recommended:
        for item in recs:
            if item in index:
                counts[min(int(percentile[index[item]] * bins), bins - 1)] += 1
    total = counts.sum()
    return (counts / total).tolist() if total else counts.tolist()
