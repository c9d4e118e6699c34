"""Recommendations through the real stack: the search ingress, the Recommender deployment and the
registry in PostgreSQL. Models made here by hand (two-factor items over test products) make the
expected rankings exact; the module puts production back as it found it."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from models import recommender
from models.db import make_engine, make_sessionmaker
from models.recommender import ModelArtifact, ModelParams, RecommenderModel
from tests.conftest import Live, Session
from tests.service.shop import Shop, add, add_address, make_product, make_shop, set_stock
from tests.service.test_orders import wait_for

pytestmark = pytest.mark.usefixtures("live")


def _run(live: Live, work: Any) -> Any:
    async def go() -> Any:
        engine = make_engine(live.database_url, pool_size=1, max_overflow=0)
        try:
            async with make_sessionmaker(engine)() as session, session.begin():
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def register(live: Live, items: list[str], factors: list[tuple[float, float]], ndcg: float = 0.5) -> int:
    """A hand-made model version over `items`, with these two-dimensional factors."""
    artifact = ModelArtifact(
        item_ids=items,
        item_factors=np.array(factors, dtype=np.float32),
        popularity=np.arange(len(items), 0, -1, dtype=np.float32),
        store_ids=[],
        store_popularity=np.zeros((0, len(items)), dtype=np.float32),
        params=ModelParams(factors=2, w_popularity=0.0),
    )
    data = artifact.to_bytes()
    model = RecommenderModel(
        created_by="test",
        algorithm="als",
        source="orders",
        data_cutoff=datetime.now(UTC),
        params=artifact.params.model_dump(),
        metrics={"ndcg10": ndcg},
        users=0,
        items=len(items),
        interactions=0,
        train_seconds=0.0,
        artifact_sha256=hashlib.sha256(data).hexdigest(),
        artifact_bytes=len(data),
        artifact=data,
    )

    async def work(session: Any) -> int:
        return (await recommender.register(session, model)).version

    return int(_run(live, work))


def promote(live: Live, version: int, force: bool = True) -> None:
    async def work(session: Any) -> None:
        await recommender.promote(session, version, by="test", tolerance=0.01, force=force)

    _run(live, work)


def production(live: Live) -> int | None:
    return _run(live, recommender.production_version)  # type: ignore[no-any-return]


@pytest.fixture(scope="module", autouse=True)
def restore_production(live: Live) -> Iterator[None]:
    before = production(live)
    yield
    if before is not None and production(live) != before:
        promote(live, before)


@pytest.fixture(scope="module")
def shop(live: Live) -> Shop:
    return make_shop(live, "recommendations-test")


@pytest.fixture(scope="module")
def catalog(live: Live, shop: Shop) -> dict[str, str]:
    """p0..p5 at store A except: p2 sold out there, p3 stocked only at store B, p5 inactive."""
    products = {
        "p0": make_product(live, shop, price=1000),
        "p1": make_product(live, shop, price=1000),
        "p2": make_product(live, shop, price=1000, stock_a=3, reserved_a=3),
        "p3": make_product(live, shop, price=1000, stock_a=None, stock_b=5),
        "p4": make_product(live, shop, price=1000),
        "p5": make_product(live, shop, price=1000, active=False),
    }
    return products


def model_a(live: Live, c: dict[str, str]) -> int:
    """Closest to p0, in order: p5, p1, p2, p3, p4."""
    names = ["p0", "p5", "p1", "p2", "p3", "p4"]
    angles = [0.0, 0.05, 0.1, 0.2, 0.3, 1.2]
    return register(live, [c[n] for n in names], [(np.cos(a), np.sin(a)) for a in angles])


def model_b(live: Live, c: dict[str, str]) -> int:
    """Closest to p0: p4, then p1."""
    names = ["p0", "p4", "p1"]
    angles = [0.0, 0.1, 1.0]
    return register(live, [c[n] for n in names], [(np.cos(a), np.sin(a)) for a in angles])


def similar(client: Any, pid: str, store: dict[str, Any], **params: Any) -> Any:
    return client.get(f"/search/recommendations/similar/{pid}", params={"store_id": store["id"], **params})


def serving(live: Live, version: int, pid: str, store: dict[str, Any]) -> None:
    with live.client() as client:
        wait_for(
            lambda: similar(client, pid, store).json().get("model_version") == version, 15, f"v{version}"
        )


def test_similar_keeps_only_what_the_store_can_sell_now(
    live: Live, shop: Shop, catalog: dict[str, str]
) -> None:
    version = model_a(live, catalog)
    promote(live, version)
    serving(live, version, catalog["p0"], shop.store_a)
    with live.client() as client:
        body = similar(client, catalog["p0"], shop.store_a).json()
        # p5 inactive, p2 sold out (all reserved), p3 not stocked at A; p0 itself never.
        assert [i["id"] for i in body["items"]] == [catalog["p1"], catalog["p4"]]
        assert body["source"] == "als" and body["surface"] == "similar"
        assert all(i["source"] == "als" and i["available"] > 0 for i in body["items"])
        at_b = similar(client, catalog["p0"], shop.store_b).json()
        assert [i["id"] for i in at_b["items"]] == [catalog["p3"]]
        # Stock changes count at once: p2 back on the shelf at A.
        set_stock(live, shop.store_a, catalog["p2"], 4)
        try:
            again = similar(client, catalog["p0"], shop.store_a).json()
            assert [i["id"] for i in again["items"]] == [catalog["p1"], catalog["p2"], catalog["p4"]]
        finally:
            set_stock(live, shop.store_a, catalog["p2"], 3, 3)
        assert len(similar(client, catalog["p0"], shop.store_a, limit=1).json()["items"]) == 1


def test_bad_requests_are_clear(live: Live, shop: Shop, catalog: dict[str, str]) -> None:
    with live.client() as client:
        missing_store = client.get(f"/search/recommendations/similar/{catalog['p0']}")
        assert missing_store.status_code == 422 and missing_store.json()["code"] == "store_required"
        unknown_store = similar(client, catalog["p0"], {"id": str(uuid.uuid4())})
        assert unknown_store.status_code == 404 and unknown_store.json()["code"] == "store_not_found"
        unknown_product = similar(client, str(uuid.uuid4()), shop.store_a)
        assert unknown_product.status_code == 404
        too_many = similar(client, catalog["p0"], shop.store_a, limit=51)
        assert too_many.status_code == 422
        anonymous_basket = client.get(
            "/search/recommendations/basket", params={"store_id": shop.store_a["id"]}
        )
        assert anonymous_basket.status_code == 401


def test_a_product_the_model_does_not_know_gets_the_stores_best_sellers(
    live: Live, shop: Shop, catalog: dict[str, str]
) -> None:
    fresh = make_product(live, shop, price=500)
    with live.client() as client:
        body = similar(client, fresh, shop.store_a).json()
    assert body["source"] == "popular"
    assert fresh not in {i["id"] for i in body["items"]}
    assert {i["source"] for i in body["items"]} == {"popular"}


def test_hot_swap_under_load_loses_nothing_and_never_mixes_versions(
    live: Live, shop: Shop, catalog: dict[str, str]
) -> None:
    first, second = model_a(live, catalog), model_b(live, catalog)
    expected = {first: [catalog["p1"], catalog["p4"]], second: [catalog["p4"], catalog["p1"]]}
    promote(live, first)
    serving(live, first, catalog["p0"], shop.store_a)
    seen: list[tuple[int, int | None, list[str]]] = []
    stop = threading.Event()

    def hammer() -> None:
        with live.client() as client:
            while not stop.is_set():
                r = similar(client, catalog["p0"], shop.store_a)
                body = r.json()
                seen.append(
                    (r.status_code, body.get("model_version"), [i["id"] for i in body.get("items", [])])
                )

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) > 40, 30, "traffic before the swap")
        promote(live, second)
        wait_for(lambda: any(v == second for _, v, _ in seen[-8:]), 20, "the new version under load")
        wait_for(lambda: len(seen) > 40 + 40, 30, "traffic after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert {status for status, _, _ in seen} == {200}
    assert {version for _, version, _ in seen} == {first, second}
    for _, version, items in seen:
        assert version is not None and items == expected[version]


def delivered_order(live: Live, user: Session, store: dict[str, Any], pid: str, days_ago: int) -> None:
    """A delivered order of one line, written directly (its path through checkout and delivery
    is tested elsewhere)."""
    oid = str(uuid.uuid4())
    live.sql(
        "INSERT INTO orders (id, user_id, store_id, delivery_address, status, payment_method, items_mrp_paise,"
        " subtotal_paise, coupon_discount_paise, taxable_value_paise, gst_paise, delivery_fee_paise,"
        " small_cart_fee_paise, tip_paise, total_paise, reservation, cart_version, created_at, updated_at,"
        " placed_at, delivered_at)"
        " VALUES (:id, :u, :s, '{}', 'delivered', 'online', 1000, 1000, 0, 952, 48, 0, 0, 0, 1000, 'fulfilled',"
        " now() - make_interval(days => :d), now() - make_interval(days => :d), now(),"
        " now() - make_interval(days => :d), now() - make_interval(days => :d))",
        id=oid,
        u=user.user_id,
        s=store["id"],
        d=days_ago,
    )
    live.sql(
        "INSERT INTO order_lines (order_id, product_id, position, name, unit, quantity, unit_price_paise,"
        " unit_mrp_paise, tax_rate_bp, line_total_paise, coupon_discount_paise, taxable_value_paise, gst_paise)"
        " VALUES (:o, :p, 0, 'x', '1 pc', 2, 500, 500, 500, 1000, 0, 952, 48)",
        o=oid,
        p=pid,
    )


def for_you(client: Any, store: dict[str, Any], user: Session | None = None, **params: Any) -> Any:
    headers = user.auth if user is not None else {}
    return client.get("/search/recommendations", params={"store_id": store["id"], **params}, headers=headers)


def test_for_you_buys_again_only_from_the_customers_own_orders(
    live: Live, shop: Shop, catalog: dict[str, str]
) -> None:
    version = model_a(live, catalog)
    promote(live, version)
    serving(live, version, catalog["p0"], shop.store_a)
    regular, newcomer = live.login(), live.login()
    for days in (2, 9, 16, 23):
        delivered_order(live, regular, shop.store_a, catalog["p4"], days)
    with live.client() as client:
        mine = for_you(client, shop.store_a, regular).json()
        theirs = for_you(client, shop.store_a, newcomer).json()
        anonymous = for_you(client, shop.store_a).json()
    assert mine["model_version"] == version and mine["source"] == "als"
    assert mine["items"][0]["id"] == catalog["p4"] and mine["items"][0]["source"] == "buy_again"
    # The newcomer's list is the store's best sellers, with nothing marked as theirs.
    for body in (theirs, anonymous):
        assert body["source"] == "popular"
        assert {i["source"] for i in body["items"]} == {"popular"}
    # Nothing anyone is shown is out of stock at the store.
    sellable = {catalog["p0"], catalog["p1"], catalog["p4"]}
    for body in (mine, theirs, anonymous):
        assert {i["id"] for i in body["items"]} <= sellable


def test_for_you_reuses_its_ranking_until_the_customer_asks_for_a_fresh_one(
    live: Live, shop: Shop, catalog: dict[str, str]
) -> None:
    """The search replica keeps a customer's ranking (VURKSHA_RECOMMENDER_CACHE_SECONDS): an order
    delivered since does not show until it expires, or until `Cache-Control: no-cache`."""
    version = model_a(live, catalog)
    promote(live, version)
    serving(live, version, catalog["p0"], shop.store_a)
    customer = live.login()
    delivered_order(live, customer, shop.store_a, catalog["p4"], 3)

    def sources(**headers: str) -> dict[str, str]:
        r = client.get(
            "/search/recommendations",
            params={"store_id": shop.store_a["id"]},
            headers={**customer.auth, **headers},
        )
        assert r.status_code == 200 and r.json()["model_version"] == version
        return {i["id"]: i["source"] for i in r.json()["items"]}

    with live.client() as client:
        first = sources()
        assert sources() == first and first[catalog["p4"]] == "buy_again"
        assert first.get(catalog["p1"]) != "buy_again"
        delivered_order(live, customer, shop.store_a, catalog["p1"], 1)
        assert sources() == first  # the kept ranking
        fresh = sources(**{"Cache-Control": "no-cache"})
        assert fresh[catalog["p1"]] == "buy_again" and fresh[catalog["p4"]] == "buy_again"
        assert sources() == fresh  # the fresh ranking replaced the kept one


def test_basket_completes_the_cart_and_impressions_are_logged(
    live: Live, shop: Shop, catalog: dict[str, str]
) -> None:
    version = model_a(live, catalog)
    promote(live, version)
    serving(live, version, catalog["p0"], shop.store_a)
    user = live.login()
    address = add_address(user, shop.store_a)
    assert add(user, catalog["p0"]).status_code == 200
    with live.client() as client:
        # The store serving the address given (or the cart's chosen one).
        r = client.get(
            "/search/recommendations/basket", params={"address_id": address, "limit": 5}, headers=user.auth
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["surface"] == "basket" and body["model_version"] == version
    ids = [i["id"] for i in body["items"]]
    assert catalog["p0"] not in ids and ids[:2] == [catalog["p1"], catalog["p4"]]
    logged = wait_for(
        lambda: live.sql(
            "SELECT model_version, product_ids::text[], sources FROM recommendation_impressions"
            " WHERE user_id = :u AND surface = 'basket'",
            u=user.user_id,
        ),
        10,
        "the impression",
    )
    assert logged[0][0] == version and list(logged[0][1]) == ids and len(logged[0][2]) == len(ids)


def test_someone_elses_address_is_not_found(live: Live, shop: Shop) -> None:
    owner, other = live.login(), live.login()
    address = add_address(owner, shop.store_a)
    with live.client() as client:
        r = client.get("/search/recommendations", params={"address_id": address}, headers=other.auth)
    assert r.status_code == 404, r.text


def test_the_seeded_model_serves_a_demo_customer(live: Live) -> None:
    """`make run`'s promise: the seed imported purchase histories and promoted a first model, so a
    demo customer named in the banner gets ALS results at a seeded store."""
    from pipelines.seed import DEMO_CUSTOMERS

    assert live.sql("SELECT count(*) FROM recommender_promotions")[0][0] >= 1
    seeded = live.sql("SELECT version FROM recommender_promotions ORDER BY id LIMIT 1")[0][0]
    phone = str(DEMO_CUSTOMERS[0]["phone"])
    session = live.login(phone)
    store = live.sql("SELECT store_id FROM orders WHERE user_id = :u LIMIT 1", u=session.user_id)[0][0]
    promote(live, seeded)
    with live.client() as client:
        wait_for(
            lambda: for_you(client, {"id": str(store)}, session).json().get("model_version") == seeded,
            15,
            "seeded",
        )
        body = for_you(client, {"id": str(store)}, session, limit=20).json()
    assert body["source"] == "als"
    assert len(body["items"]) == 20
    # Her regular purchases lead (the blend's "buy again"); whatever is marked so is hers.
    assert body["items"][0]["source"] == "buy_again"
    bought = {
        str(r[0])
        for r in live.sql(
            "SELECT DISTINCT ol.product_id FROM orders o JOIN order_lines ol ON ol.order_id = o.id"
            " WHERE o.user_id = :u",
            u=session.user_id,
        )
    }
    assert all(
        (i["source"] == "buy_again") == (i["id"] in bought) for i in body["items"] if i["source"] != "popular"
    )


def test_pipeline_trains_evaluates_promotes_refuses_worse_and_rolls_back(live: Live, tmp_path: Any) -> None:
    """A data scientist's loop on the demo histories, through the Python API the CLI wraps: the
    route serves each promoted version; a clearly worse model is refused; rollback goes back."""
    from config.settings import get_settings
    from models.recommender import PromotionRefused
    from pipelines import recommender as rec
    from pipelines.seed import DEMO_CUSTOMERS

    settings = get_settings().model_copy(update={"database_url": live.database_url})
    customer = live.login(str(DEMO_CUSTOMERS[0]["phone"]))
    store = {
        "id": str(
            live.sql("SELECT store_id FROM orders WHERE user_id = :u LIMIT 1", u=customer.user_id)[0][0]
        )
    }

    def served() -> int | None:
        with live.client() as client:
            return for_you(client, store, customer).json().get("model_version")  # type: ignore[no-any-return]

    before = production(live)
    good = rec.train(source="orders", by="test", progress=False, settings=settings, report_dir=tmp_path)
    assert good.version is not None and not good.promoted
    assert good.metrics["ndcg10"] > 0 and (tmp_path / "report.html").read_text().count("<svg") >= 1
    stored = live.sql(
        "SELECT metrics->>'ndcg10', report IS NOT NULL FROM recommender_models WHERE version = :v",
        v=good.version,
    )
    assert float(stored[0][0]) == pytest.approx(good.metrics["ndcg10"]) and stored[0][1]
    again = rec.evaluate(good.version, progress=False, settings=settings)
    assert again.evaluation.metrics()["ndcg10"] == pytest.approx(good.metrics["ndcg10"], abs=0.02)

    rec.promote(good.version, force=True, by="test", settings=settings)
    wait_for(lambda: served() == good.version, 15, "the promoted version")

    worse = rec.train(
        source="orders",
        params={"factors": 2, "iterations": 1, "w_repeat": 0.0, "w_popularity": 0.0},
        promote=True,
        by="test",
        progress=False,
        settings=settings,
    )
    assert worse.version is not None and not worse.promoted and worse.promotion_refused
    with pytest.raises(PromotionRefused):
        rec.promote(worse.version, by="test", settings=settings)
    assert production(live) == good.version and served() == good.version

    back = rec.rollback(by="test", settings=settings)
    assert back.version == before and back.previous_version == good.version
    wait_for(lambda: served() == before, 15, "the rolled-back version")
    listed = {m.version: m for m in rec.list_models(settings=settings)}
    assert listed[before].production and not listed[good.version].production
