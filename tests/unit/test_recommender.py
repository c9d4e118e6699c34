"""The recommender's pipelines without a database or Ray: metrics against hand-computed values,
splits that never leak test purchases into training, a deterministic dataset build, the
artifact's round trip, the serving fold-in against implicit's own, the blend on a weekly buyer,
the evaluation and the search on small synthetic data, and the Online Retail cleaning."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from threadpoolctl import threadpool_limits

from models.recommender import History, ModelArtifact, ModelParams, Ranked, RankingCache, Scorer
from pipelines.recommender import cli, metrics
from pipelines.recommender.data import Dataset, Events, build, online_retail_events
from pipelines.recommender.evaluation import MODELS, evaluate_split, recommend_ours
from pipelines.recommender.pipeline import train_offline
from pipelines.recommender.report import render
from pipelines.recommender.search import random_search, sample_params
from pipelines.recommender.splits import new_items_split, time_split, validation_split
from pipelines.recommender.training import Fitted, fit, fit_matrix, params_from

DAY = 86_400.0
START = 1_700_000_000.0
SMALL = ModelParams(factors=8, iterations=6, regularization=0.05)


def synthetic(
    seed: int = 0, users: int = 80, clusters: int = 4, per_cluster: int = 10, weeks: int = 30
) -> Events:
    """Grocery-like lines: each customer belongs to a cluster of items, buys two staples of it
    most weeks and now and then something else from it; a few items sell everywhere."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, int, float, str]] = []
    for u in range(users):
        cluster = u % clusters
        items = [f"i{cluster * per_cluster + j:03d}" for j in range(per_cluster)]
        staples = rng.choice(items, size=2, replace=False)
        store = f"s{u % 2}"
        for week in range(weeks):
            day = START + week * 7 * DAY + float(rng.integers(0, int(6 * DAY)))
            for item in staples:
                if rng.random() < 0.8:
                    rows.append((f"u{u:03d}", str(item), int(rng.integers(1, 4)), day, store))
            if rng.random() < 0.4:
                rows.append((f"u{u:03d}", str(rng.choice(items)), 1, day + 60, store))
            if rng.random() < 0.1:
                rows.append((f"u{u:03d}", f"g{int(rng.integers(0, 3))}", 1, day + 120, store))
    return Events.of(*zip(*rows, strict=True))


# ---------------------------------------------------------------- metrics


def test_metrics_equal_a_hand_computed_example() -> None:
    recommended = ["a", "b", "c", "d"]
    relevant = frozenset({"a", "c", "x"})
    # Hits at positions 1 and 3 of 10; three relevant items, one never recommended.
    assert metrics.precision_at_k(recommended, relevant) == pytest.approx(2 / 10)
    assert metrics.recall_at_k(recommended, relevant) == pytest.approx(2 / 3)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # 2.1309
    assert metrics.ndcg_at_k(recommended, relevant) == pytest.approx((1 + 1 / math.log2(4)) / ideal)
    assert metrics.ndcg_at_k(recommended, relevant) == pytest.approx(0.70392, abs=1e-5)
    assert metrics.average_precision_at_k(recommended, relevant) == pytest.approx((1 / 1 + 2 / 3) / 3)
    # At k = 2 only "a" counts, and AP divides by min(|R|, k) = 2.
    assert metrics.precision_at_k(recommended, relevant, 2) == pytest.approx(0.5)
    assert metrics.ndcg_at_k(recommended, relevant, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert metrics.average_precision_at_k(recommended, relevant, 2) == pytest.approx(0.5)
    # A perfect list scores 1 everywhere but precision (two relevant items, ten slots).
    assert metrics.ndcg_at_k(["x", "y"], frozenset({"x", "y"})) == pytest.approx(1.0)
    assert metrics.average_precision_at_k(["x", "y"], frozenset({"x", "y"})) == pytest.approx(1.0)

    # Averaged over two customers; coverage over a catalog of five; popularity percentiles
    # (popularity 1, 2, 3, 4, 5 -> 0, .25, .5, .75, 1).
    catalog, popularity = ["a", "b", "c", "d", "e"], np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    m = metrics.evaluate_lists(
        [["a", "b"], ["e"]], [frozenset({"b"}), frozenset({"e", "a"})], catalog, popularity
    )
    assert m.users == 2
    assert m.precision10 == pytest.approx((1 / 10 + 1 / 10) / 2)
    assert m.recall10 == pytest.approx((1 + 1 / 2) / 2)
    assert m.ndcg10 == pytest.approx((1 / math.log2(3) + 1 / (1 + 1 / math.log2(3))) / 2)
    assert m.map10 == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m.coverage == pytest.approx(3 / 5)
    assert m.popularity_bias == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    assert metrics.long_tail_profile([["a", "b"], ["e"]], catalog, popularity, bins=2) == pytest.approx(
        [1 / 3, 2 / 3]
    )


# ---------------------------------------------------------------- splits


def _lines(events: Events) -> set[tuple[str, str, float]]:
    return set(zip(events.user.tolist(), events.item.tolist(), events.ts.tolist(), strict=True))


def test_time_split_never_leaks_test_purchases_into_training() -> None:
    events = synthetic()
    split = time_split(events, 0.8)
    assert split.cutoff == pytest.approx(np.quantile(events.ts, 0.8))
    assert (split.train.ts < split.cutoff).all()
    test = events.since(split.cutoff)
    assert len(split.train) + len(test) == len(events)
    assert not _lines(split.train) & _lines(test)
    # Relevant sets come only from the test period; customers have lines on both sides.
    after = {(u, i) for u, i, _ in _lines(test)}
    trained_users = set(split.train.user.tolist())
    for user, relevant in zip(split.users.tolist(), split.relevant, strict=True):
        assert relevant and user in trained_users
        assert all((user, item) in after for item in relevant)
    # Training the model only ever sees the training lines.
    dataset = build(events, split.cutoff, SMALL)
    assert dataset.matrix.nnz == len({(u, i) for u, i, _ in _lines(split.train)})

    validation = validation_split(split, 0.8)
    assert validation.cutoff < split.cutoff
    assert (validation.train.ts < validation.cutoff).all()
    assert _lines(validation.train) <= _lines(split.train)
    # ... and its relevant items were bought between the two cut-offs.
    between = split.train.since(validation.cutoff)
    window = set(zip(between.user.tolist(), between.item.tolist(), strict=True))
    for user, relevant in zip(validation.users.tolist(), validation.relevant, strict=True):
        assert all((user, item) in window for item in relevant)


def test_new_items_split_keeps_only_items_new_to_the_customer() -> None:
    events = synthetic()
    cutoff = float(np.quantile(events.ts, 0.6))
    split = new_items_split(events, cutoff)
    assert split.exclude_bought
    assert (split.train.ts < cutoff).all()
    bought = {(u, i) for u, i, _ in _lines(split.train)}
    for user, relevant in zip(split.users.tolist(), split.relevant, strict=True):
        assert relevant
        assert not any((user, item) in bought for item in relevant)
    # A datetime cut-off is the same split.
    as_date = new_items_split(events, datetime.fromtimestamp(cutoff).astimezone())
    assert as_date.users.tolist() == split.users.tolist()


# ---------------------------------------------------------------- dataset


def test_dataset_build_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    events = synthetic()
    cutoff = float(np.quantile(events.ts, 0.9))
    first = build(events, cutoff, SMALL)
    shuffled = events.take(np.random.default_rng(1).permutation(len(events)))
    second = build(shuffled, cutoff, SMALL)
    for a, b in ((first, second), (first, _saved(first, tmp_path))):
        assert a.user_ids.tolist() == b.user_ids.tolist() == sorted(set(events.before(cutoff).user.tolist()))
        assert a.item_ids.tolist() == b.item_ids.tolist()
        assert (a.matrix.indptr == b.matrix.indptr).all() and (a.matrix.indices == b.matrix.indices).all()
        assert a.matrix.data.tobytes() == b.matrix.data.tobytes()
        assert (a.popularity == b.popularity).all() and (a.store_popularity == b.store_popularity).all()
        assert a.store_ids.tolist() == b.store_ids.tolist() == ["s0", "s1"]
    # Strength: log1p of the summed line weights, as the Scorer computes it for serving.
    scorer = Scorer(first.artifact(np.zeros((len(first.item_ids), 2)), SMALL))
    user = first.user_ids[3]
    mine = events.before(cutoff).take(events.before(cutoff).user == user)
    history = scorer.history(mine.item.tolist(), mine.quantity.tolist(), (cutoff - mine.ts).tolist())
    row = first.matrix[3]
    assert row.indices.tolist() == history.items.tolist()
    assert row.data == pytest.approx(history.strength, rel=1e-6)
    # Popularity: distinct customers per item.
    before = events.before(cutoff)
    item = first.item_ids[0]
    assert first.popularity[0] == len(set(before.user[before.item == item].tolist()))
    # Events round trip too.
    events.save(tmp_path / "events.npz")
    again = Events.load(tmp_path / "events.npz")
    assert again.user.tolist() == events.user.tolist() and again.ts.tolist() == events.ts.tolist()


def _saved(dataset: Dataset, tmp_path: Path) -> Dataset:
    dataset.save(tmp_path / "dataset")
    return Dataset.load(tmp_path / "dataset")


# ---------------------------------------------------------------- training and scoring


@pytest.fixture(scope="module")
def trained() -> tuple[Dataset, Fitted]:
    events = synthetic()
    dataset = build(events, float(events.ts.max()) + 1, SMALL)
    return dataset, fit(dataset, SMALL, threads=1)


def test_artifact_round_trip(trained: tuple[Dataset, Fitted]) -> None:
    dataset, fitted = trained
    artifact = fitted.artifact
    for original in (
        artifact,
        ModelArtifact(
            **{**vars(artifact), "store_ids": [], "store_popularity": np.zeros((0, len(artifact.item_ids)))}
        ),
    ):
        back = ModelArtifact.from_bytes(original.to_bytes())
        assert back.item_ids == original.item_ids and back.store_ids == original.store_ids
        assert back.params == original.params
        assert np.array_equal(back.item_factors, original.item_factors)
        assert np.array_equal(back.popularity, original.popularity)
        assert back.store_popularity.shape == (len(original.store_ids), len(original.item_ids))
    assert artifact.item_factors.shape == (len(dataset.item_ids), SMALL.factors)


def test_scorer_fold_in_equals_implicit_recalculate_user(trained: tuple[Dataset, Fitted]) -> None:
    dataset, fitted = trained
    model = fitted.model
    scorer = Scorer(fitted.artifact)
    for u in (0, 7, 33):
        row = dataset.matrix[u]
        history = History(
            row.indices.astype(np.int64), row.data.astype(np.float64), row.data.astype(np.float64)
        )
        with threadpool_limits(1, "blas"):
            theirs = model.recalculate_user(u, row)
        ours = scorer.user_vector(history)
        assert np.allclose(ours, theirs, rtol=1e-3, atol=1e-4)
        # ... and implicit's trained user factors are about the same vector.
        assert np.corrcoef(ours, model.user_factors[u])[0, 1] > 0.99


def test_blend_ranks_a_weekly_purchase_first(trained: tuple[Dataset, Fitted]) -> None:
    _, fitted = trained
    scorer = Scorer(fitted.artifact)
    # Bread every week for ten weeks, two one-off items from another cluster long ago.
    weekly = "i013"
    products = [weekly] * 10 + ["i021", "i025"]
    ages = [7 * DAY * w + DAY for w in range(10)] + [150 * DAY, 160 * DAY]
    history = scorer.history(products, [1] * len(products), ages)
    top = scorer.top_items(history, 5)
    assert scorer.artifact.item_ids[top[0]] == weekly
    # Without repeats (something new), it is never shown at all.
    fresh = scorer.top_items(history, 5, repeats=False).tolist()
    assert scorer.index[weekly] not in fresh and scorer.index["i021"] not in fresh


# ---------------------------------------------------------------- evaluation and search


def test_evaluation_on_a_tiny_synthetic_dataset() -> None:
    events = synthetic()
    split = time_split(events, 0.85)
    result = evaluate_split(split, SMALL, threads=1)
    assert set(result.metrics) == set(MODELS)
    assert result.users == len(split) > 0
    ours, popular = result.metrics["ours"], result.metrics["popularity"]
    for m in result.metrics.values():
        assert m.users == len(split)
        assert 0 <= m.ndcg10 <= 1 and 0 <= m.coverage <= 1 and 0 <= m.popularity_bias <= 1
        assert sum(result.long_tail["ours"]) == pytest.approx(1.0)
    # Customers rebuy their staples: the blend and buy-again beat the best sellers by far.
    assert ours.ndcg10 > 2 * popular.ndcg10
    assert result.metrics["buy_again"].ndcg10 > 2 * popular.ndcg10
    assert popular.coverage < ours.coverage
    # "ours" is the Scorer's own ranking, list for list.
    dataset = build(split.train, split.cutoff, SMALL)
    again = recommend_ours(Scorer(fit(dataset, SMALL, threads=1).artifact), split)
    assert len(again) == len(split) and all(len(r) == 10 for r in again)

    # On new items, bought ones are never recommended: buy-again is popularity there.
    new = new_items_split(events, float(np.quantile(events.ts, 0.7)))
    on_new = evaluate_split(new, SMALL, threads=1, models=("popularity", "buy_again"))
    assert on_new.metrics["popularity"] == on_new.metrics["buy_again"]


def test_search_and_offline_training_report() -> None:
    events = synthetic(users=48)
    assert sample_params(SMALL, 3, 42)[0] == SMALL
    trained = train_offline(events, SMALL, float(events.ts.max()) + 1, source="orders", search=2, threads=1)
    search = trained.evaluation.search
    assert search is not None and len(search.fits) == 2 and len(search.trials) == 4
    assert search.validation_cutoff < trained.evaluation.time.cutoff
    assert search.best.ndcg10 >= search.fits[0].ndcg10  # the base is always among the points
    assert trained.params == search.best.params
    assert trained.dataset.shape[0] == len(set(events.user.tolist()))
    metrics_json = trained.evaluation.metrics()
    assert metrics_json["ndcg10"] == trained.evaluation.time.metrics["ours"].ndcg10
    report = render(trained.evaluation, {"version": 7, "source": "orders"})
    assert report.markdown.startswith("# Recommender model v7")
    assert report.html.count("<svg") == 4 and "NDCG@10" in report.markdown
    alone = random_search(time_split(events), SMALL, 1, threads=1)
    assert [t.stage for t in alone.trials] == ["fit", "blend"]


def test_fit_matrix_pins_blas_and_is_reproducible(trained: tuple[Dataset, Fitted]) -> None:
    dataset, fitted = trained
    model, _ = fit_matrix(dataset.matrix, SMALL, threads=1)
    assert np.array_equal(model.item_factors, fitted.model.item_factors)


# ---------------------------------------------------------------- sources, parameters, CLI


def test_online_retail_lines_are_cleaned_like_the_catalog_and_mapped_by_sku(tmp_path: Path) -> None:
    rows = [
        ("536365", "85123A", "WHITE HANGING HEART T-LIGHT HOLDER", 6, datetime(2011, 1, 2, 8), 2.55, 17850.0),
        (
            "536366",
            "85123a ",
            "WHITE HANGING HEART T-LIGHT HOLDER",
            2,
            datetime(2011, 1, 3, 8),
            2.55,
            13047.0,
        ),
        ("C536379", "85123A", "WHITE HANGING HEART T-LIGHT HOLDER", -1, datetime(2011, 1, 4), 2.55, 17850.0),
        ("536380", "22556", "PLASTERS IN TIN CIRCUS PARADE", 12, datetime(2011, 1, 5), 1.65, None),
        ("536381", "POST", "POSTAGE", 1, datetime(2011, 1, 6), 18.0, 17850.0),
        ("536382", "22557", "PLASTERS IN TIN VINTAGE PAISLEY", 3, datetime(2011, 1, 7), 1.65, 13047.0),
    ]
    columns = list(zip(*rows, strict=True))
    path = tmp_path / "or.parquet"
    pq.write_table(
        pa.table(
            {
                "InvoiceNo": pa.array(columns[0], pa.string()),
                "StockCode": pa.array(columns[1], pa.string()),
                "Description": pa.array(columns[2], pa.string()),
                "Quantity": pa.array(columns[3], pa.int64()),
                "InvoiceDate": pa.array(columns[4], pa.timestamp("us")),
                "UnitPrice": pa.array(columns[5], pa.float64()),
                "CustomerID": pa.array(columns[6], pa.float64()),
            }
        ),
        path,
    )
    events = online_retail_events(path)
    assert events.user.tolist() == ["or:17850", "or:13047", "or:13047"]
    assert events.item.tolist() == ["85123A", "85123A", "22557"]
    assert events.quantity.tolist() == [6, 2, 3]
    assert events.ts[0] == datetime(2011, 1, 2, 8).replace(tzinfo=UTC).timestamp()
    assert events.store.tolist() == ["", "", ""]
    mapped = online_retail_events(path, {"85123A": "p-heart"})
    assert mapped.item.tolist() == ["p-heart", "p-heart"]


def test_parameters_from_config_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "rec.toml"
    toml.write_text("[params]\nfactors = 32\nalpha = 2.0\n\n[search]\ntrials = 5\n")
    from pipelines.recommender.runtime import resolve_params

    params, trials = resolve_params({"alpha": 4.0}, toml)
    assert (params.factors, params.alpha, trials) == (32, 4.0, 5)
    assert params_from({"factors": 16}).factors == 16
    with pytest.raises(ValueError):
        params_from({"factor": 16})
    args = cli.parser().parse_args(["train", "--source", "online-retail", "--factors", "8", "--search", "3"])
    assert (args.source, args.factors, args.search, args.promote) == ("online-retail", 8, 3, False)
    assert cli.parser().parse_args(["promote", "4", "--force"]).version == 4


def _ranked(version: int | None, *ids: str) -> Ranked:
    return Ranked(list(ids), ["als"] * len(ids), "als", version)


def test_ranking_cache_serves_an_entry_until_it_expires():
    cache = RankingCache(ttl_s=30, max_entries=10)
    cache.set_version(3)
    cache.put("a", _ranked(3, "p1", "p2"), now=100.0)
    assert cache.get("a", now=129.9) == _ranked(3, "p1", "p2")
    assert cache.get("a", now=130.0) is None
    assert len(cache) == 0  # the expired entry is gone, not kept behind


def test_ranking_cache_keeps_only_the_production_models_rankings():
    cache = RankingCache(ttl_s=30, max_entries=10)
    cache.put("before any version is known", _ranked(3, "p1"), now=0.0)
    cache.set_version(3)
    cache.put("of no model", _ranked(None, "p1"), now=0.0)
    cache.put("of a pinned or older model", _ranked(2, "p1"), now=0.0)
    assert len(cache) == 0
    cache.put("a", _ranked(3, "p1"), now=0.0)
    cache.set_version(3)  # the same version again keeps what is there
    assert cache.get("a", now=1.0) is not None
    cache.set_version(4)  # a promotion (or a rollback) empties it at once
    assert len(cache) == 0 and cache.get("a", now=1.0) is None


def test_ranking_cache_drops_the_least_recently_used_beyond_its_size():
    cache = RankingCache(ttl_s=30, max_entries=2)
    cache.set_version(1)
    cache.put("a", _ranked(1, "p1"), now=0.0)
    cache.put("b", _ranked(1, "p2"), now=0.0)
    assert cache.get("a", now=1.0) is not None  # "b" is now the least recently used
    cache.put("c", _ranked(1, "p3"), now=1.0)
    assert len(cache) == 2
    assert cache.get("b", now=1.0) is None
    assert cache.get("a", now=1.0) is not None and cache.get("c", now=1.0) is not None


def test_ranking_cache_with_no_lifetime_keeps_nothing():
    cache = RankingCache(ttl_s=0, max_entries=10)
    cache.set_version(1)
    cache.put("a", _ranked(1, "p1"), now=0.0)
    assert len(cache) == 0
