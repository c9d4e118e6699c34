"""Recommendations: the model registry (versions and promotions), the model artifact, and the
scoring that both the offline evaluation (`pipelines/recommender`) and the serving deployment
(`actors/recommender.py`) run, so what is measured is what is served.

The model is implicit ALS (or BPR) item factors. Customers are not stored in it: a customer's
vector is folded in from their history at request time (the ALS user step, one small linear
solve), so purchases made after training count at once and the artifact does not grow with the
customer base. Measured on Online Retail (all 56 splits of the benchmark alike): folding in
scores the same NDCG@10 as the trained user factors to the third decimal.

The score of an item for a customer blends, in one formula (`Scorer.scores`):
  ALS (the folded-in vector times the item factors, scaled to at most 1)
  + `w_repeat` x the customer's own recency-weighted purchases of it ("buy again")
  + `w_popularity` x log-popularity (scaled to at most 1),
with the weights stored in the model's parameters, chosen on a validation split.

Interaction strength, for training and serving alike: each order line weighs
(1 + ln quantity) x 2^(-age / half-life), summed per (customer, product), then log1p.
"""

from __future__ import annotations

import io
import json
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Identity,
    Integer,
    LargeBinary,
    String,
    Text,
    Uuid,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, deferred, mapped_column

from models.db import Base
from models.errors import Conflict, NotFound

Algorithm = Literal["als", "bpr"]
Source = Literal["als", "popular", "buy_again"]
Surface = Literal["for_you", "similar", "basket"]
DataSource = Literal["orders", "online_retail"]
PromotionAction = Literal["promote", "rollback"]
# The metric promotion compares (NDCG@10 on the model's own time split).
PRIMARY_METRIC = "ndcg10"
DAY_S = 86_400.0


# ---------------------------------------------------------------- tables


class RecommenderModel(Base):
    """A trained model version. The artifact (item factors, popularity, parameters; see
    `ModelArtifact`) lives in the row, so every replica on every pod reads the same bytes."""

    __tablename__ = "recommender_models"
    __table_args__ = (
        CheckConstraint("algorithm IN ('als', 'bpr')", name="algorithm"),
        CheckConstraint("source IN ('orders', 'online_retail')", name="source"),
    )

    version: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    created_by: Mapped[str] = mapped_column(String(120))
    algorithm: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(16))
    data_cutoff: Mapped[datetime]
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    git_commit: Mapped[str | None] = mapped_column(String(40))
    users: Mapped[int] = mapped_column(Integer)
    items: Mapped[int] = mapped_column(Integer)
    interactions: Mapped[int] = mapped_column(Integer)
    train_seconds: Mapped[float]
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    artifact_bytes: Mapped[int] = mapped_column(Integer)
    artifact: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    # The evaluation report (Markdown), kept with the model it describes.
    report: Mapped[str | None] = deferred(mapped_column(Text))


class RecommenderPromotion(Base):
    """Who made which version the production model, when, and from which one: the latest row
    names production; rollback walks these rows back."""

    __tablename__ = "recommender_promotions"
    __table_args__ = (CheckConstraint("action IN ('promote', 'rollback')", name="action"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    version: Mapped[int] = mapped_column(ForeignKey("recommender_models.version", ondelete="RESTRICT"))
    previous_version: Mapped[int | None] = mapped_column(
        ForeignKey("recommender_models.version", ondelete="RESTRICT")
    )
    action: Mapped[str] = mapped_column(String(8))
    forced: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    promoted_by: Mapped[str] = mapped_column(String(120))
    promoted_at: Mapped[datetime] = mapped_column(server_default=func.now())


class RecommendationImpression(Base):
    """One served list, for offline evaluation with impressions (what was shown, by which
    model version, to whom). Written in batches by the search replicas."""

    __tablename__ = "recommendation_impressions"
    __table_args__ = (CheckConstraint("surface IN ('for_you', 'similar', 'basket')", name="surface"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    served_at: Mapped[datetime]
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    store_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    surface: Mapped[str] = mapped_column(String(8))
    model_version: Mapped[int | None] = mapped_column(Integer)
    product_ids: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(Uuid))
    sources: Mapped[list[str]] = mapped_column(ARRAY(String(10)))


# ---------------------------------------------------------------- parameters and artifact


class ModelParams(BaseModel):
    """Training hyper-parameters and the serving blend; a model version stores its own."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm = "als"
    factors: int = Field(default=64, ge=2, le=512)
    regularization: float = Field(default=0.05, ge=0)
    alpha: float = Field(default=1.0, gt=0, description="ALS: confidence = alpha x strength")
    iterations: int = Field(default=15, ge=1, le=500)
    learning_rate: float = Field(default=0.01, gt=0, description="BPR only")
    half_life_days: float = Field(default=180.0, gt=0, description="Recency decay of the training signal")
    repeat_half_life_days: float = Field(default=45.0, gt=0, description="Recency decay of 'buy again'")
    w_repeat: float = Field(default=2.0, ge=0, description="Weight of the customer's own purchases")
    w_popularity: float = Field(default=0.3, ge=0, description="Weight of log-popularity")
    seed: int = 42


def line_weights(quantity: np.ndarray, age_s: np.ndarray, half_life_days: float) -> np.ndarray:
    """Each order line's weight: (1 + ln quantity) x 2^(-age / half-life). Ages below zero
    (clock skew) count as now."""
    q = np.maximum(np.asarray(quantity, dtype=np.float64), 1.0)
    age = np.maximum(np.asarray(age_s, dtype=np.float64), 0.0)
    return (1.0 + np.log(q)) * np.exp2(-age / (half_life_days * DAY_S))


@dataclass
class ModelArtifact:
    """What serving needs, as arrays; `to_bytes`/`from_bytes` give the stored form (NumPy's
    npz, no pickle: loading a model cannot run code)."""

    item_ids: list[str]
    item_factors: np.ndarray  # (items, factors) float32
    popularity: np.ndarray  # (items,) distinct customers in the training data
    store_ids: list[str]
    store_popularity: np.ndarray  # (stores, items)
    params: ModelParams

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        header = {"item_ids": self.item_ids, "store_ids": self.store_ids, "params": self.params.model_dump()}
        np.savez_compressed(
            buffer,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            item_factors=self.item_factors.astype(np.float32),
            popularity=self.popularity.astype(np.float32),
            store_popularity=self.store_popularity.astype(np.float32).reshape(
                len(self.store_ids), len(self.item_ids)
            ),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelArtifact:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes())
            return cls(
                item_ids=header["item_ids"],
                item_factors=npz["item_factors"],
                popularity=npz["popularity"],
                store_ids=header["store_ids"],
                store_popularity=npz["store_popularity"],
                params=ModelParams.model_validate(header["params"]),
            )


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True)
class History:
    """A customer's purchases of items the model knows: item indices and, per item, the
    training-style strength (for the folded-in vector) and the "buy again" strength."""

    items: np.ndarray
    strength: np.ndarray
    repeat: np.ndarray

    @property
    def empty(self) -> bool:
        return len(self.items) == 0


@dataclass(frozen=True)
class Ranked:
    """A ranked candidate list: product ids, best first, and why each is there."""

    product_ids: list[str]
    sources: list[Source]
    source: Source
    model_version: int | None = None


class RankingCache:
    """The Recommender's rankings, kept per request shape (a customer's "for you", a product's
    "similar", at a store, for a size) for `ttl_s` and at most `max_entries` (least recently
    used first out). An entry is served only while the model that ranked it is the production
    one (`set_version`), so a promotion or a rollback empties the cache at once. Rankings of no
    model (the store's best sellers before any promotion) are not kept. Pure: the caller gives
    the clock."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.version: int | None = None
        self._entries: OrderedDict[Hashable, tuple[float, Ranked]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def set_version(self, version: int | None) -> None:
        if version != self.version:
            self._entries.clear()
            self.version = version

    def get(self, key: Hashable, now: float) -> Ranked | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, ranked = entry
        if now >= expires:  # its version is the current one: `put` and `set_version` see to that
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return ranked

    def put(self, key: Hashable, ranked: Ranked, now: float) -> None:
        if self.ttl_s <= 0 or ranked.model_version is None or ranked.model_version != self.version:
            return
        self._entries[key] = (now + self.ttl_s, ranked)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


@dataclass
class Scorer:
    """A loaded model: everything a request needs precomputed once."""

    artifact: ModelArtifact
    version: int | None = None
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        a = self.artifact
        self.index = {item: i for i, item in enumerate(a.item_ids)}
        y = a.item_factors.astype(np.float64)
        self._y = y
        # The fold-in's constant part: Y^T Y + lambda I (ALS' user step).
        self._gram = y.T @ y + a.params.regularization * np.eye(y.shape[1])
        norms = np.linalg.norm(y, axis=1)
        self._unit = y / np.where(norms > 0, norms, 1.0)[:, None]
        self._logpop = _scaled_log(a.popularity)
        self._store_rank = {
            store: np.argsort(-(a.store_popularity[s] * 1e6 + a.popularity), kind="stable")
            for s, store in enumerate(a.store_ids)
        }
        self._global_rank = np.argsort(-a.popularity, kind="stable")

    @property
    def params(self) -> ModelParams:
        return self.artifact.params

    def history(
        self, product_ids: Sequence[str], quantities: Sequence[int], ages_s: Sequence[float]
    ) -> History:
        """A customer's order lines (any order, repeats allowed) as a `History` over the items
        the model knows; lines of unknown products are left out."""
        known = [
            (self.index[p], q, a)
            for p, q, a in zip(product_ids, quantities, ages_s, strict=True)
            if p in self.index
        ]
        if not known:
            empty = np.zeros(0)
            return History(np.zeros(0, dtype=np.int64), empty, empty)
        idx = np.array([k[0] for k in known], dtype=np.int64)
        qty = np.array([k[1] for k in known], dtype=np.float64)
        age = np.array([k[2] for k in known], dtype=np.float64)
        items, inverse = np.unique(idx, return_inverse=True)
        strength = np.bincount(inverse, line_weights(qty, age, self.params.half_life_days))
        repeat = np.bincount(inverse, line_weights(qty, age, self.params.repeat_half_life_days))
        return History(items, np.log1p(strength), np.log1p(repeat))

    def user_vector(self, history: History) -> np.ndarray:
        """ALS: the user step for this history (confidence = alpha x strength), as implicit
        solves it. BPR: the strength-weighted mean of the history's item factors."""
        y = self._y[history.items]
        if self.params.algorithm == "bpr":
            w = history.strength / max(float(history.strength.sum()), 1e-12)
            return np.asarray(w @ y)
        confidence = self.params.alpha * history.strength
        a = self._gram + (y.T * (confidence - 1.0)) @ y
        return np.asarray(np.linalg.solve(a, y.T @ confidence))

    def scores(self, history: History, *, repeats: bool) -> np.ndarray:
        """The blended score of every item for this customer; with `repeats=False` the items
        already bought score -inf (for "something new")."""
        raw = self._y @ self.user_vector(history)
        top = float(np.abs(raw).max())
        s = raw / top if top > 0 else raw
        s = s + self.params.w_popularity * self._logpop
        if repeats:
            s[history.items] += self.params.w_repeat * history.repeat
        else:
            s[history.items] = -np.inf
        return s

    def popular(self, store_id: str | None, k: int) -> list[str]:
        """The store's best sellers in the training data, then everyone's."""
        rank = self._store_rank.get(store_id or "", self._global_rank)
        return [self.artifact.item_ids[i] for i in rank[:k]]

    def _top(self, s: np.ndarray, k: int) -> np.ndarray:
        k = min(k, int(np.isfinite(s).sum()))
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        part = np.argpartition(-s, k - 1)[:k]
        return part[np.argsort(-s[part], kind="stable")]

    def top_items(self, history: History, k: int, *, repeats: bool = True) -> np.ndarray:
        """Indices of the `k` best items for this history (the evaluation's entry point)."""
        return self._top(self.scores(history, repeats=repeats), k)

    def for_you(self, history: History, store_id: str | None, k: int) -> Ranked:
        """For a customer: the blend when the model knows something they bought (their own
        purchases marked "buy_again"), else the store's best sellers."""
        if history.empty:
            return self._padded([], [], "popular", store_id, k)
        bought = set(history.items.tolist())
        top = self.top_items(history, k)
        sources: list[Source] = ["buy_again" if i in bought else "als" for i in top.tolist()]
        return self._padded([self.artifact.item_ids[i] for i in top], sources, "als", store_id, k)

    def similar(self, product_id: str, store_id: str | None, k: int) -> Ranked:
        """Items closest to one product by the cosine of their factors."""
        i = self.index.get(product_id)
        if i is None:
            return self._padded([], [], "popular", store_id, k, exclude={product_id})
        s = self._unit @ self._unit[i]
        s[i] = -np.inf
        top = self._top(s, k)
        return self._padded(
            [self.artifact.item_ids[j] for j in top],
            ["als"] * len(top),
            "als",
            store_id,
            k,
            exclude={product_id},
        )

    def basket(self, product_ids: Sequence[str], store_id: str | None, k: int) -> Ranked:
        """What completes a basket: the items a customer holding exactly these would be
        recommended, less the basket itself."""
        known = [self.index[p] for p in product_ids if p in self.index]
        if not known:
            return self._padded([], [], "popular", store_id, k, exclude=set(product_ids))
        items = np.unique(np.array(known, dtype=np.int64))
        ones = np.full(len(items), np.log1p(1.0))
        top = self.top_items(History(items, ones, ones), k, repeats=False)
        return self._padded(
            [self.artifact.item_ids[j] for j in top],
            ["als"] * len(top),
            "als",
            store_id,
            k,
            exclude=set(product_ids),
        )

    def _padded(
        self,
        ids: list[str],
        sources: list[Source],
        source: Source,
        store_id: str | None,
        k: int,
        exclude: set[str] | None = None,
    ) -> Ranked:
        """The ranked list followed by popular items (the store can be out of the first ones),
        without repeats or `exclude`."""
        seen = set(ids) | (exclude or set())
        ids, sources = list(ids), list(sources)
        for item in self.popular(store_id, k + len(seen)):
            if item not in seen:
                seen.add(item)
                ids.append(item)
                sources.append("popular")
        return Ranked(ids, sources, source, self.version)


def _scaled_log(values: np.ndarray) -> np.ndarray:
    logs = np.log1p(np.asarray(values, dtype=np.float64))
    top = float(logs.max()) if len(logs) else 0.0
    return logs / top if top > 0 else logs


# ---------------------------------------------------------------- registry


class ModelNotFound(NotFound):
    code = "model_not_found"


class PromotionRefused(Conflict):
    """The candidate scores worse than production by more than the tolerance."""

    code = "promotion_refused"


class NothingToRollBack(Conflict):
    code = "nothing_to_roll_back"


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: int
    created_at: datetime
    created_by: str
    algorithm: str
    source: str
    data_cutoff: datetime
    params: dict[str, Any]
    metrics: dict[str, Any]
    git_commit: str | None
    users: int
    items: int
    interactions: int
    train_seconds: float
    artifact_sha256: str
    artifact_bytes: int
    production: bool = False


async def register(session: AsyncSession, model: RecommenderModel) -> RecommenderModel:
    session.add(model)
    await session.flush()
    return model


async def production_version(session: AsyncSession) -> int | None:
    """The version serving now (the latest promotion), or None before the first."""
    return await session.scalar(
        select(RecommenderPromotion.version).order_by(RecommenderPromotion.id.desc()).limit(1)
    )


async def get_model(session: AsyncSession, version: int) -> RecommenderModel:
    model = await session.get(RecommenderModel, version)
    if model is None:
        raise ModelNotFound(f"No model version {version}")
    return model


async def load_artifact(session: AsyncSession, version: int) -> bytes:
    data = await session.scalar(select(RecommenderModel.artifact).where(RecommenderModel.version == version))
    if data is None:
        raise ModelNotFound(f"No model version {version}")
    return bytes(data)


async def list_models(session: AsyncSession, limit: int = 50) -> list[ModelOut]:
    """Newest first, production flagged."""
    current = await production_version(session)
    rows = await session.scalars(
        select(RecommenderModel).order_by(RecommenderModel.version.desc()).limit(limit)
    )
    return [ModelOut.model_validate(m).model_copy(update={"production": m.version == current}) for m in rows]


async def _lock_registry(session: AsyncSession) -> None:
    """Promotions and rollbacks one at a time (two promoters cannot both read "production is
    v3" and both record v3 as their previous version)."""
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('recommender_promotions'))"))


async def promote(
    session: AsyncSession, version: int, *, by: str, tolerance: float, force: bool = False
) -> RecommenderPromotion:
    """Make `version` the production model. Refused (`PromotionRefused`) when its primary
    metric is below production's by more than `tolerance`, unless `force`; a no-op refusal
    (`Conflict`) when it already is production."""
    await _lock_registry(session)
    candidate = await get_model(session, version)
    current = await production_version(session)
    if current == version:
        raise Conflict(f"Version {version} is already in production", code="already_in_production")
    if current is not None and not force:
        serving = await get_model(session, current)
        ours, theirs = candidate.metrics.get(PRIMARY_METRIC), serving.metrics.get(PRIMARY_METRIC)
        if theirs is not None and (ours is None or float(ours) < float(theirs) - tolerance):
            raise PromotionRefused(
                f"Version {version} has {PRIMARY_METRIC} {ours} against production v{current}'s {theirs}"
                f" (tolerance {tolerance}); pass force to promote it anyway"
            )
    row = RecommenderPromotion(
        version=version, previous_version=current, action="promote", forced=force, promoted_by=by
    )
    session.add(row)
    await session.flush()
    return row


async def rollback(session: AsyncSession, *, by: str) -> RecommenderPromotion:
    """Return to the version that was production before the current one was promoted (each
    rollback steps one promotion further back)."""
    await _lock_registry(session)
    current = await production_version(session)
    if current is None:
        raise NothingToRollBack("No model has been promoted")
    origin = await session.scalar(
        select(RecommenderPromotion.previous_version)
        .where(RecommenderPromotion.version == current, RecommenderPromotion.action == "promote")
        .order_by(RecommenderPromotion.id.desc())
        .limit(1)
    )
    if origin is None:
        raise NothingToRollBack(f"Version {current} was the first model promoted")
    row = RecommenderPromotion(version=origin, previous_version=current, action="rollback", promoted_by=by)
    session.add(row)
    await session.flush()
    return row


# ---------------------------------------------------------------- serving


class RecommendedProduct(BaseModel):
    id: uuid.UUID
    sku: str
    name: str
    brand: str | None
    unit: str
    image: str | None
    mrp_paise: int
    price_paise: int
    currency: str
    available: int = Field(description="Units the store can sell now (always > 0 here)")
    source: Source = Field(description="Why it is here: `als` (the model), `buy_again`, `popular`")


class Recommendations(BaseModel):
    surface: Surface
    store_id: uuid.UUID
    source: Source = Field(
        description="What produced the list: `als` when the model knew the customer, product or"
        " basket; `popular` (the store's best sellers) when it did not"
    )
    model_version: int | None = Field(description="The model version that ranked it; null before the first")
    items: list[RecommendedProduct]


class StoreNotFound(NotFound):
    code = "store_not_found"


# Newest first; the repeat signal and the folded-in vector weigh recent lines most anyway.
_HISTORY = text(
    """
    SELECT ol.product_id::text, ol.quantity, extract(epoch FROM now() - o.delivered_at)::float8
    FROM orders o JOIN order_lines ol ON ol.order_id = o.id
    WHERE o.user_id = :user_id AND o.status IN ('delivered', 'partially_refunded')
    ORDER BY o.created_at DESC
    LIMIT :limit
    """
)

# What the store can sell now, in the candidates' order.
_SELLABLE = text(
    """
    SELECT p.id, p.sku, p.name, p.brand, p.unit, p.images->>0 AS image, p.mrp_paise, p.price_paise,
           p.currency, i.on_hand - i.reserved AS available, c.ord - 1 AS rank
    FROM unnest(CAST(:ids AS uuid[])) WITH ORDINALITY AS c(id, ord)
    JOIN products p ON p.id = c.id AND p.is_active
    JOIN inventory i ON i.store_id = :store_id AND i.product_id = p.id AND i.on_hand > i.reserved
    JOIN stores s ON s.id = i.store_id AND s.is_active
    ORDER BY c.ord
    LIMIT :limit
    """
)

# Before any model: the store's in-stock products by delivered order lines there.
_BEST_SELLERS = text(
    """
    SELECT p.id::text
    FROM inventory i JOIN products p ON p.id = i.product_id AND p.is_active
    LEFT JOIN LATERAL (
        SELECT count(*) AS n FROM order_lines ol JOIN orders o ON o.id = ol.order_id
        WHERE ol.product_id = p.id AND o.store_id = i.store_id AND o.status = 'delivered'
    ) sold ON true
    WHERE i.store_id = :store_id AND i.on_hand > i.reserved
    ORDER BY sold.n DESC, p.name, p.id
    LIMIT :limit
    """
)


async def history(
    session: AsyncSession, user_id: uuid.UUID, limit: int
) -> tuple[list[str], list[int], list[float]]:
    """This customer's delivered order lines, newest first: product ids, quantities, ages in
    seconds. Only their own orders: "buy again" never sees anyone else's."""
    rows = (await session.execute(_HISTORY, {"user_id": user_id, "limit": limit})).all()
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


async def best_sellers(session: AsyncSession, store_id: uuid.UUID, limit: int) -> list[str]:
    return list((await session.scalars(_BEST_SELLERS, {"store_id": store_id, "limit": limit})).all())


async def sellable(
    session: AsyncSession, store_id: uuid.UUID, ranked: Ranked, limit: int, surface: Surface
) -> Recommendations:
    """The first `limit` candidates the store can sell now (active product, active store,
    available > 0), in the ranked order. An unknown or inactive store is a 404."""
    rows = (
        await session.execute(_SELLABLE, {"ids": ranked.product_ids, "store_id": store_id, "limit": limit})
    ).all()
    if not rows:
        active = await session.scalar(text("SELECT is_active FROM stores WHERE id = :id"), {"id": store_id})
        if not active:
            raise StoreNotFound("No such store")
    items = [
        RecommendedProduct(
            id=r.id,
            sku=r.sku,
            name=r.name,
            brand=r.brand,
            unit=r.unit,
            image=r.image,
            mrp_paise=r.mrp_paise,
            price_paise=r.price_paise,
            currency=r.currency,
            available=r.available,
            source=ranked.sources[r.rank],
        )
        for r in rows
    ]
    return Recommendations(
        surface=surface,
        store_id=store_id,
        source=ranked.source,
        model_version=ranked.model_version,
        items=items,
    )


async def record_impressions(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Served lists, in one statement (a replica's batch)."""
    if rows:
        await session.execute(insert(RecommendationImpression), list(rows))
