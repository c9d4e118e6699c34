"""Interactions for the recommender: columnar `Events` (one row per order line) from the vendored
Online Retail transactions or from our own delivered orders, and `build`, which turns them into
the training matrix (customers x products, CSR) with sorted id maps and popularity counts.

Strength of a (customer, product) cell, as `models.recommender` serves it: the order lines'
`line_weights` ((1 + ln quantity) x 2^(-age / half-life), age = cut-off - time) summed, then
log1p. Everything is deterministic for given events and cut-off: ids are sorted, lines are put
in a canonical order before summing, whatever order the source returned them in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from models.recommender import ModelArtifact, ModelParams, line_weights
from pipelines import catalog

log = logging.getLogger(__name__)

# Online Retail customers become users "or:<CustomerID>" (never a UUID, so never one of ours).
ONLINE_RETAIL_USER_PREFIX = "or:"
_COLUMNS = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID"]

ORDERS_SQL = text(
    """
    SELECT o.user_id, ol.product_id, ol.quantity, o.delivered_at, o.store_id
    FROM orders o JOIN order_lines ol ON ol.order_id = o.id
    WHERE o.status IN ('delivered', 'partially_refunded') AND o.delivered_at < :cutoff
    """
)
PRODUCT_SKUS_SQL = text("SELECT sku, id FROM products")


def _strings(values: Any) -> np.ndarray:
    """A NumPy unicode array (sortable, saved without pickle), also for an empty input."""
    array = np.asarray(values, dtype=str)
    return array if array.ndim == 1 else array.reshape(-1)


def to_epoch(moment: datetime) -> float:
    """Epoch seconds; a naive datetime is taken as UTC (Online Retail's dates are naive)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class Events:
    """Order lines, column by column: customer id, product id, quantity, time (epoch seconds)
    and the store that delivered it ("" when none, as in Online Retail)."""

    user: np.ndarray
    item: np.ndarray
    quantity: np.ndarray
    ts: np.ndarray
    store: np.ndarray

    @classmethod
    def of(
        cls,
        user: Any,
        item: Any,
        quantity: Any,
        ts: Any,
        store: Any | None = None,
    ) -> Events:
        """Events from any sequences (lists or arrays); `store` defaults to "" everywhere."""
        users = _strings(user)
        stores = _strings(store) if store is not None else np.full(len(users), "", dtype="<U1")
        events = cls(
            users,
            _strings(item),
            np.asarray(quantity, dtype=np.int64).reshape(-1),
            np.asarray(ts, dtype=np.float64).reshape(-1),
            stores,
        )
        lengths = {len(getattr(events, f.name)) for f in fields(cls)}
        if len(lengths) != 1:
            raise ValueError(f"Events columns differ in length: {sorted(lengths)}")
        return events

    @classmethod
    def empty(cls) -> Events:
        return cls.of([], [], [], [])

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, selector: np.ndarray) -> Events:
        """The rows a boolean mask or an index array selects."""
        return Events(*(getattr(self, f.name)[selector] for f in fields(self)))

    def before(self, cutoff: float) -> Events:
        return self.take(self.ts < cutoff)

    def since(self, cutoff: float) -> Events:
        return self.take(self.ts >= cutoff)

    @staticmethod
    def concat(*parts: Events) -> Events:
        if not parts:
            return Events.empty()
        return Events.of(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Events)))

    def canonical(self) -> Events:
        """Rows in one order whatever order they were read in: by time, customer, product,
        store, quantity."""
        order = np.lexsort((self.quantity, self.store, self.item, self.user, self.ts))
        return self.take(order)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> Events:
        with np.load(path, allow_pickle=False) as npz:
            return cls.of(*(npz[f.name] for f in fields(cls)))


# ---------------------------------------------------------------- sources


def online_retail_events(
    parquet: Path = catalog.DEFAULT_PARQUET, sku_to_item: Mapping[str, str] | None = None
) -> Events:
    """The Online Retail order lines, cleaned exactly as the catalog seed cleans them (no
    cancellations, non-positive quantities or prices, missing customers or descriptions; only
    SKUs the catalog derives a product from), one user per CustomerID ("or:<id>").

    Items are mapped onto the seeded catalog by SKU with `sku_to_item` (SKU -> product id, as
    `product_skus` reads it); lines of SKUs missing from the mapping are dropped. Without a
    mapping the SKU itself is the item id (research mode, no database)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=_COLUMNS)
    skus = {item.sku for item in catalog.aggregate(table)}
    sales = catalog._valid_sales(table)
    codes = pc.utf8_upper(pc.utf8_trim_whitespace(sales["StockCode"]))
    products = sorted(c for c in set(codes.to_pylist()) if c in skus and catalog.is_product_code(c))
    sales = sales.filter(pc.is_in(codes, value_set=pa.array(products, pa.string())))
    sku = _strings(pc.utf8_upper(pc.utf8_trim_whitespace(sales["StockCode"])).to_numpy(zero_copy_only=False))
    customers = sales["CustomerID"].to_numpy().astype(np.int64)
    users = np.char.add(ONLINE_RETAIL_USER_PREFIX, customers.astype(str))
    micros = sales["InvoiceDate"].cast(pa.int64()).to_numpy()
    events = Events.of(users, sku, sales["Quantity"].to_numpy(), micros / 1e6)
    log.info(
        "read %d order lines (%d customers, %d SKUs) of %d rows from %s",
        len(events),
        len(np.unique(users)),
        len(products),
        table.num_rows,
        parquet,
    )
    if sku_to_item is None:
        return events
    mapped = np.array([sku_to_item.get(s, "") for s in events.item.tolist()], dtype=str)
    known = mapped != ""
    if not known.all():
        log.warning("dropped %d lines whose SKU is not in the catalog", int((~known).sum()))
    return Events.of(events.user[known], mapped[known], events.quantity[known], events.ts[known])


async def product_skus(session: AsyncSession) -> dict[str, str]:
    """SKU -> product id (str) of the seeded catalog."""
    rows = (await session.execute(PRODUCT_SKUS_SQL)).all()
    log.info("read %d product SKUs from the catalog", len(rows))
    return {str(sku): str(product_id) for sku, product_id in rows}


async def order_events(session: AsyncSession, cutoff: datetime, batch: int = 50_000) -> Events:
    """Our delivered order lines (delivered or partially refunded orders) delivered before
    `cutoff`, read in batches."""
    parts: list[Events] = []
    result = await session.stream(ORDERS_SQL, {"cutoff": cutoff})
    async for rows in result.partitions(batch):
        parts.append(
            Events.of(
                [str(r[0]) for r in rows],
                [str(r[1]) for r in rows],
                [r[2] for r in rows],
                [r[3].timestamp() for r in rows],
                [str(r[4]) for r in rows],
            )
        )
    events = Events.concat(*parts).canonical()
    log.info("read %d delivered order lines before %s", len(events), cutoff.isoformat())
    return events


# ---------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Dataset:
    """The training matrix and what serving needs beside the factors.

    `matrix`: customers x products (CSR, float32), strength as in the module docstring.
    `user_ids`, `item_ids`: the rows' and columns' ids, sorted. `popularity`: distinct customers
    per item. `store_ids` (sorted, "" left out) and `store_popularity` (stores x items):
    distinct customers per item and store."""

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    popularity: np.ndarray
    store_ids: np.ndarray
    store_popularity: np.ndarray
    cutoff: float
    half_life_days: float

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.user_ids), len(self.item_ids))

    def artifact(self, item_factors: np.ndarray, params: ModelParams) -> ModelArtifact:
        return ModelArtifact(
            item_ids=self.item_ids.tolist(),
            item_factors=np.ascontiguousarray(item_factors, dtype=np.float32),
            popularity=self.popularity.astype(np.float32),
            store_ids=self.store_ids.tolist(),
            store_popularity=self.store_popularity.astype(np.float32),
            params=params,
        )

    def save(self, directory: Path) -> None:
        """`matrix.npz` (SciPy), `arrays.npz` (ids, popularity) and `meta.json`."""
        directory.mkdir(parents=True, exist_ok=True)
        sp.save_npz(directory / "matrix.npz", self.matrix)
        np.savez_compressed(
            directory / "arrays.npz",
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            popularity=self.popularity,
            store_ids=self.store_ids,
            store_popularity=self.store_popularity,
        )
        meta = {"cutoff": self.cutoff, "half_life_days": self.half_life_days, "shape": list(self.shape)}
        (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        log.info("wrote dataset %s to %s", self.shape, directory)

    @classmethod
    def load(cls, directory: Path) -> Dataset:
        meta = json.loads((directory / "meta.json").read_text())
        with np.load(directory / "arrays.npz", allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        return cls(
            matrix=sp.load_npz(directory / "matrix.npz").tocsr(),
            cutoff=float(meta["cutoff"]),
            half_life_days=float(meta["half_life_days"]),
            **arrays,
        )


def build(events: Events, cutoff: float, params: ModelParams) -> Dataset:
    """The training data as of `cutoff` (epoch seconds): the lines before it, weighted by their
    age at the cut-off (see the module docstring)."""
    ev = events.before(cutoff)
    user_ids, users = np.unique(ev.user, return_inverse=True)
    item_ids, items = np.unique(ev.item, return_inverse=True)
    users, items = users.reshape(-1), items.reshape(-1)
    # Floating-point sums depend on their order: sum in one canonical order.
    order = np.lexsort((ev.quantity, ev.ts, items, users))
    users, items = users[order], items[order]
    weights = line_weights(ev.quantity[order], cutoff - ev.ts[order], params.half_life_days)
    shape = (len(user_ids), len(item_ids))
    matrix = sp.csr_matrix((weights, (users, items)), shape=shape, dtype=np.float64)
    matrix.sum_duplicates()
    matrix.data = np.log1p(matrix.data)
    matrix = matrix.astype(np.float32)
    matrix.sort_indices()
    popularity = np.diff(matrix.tocsc().indptr).astype(np.float64)

    has_store = ev.store[order] != ""
    store_ids, stores = np.unique(ev.store[order][has_store], return_inverse=True)
    store_popularity = np.zeros((len(store_ids), len(item_ids)))
    if len(store_ids):
        triples = np.unique(
            np.stack([stores.reshape(-1), users[has_store], items[has_store]], axis=1), axis=0
        )
        np.add.at(store_popularity, (triples[:, 0], triples[:, 2]), 1.0)
    return Dataset(
        matrix=matrix,
        user_ids=user_ids,
        item_ids=item_ids,
        popularity=popularity,
        store_ids=store_ids,
        store_popularity=store_popularity,
        cutoff=float(cutoff),
        half_life_days=params.half_life_days,
    )
