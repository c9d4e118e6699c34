"""Offline evaluation on a split: ours (the served blend, scored through `Scorer`, the code the
deployment runs, from each customer's training-period history) against three baselines:

- popularity: the items most customers bought in the training period;
- buy_again: the customer's own items, most often bought first (order lines, then quantity,
  then popularity), then popular ones. On the new-items split, where bought items are
  excluded, it is the popularity baseline by construction;
- als_raw: `implicit`'s own `recommend` from the trained user factors of an untuned ALS
  (implicit's defaults, `training.RAW_ALS`), no blend.

Every recommender ranks from the training lines only, as of the split's cut-off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from models.recommender import ModelArtifact, ModelParams, Scorer
from pipelines.recommender.data import Dataset, Events, build
from pipelines.recommender.metrics import K, Metrics, evaluate_lists, long_tail_profile
from pipelines.recommender.splits import Split
from pipelines.recommender.training import RAW_ALS, Fitted, default_threads, fit, fit_matrix

log = logging.getLogger(__name__)

MODELS = ("ours", "popularity", "buy_again", "als_raw")


@dataclass
class SplitResult:
    """One split's evaluation: figures per model, the long-tail profile of each model's lists
    (share of slots per popularity decile), and what was trained."""

    rule: str
    cutoff: float
    users: int
    train_lines: int
    items: int
    metrics: dict[str, Metrics]
    long_tail: dict[str, list[float]] = field(default_factory=dict)
    fit_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "cutoff": self.cutoff,
            "users": self.users,
            "train_lines": self.train_lines,
            "items": self.items,
            "fit_seconds": self.fit_seconds,
            "metrics": {name: m.as_dict() for name, m in self.metrics.items()},
            "long_tail": self.long_tail,
        }


def user_lines(train: Events, users: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each of `users` (in order): their training lines' items, quantities and times."""
    order = np.argsort(train.user, kind="stable")
    by_user = train.user[order]
    starts = np.searchsorted(by_user, users, side="left")
    ends = np.searchsorted(by_user, users, side="right")
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        rows = order[start:end]
        yield train.item[rows], train.quantity[rows], train.ts[rows]


def _bar(iterable: Any, total: int, desc: str, progress: bool) -> Any:
    return tqdm(iterable, total=total, desc=desc, disable=not progress, leave=False)


def recommend_ours(scorer: Scorer, split: Split, k: int = K, *, progress: bool = False) -> list[list[str]]:
    """The served blend, through `Scorer.history` and `Scorer.top_items`, as of the cut-off."""
    ids = scorer.artifact.item_ids
    out = []
    lines = user_lines(split.train, split.users)
    for items, quantities, ts in _bar(lines, len(split), f"ours/{split.rule}", progress):
        history = scorer.history(items.tolist(), quantities.tolist(), (split.cutoff - ts).tolist())
        top = scorer.top_items(history, k, repeats=not split.exclude_bought)
        out.append([ids[i] for i in top.tolist()])
    return out


def _popular_order(dataset: Dataset) -> list[str]:
    return dataset.item_ids[np.argsort(-dataset.popularity, kind="stable")].tolist()


def _pad(head: list[str], popular: list[str], skip: set[str], k: int) -> list[str]:
    out, seen = list(head[:k]), set(head[:k]) | skip
    for item in popular:
        if len(out) >= k:
            break
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def recommend_popularity(dataset: Dataset, split: Split, k: int = K) -> list[list[str]]:
    """The most popular items (distinct customers), less what the customer bought when the
    split excludes it."""
    popular = _popular_order(dataset)
    if not split.exclude_bought:
        return [popular[:k]] * len(split)
    return [_pad([], popular, set(items.tolist()), k) for items, _, _ in user_lines(split.train, split.users)]


def recommend_buy_again(dataset: Dataset, split: Split, k: int = K) -> list[list[str]]:
    """The customer's own items by order lines, then quantity, then popularity; then popular
    items (bought ones left out when the split excludes them: popularity, then)."""
    popular = _popular_order(dataset)
    rank = {item: r for r, item in enumerate(popular)}
    out = []
    for items, quantities, _ in user_lines(split.train, split.users):
        if split.exclude_bought:
            out.append(_pad([], popular, set(items.tolist()), k))
            continue
        lines: dict[str, list[int]] = {}
        for item, quantity in zip(items.tolist(), quantities.tolist(), strict=True):
            counts = lines.setdefault(item, [0, 0])
            counts[0] += 1
            counts[1] += quantity
        own = sorted(lines, key=lambda i: (-lines[i][0], -lines[i][1], rank.get(i, len(rank)), i))
        out.append(_pad(own, popular, set(), k))
    return out


def recommend_als_raw(model: Any, dataset: Dataset, split: Split, k: int = K) -> list[list[str]]:
    """`implicit`'s `recommend` from the model's trained user factors (already bought items
    filtered when the split excludes them)."""
    rows = np.searchsorted(dataset.user_ids, split.users)
    if not len(rows):
        return []
    with threadpool_limits(1, "blas"):
        ids, _ = model.recommend(
            rows, dataset.matrix[rows], N=k, filter_already_liked_items=split.exclude_bought
        )
    names = dataset.item_ids
    return [[str(names[i]) for i in row if i >= 0] for row in np.atleast_2d(ids).tolist()]


def score(
    name: str, lists: Sequence[Sequence[str]], split: Split, dataset: Dataset, k: int = K
) -> tuple[Metrics, list[float]]:
    metrics = evaluate_lists(lists, split.relevant, dataset.item_ids.tolist(), dataset.popularity, k)
    log.debug("%s on %s: %s", name, split.rule, metrics)
    return metrics, long_tail_profile(lists, dataset.item_ids.tolist(), dataset.popularity)


def evaluate_artifact(artifact: ModelArtifact, split: Split, dataset: Dataset, k: int = K) -> Metrics:
    """Ours only, for a model already fitted on the split's training lines (the search: no
    long-tail profile, which only the report shows)."""
    lists = recommend_ours(Scorer(artifact), split, k)
    return evaluate_lists(lists, split.relevant, dataset.item_ids.tolist(), dataset.popularity, k)


def evaluate_split(
    split: Split,
    params: ModelParams,
    *,
    threads: int | None = None,
    k: int = K,
    models: Sequence[str] = MODELS,
    progress: bool = False,
    fitted: Fitted | None = None,
) -> SplitResult:
    """Fit ours (unless `fitted` is given) and the raw ALS on the split's training lines, and
    score every model in `models` on its customers."""
    threads = threads or default_threads()
    started = time.perf_counter()
    dataset = build(split.train, split.cutoff, params)
    fitted = fitted or fit(dataset, params, threads=threads, progress=progress)
    lists: dict[str, list[list[str]]] = {}
    for name in models:
        if name == "ours":
            lists[name] = recommend_ours(Scorer(fitted.artifact), split, k, progress=progress)
        elif name == "popularity":
            lists[name] = recommend_popularity(dataset, split, k)
        elif name == "buy_again":
            lists[name] = recommend_buy_again(dataset, split, k)
        elif name == "als_raw":
            raw_params = RAW_ALS.model_copy(update={"seed": params.seed})
            raw, _ = fit_matrix(dataset.matrix, raw_params, threads=threads, progress=progress)
            lists[name] = recommend_als_raw(raw, dataset, split, k)
        else:
            raise ValueError(f"unknown model {name!r} (one of {', '.join(MODELS)})")
    result = SplitResult(
        rule=split.rule,
        cutoff=split.cutoff,
        users=len(split),
        train_lines=len(split.train),
        items=len(dataset.item_ids),
        metrics={},
        fit_seconds=fitted.seconds,
    )
    for name, recommended in lists.items():
        result.metrics[name], result.long_tail[name] = score(name, recommended, split, dataset, k)
    log.info(
        "evaluated %s split (%d customers) in %.1f s: %s",
        split.rule,
        len(split),
        time.perf_counter() - started,
        ", ".join(f"{n} ndcg10={m.ndcg10:.4f}" for n, m in result.metrics.items()),
    )
    return result
