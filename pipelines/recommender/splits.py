"""Evaluation splits. Every split trains on the lines strictly before its cut-off and tests on
what each customer bought at or after it, so no test purchase can reach training.

- time split: cut-off at a quantile of the lines' timestamps (0.9 by default); relevant = every
  item the customer bought after it, repeat purchases included (they are most of grocery).
- new-items split: cut-off at a date; relevant = the items the customer bought after it and
  had never bought before; items already bought are excluded from recommendations.
- validation: the same rule applied inside a split's training period (the hyper-parameter
  search sees neither the test period nor its cut-off).

Customers are evaluated when they bought on both sides of the cut-off (for the new-items split:
something new after it). Relevant items the model has never seen stay relevant (they count in
recall and the ideal DCG): a model is not excused for a catalog it did not learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np

from pipelines.recommender.data import Events, to_epoch

SplitRule = Literal["time", "new_items"]
DEFAULT_QUANTILE = 0.9
# The new-items split of the Online Retail benchmark (about two thirds of the lines before it).
ONLINE_RETAIL_NEW_ITEMS_CUTOFF = datetime(2011, 10, 1)
# The same share for other sources, whose dates are their own.
NEW_ITEMS_QUANTILE = 0.67


@dataclass(frozen=True)
class Split:
    """Training lines (all before `cutoff`), the evaluated customers (sorted) and, for each,
    the set of relevant item ids; `exclude_bought` asks recommenders to leave out what the
    customer bought in training."""

    rule: SplitRule
    cutoff: float
    train: Events
    users: np.ndarray
    relevant: list[frozenset[str]]
    exclude_bought: bool

    @property
    def name(self) -> str:
        return self.rule

    def __len__(self) -> int:
        return len(self.users)


def quantile_cutoff(events: Events, quantile: float) -> float:
    """The `quantile` of the lines' timestamps (NumPy's linear interpolation)."""
    if not len(events):
        raise ValueError("no events to split")
    if not 0.0 < quantile < 1.0:
        raise ValueError("quantile must be strictly between 0 and 1")
    return float(np.quantile(events.ts, quantile))


def _split(events: Events, cutoff: float, rule: SplitRule) -> Split:
    train, test = events.before(cutoff), events.since(cutoff)
    bought: set[tuple[str, str]] = set()
    if rule == "new_items":
        bought = set(zip(train.user.tolist(), train.item.tolist(), strict=True))
    known_users = set(train.user.tolist())
    relevant: dict[str, set[str]] = {}
    for user, item in zip(test.user.tolist(), test.item.tolist(), strict=True):
        if user in known_users and (user, item) not in bought:
            relevant.setdefault(user, set()).add(item)
    users = sorted(relevant)
    return Split(
        rule=rule,
        cutoff=cutoff,
        train=train,
        users=np.asarray(users, dtype=str),
        relevant=[frozenset(relevant[u]) for u in users],
        exclude_bought=rule == "new_items",
    )


def time_split(events: Events, quantile: float = DEFAULT_QUANTILE, *, cutoff: float | None = None) -> Split:
    """Train before the `quantile` of the timestamps (or an explicit `cutoff`), test after."""
    return _split(events, quantile_cutoff(events, quantile) if cutoff is None else cutoff, "time")


def new_items_split(events: Events, cutoff: float | datetime) -> Split:
    """Train before `cutoff`; relevant = items new to the customer after it."""
    return _split(events, to_epoch(cutoff) if isinstance(cutoff, datetime) else float(cutoff), "new_items")


def validation_split(
    split: Split, quantile: float = DEFAULT_QUANTILE, rule: SplitRule | None = None
) -> Split:
    """A rule (the split's own by default) applied inside the split's training period, at the
    `quantile` of the training lines' timestamps. Both rules give the same cut-off and training
    lines, so the search scores both from one fit."""
    return _split(split.train, quantile_cutoff(split.train, quantile), rule or split.rule)
