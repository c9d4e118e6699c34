"""`vurksha simulate`: demo traffic against a running backend, over the real APIs only.

Customers (living within ~1 km of one dark store, which serves them) order from it (cash on
delivery), the store's staff confirm and pack, delivery partners go online near the store,
stream their position every second, accept offers, ride in straight lines at city speed,
hand over with the customer's PIN and collect the cash. `--speedup K` compresses packing and
waiting K times and travel as far as the ingest filter's speed limit allows
(`partner_position_max_speed_mps`), so a short run delivers orders end to end. Exits 0 when the time is up.

Every simulated person logs in by OTP through the dev outbox (so the backend must run
outside production) from an address of their own in the documentation range (RFC 3849),
which the loopback ingress passes on as X-Forwarded-For: the per-network OTP cap applies to
each of them as to a real phone, not to the simulator as a whole.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

KM_LAT = 1 / 111.0
CITY_SPEED_MPS = 5.5


@dataclass
class Person:
    client: httpx.AsyncClient
    user_id: str = ""
    phone: str = ""


@dataclass
class World:
    base: str
    store: dict[str, Any]
    speedup: float
    max_speed_mps: float
    deadline: float
    pins: dict[str, str] = field(default_factory=dict)  # order id -> PIN the customer sees
    delivered: int = 0
    ordered: int = 0

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    @property
    def running(self) -> bool:
        return time.monotonic() < self.deadline

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.05, seconds / self.speedup))


def _ip() -> str:
    return f"2001:db8:5:{secrets.token_hex(2)}::{secrets.token_hex(2)}"


async def login(base: str, phone: str) -> Person:
    """OTP login through the dev outbox, from a network of this person's own."""
    client = httpx.AsyncClient(base_url=base, timeout=30, headers={"X-Forwarded-For": _ip()})
    challenge = await client.post("/users/auth/otp", json={"phone": phone})
    challenge.raise_for_status()
    outbox = await client.get("/notifications/dev/outbox", params={"to": phone})
    outbox.raise_for_status()
    code = re.match(r"^(\d{6})", outbox.json()[0]["body"])
    if code is None:
        raise RuntimeError("no login code in the dev outbox")
    tokens = await client.post(
        "/users/auth/verify", json={"challenge_id": challenge.json()["challenge_id"], "code": code.group(1)}
    )
    tokens.raise_for_status()
    body = tokens.json()
    client.headers["Authorization"] = f"Bearer {body['access_token']}"
    return Person(client, str(body["user"]["id"]), phone)


def _phone() -> str:
    return "+9196" + "".join(random.choice("0123456789") for _ in range(8))


def _near(store: dict[str, Any], km: float) -> tuple[float, float]:
    angle, distance = random.uniform(0, 2 * math.pi), random.uniform(0.2, km)
    return (
        store["lat"] + distance * KM_LAT * math.sin(angle),
        store["lng"] + distance * KM_LAT * math.cos(angle) / math.cos(math.radians(store["lat"])),
    )


def _metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    dlat = (b[0] - a[0]) * 111_000
    dlng = (b[1] - a[1]) * 111_000 * math.cos(math.radians(a[0]))
    return math.hypot(dlat, dlng)


# ---------------------------------------------------------------- people


async def customer(world: World, person: Person, products: list[str]) -> None:
    """Order something, wait for it (reading the PIN when the partner arrives), repeat."""
    # A home this store serves first (another store nearer would take the orders).
    for _ in range(50):
        lat, lng = _near(world.store, min(1.2, world.store["service_radius_km"] * 0.8))
        nearby = await person.client.get("/products/stores/nearby", params={"lat": lat, "lng": lng})
        if nearby.status_code == 200 and nearby.json()[0]["id"] == world.store["id"]:
            break
    address = await person.client.post(
        "/users/me/addresses",
        json={"line1": "Simulated street", "city": "Bengaluru", "pincode": "560001", "lat": lat, "lng": lng,
              "is_default": True},
    )  # fmt: skip
    address.raise_for_status()
    while world.running:
        for pid in random.sample(products, k=min(len(products), random.randint(1, 3))):
            await person.client.post("/carts/me/items", json={"product_id": pid, "quantity": 1})
        placed = await person.client.post(
            "/orders",
            json={"address_id": address.json()["id"], "payment_method": "cod", "tip_paise": 0},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        if placed.status_code != 201:
            await world.sleep(10)
            continue
        order_id = placed.json()["id"]
        world.ordered += 1
        world.say(f"customer {person.phone[-4:]} ordered {order_id[:8]}")
        while world.running:
            tracking = (await person.client.get(f"/delivery/orders/{order_id}/tracking")).json()
            if tracking.get("pin"):
                world.pins[order_id] = tracking["pin"]
            if tracking.get("order_status") in ("delivered", "cancelled", "returned"):
                break
            await asyncio.sleep(1)
        await world.sleep(random.uniform(20, 60))


async def staff(world: World, person: Person) -> None:
    """Confirm what is placed, pack what has been confirmed a little while (packing takes time)."""
    confirmed_at: dict[str, float] = {}
    pack_s = 60
    while world.running:
        for status, target in (("placed", "confirmed"), ("confirmed", "packed")):
            queue = await person.client.get(f"/orders/stores/{world.store['id']}", params={"status": status})
            for order in queue.json().get("items", []) if queue.status_code == 200 else []:
                if (
                    target == "packed"
                    and time.monotonic() - confirmed_at.get(order["id"], 0) < pack_s / world.speedup
                ):
                    continue
                moved = await person.client.post(f"/orders/{order['id']}/transitions", json={"to": target})
                if moved.status_code == 200:
                    confirmed_at[order["id"]] = time.monotonic()
                    world.say(f"store {target} {order['id'][:8]}")
        await asyncio.sleep(1)


async def partner(world: World, person: Person) -> None:
    """Online near the store; accept offers, ride there and to each drop, hand over."""
    here = _near(world.store, 0.8)
    speed = min(CITY_SPEED_MPS * world.speedup, world.max_speed_mps * 0.8)
    last_ts = time.time()

    async def report() -> None:
        nonlocal last_ts
        last_ts = max(time.time(), last_ts + 0.6)
        point = {"lat": here[0], "lng": here[1], "ts": last_ts, "accuracy_m": 8.0, "speed_mps": speed}
        await person.client.post("/delivery/partners/me/positions", json={"points": [point]})

    async def ride_to(target: tuple[float, float]) -> None:
        nonlocal here
        while world.running and _metres(here, target) > 15:
            step = min(1.0, speed / _metres(here, target))
            here = (here[0] + (target[0] - here[0]) * step, here[1] + (target[1] - here[1]) * step)
            await report()
            await asyncio.sleep(1)

    async def advance(delivery_id: str, to: str, **extra: Any) -> bool:
        moved = await person.client.post(
            f"/delivery/deliveries/{delivery_id}/status", json={"to": to, **extra}
        )
        return moved.status_code == 200

    await person.client.post("/delivery/partners/me/shift", json={"online": True})
    store = (world.store["lat"], world.store["lng"])
    while world.running:
        await report()
        offers = (await person.client.get("/delivery/partners/me/offers")).json()
        if not offers:
            await asyncio.sleep(1)
            continue
        trip = await person.client.post(f"/delivery/offers/{offers[0]['id']}/accept")
        if trip.status_code != 200:
            continue
        jobs = trip.json()
        world.say(f"partner {person.phone[-4:]} took {len(jobs)} order(s)")
        await ride_to(store)
        for job in jobs:
            await advance(job["id"], "at_store")
        for job in jobs:
            # Polling the API, as the partner's app would: the store packs in its own time.
            while world.running and not await advance(job["id"], "picked_up"):  # noqa: ASYNC110
                await asyncio.sleep(1)
        for job in jobs:
            await ride_to((job["drop"]["lat"], job["drop"]["lng"]))
            await advance(job["id"], "arrived")
            while world.running and job["order_id"] not in world.pins:  # noqa: ASYNC110 (the customer reads it)
                await asyncio.sleep(0.5)
            extra = {"cash_collected_paise": job["amount_due_paise"]} if job["amount_due_paise"] else {}
            if await advance(job["id"], "delivered", pin=world.pins.get(job["order_id"], ""), **extra):
                world.delivered += 1
                world.say(f"partner {person.phone[-4:]} delivered {job['order_id'][:8]}")


# ---------------------------------------------------------------- the run


async def simulate(
    base: str, admin_phone: str, partners: int, customers: int, seconds: float, speedup: float
) -> int:
    admin = await login(base, admin_phone)
    stores = (await admin.client.get("/products/stores")).json()
    store = min(stores, key=lambda s: s["code"])
    world = World(base, store, speedup, max_speed_mps=25.0, deadline=time.monotonic() + seconds)
    world.say(
        f"simulating at {store['name']}: {partners} partners, {customers} customers,"
        f" {seconds:.0f} s, x{speedup:g}"
    )
    browse = await admin.client.get("/products/", params={"store_id": store["id"], "limit": 100})
    browse.raise_for_status()
    products = [
        p["id"] for p in browse.json()["items"] if p["availability"] and p["availability"]["available"] > 20
    ]
    if not products:
        raise SystemExit(f"no products in stock at {store['name']}: seed the catalog first")

    async def make(role_task: Any, count: int, setup: Any) -> list[asyncio.Task[None]]:
        people = await asyncio.gather(*(login(base, _phone()) for _ in range(count)))
        for person in people:
            await setup(person)
        return [asyncio.create_task(role_task(person)) for person in people]

    async def as_staff(person: Person) -> None:
        granted = await admin.client.put(
            f"/users/{person.user_id}/role", json={"role": "staff", "store_id": store["id"]}
        )
        granted.raise_for_status()

    async def as_partner(person: Person) -> None:
        attached = await admin.client.post(
            "/delivery/partners",
            json={
                "phone": person.phone,
                "store_id": store["id"],
                "vehicle": random.choice(["scooter", "motorbike", "bicycle"]),
            },
        )
        attached.raise_for_status()

    async def as_customer(person: Person) -> None:
        return None

    tasks = await make(lambda p: staff(world, p), 1, as_staff)
    tasks += await make(lambda p: partner(world, p), partners, as_partner)
    tasks += await make(lambda p: customer(world, p, products), customers, as_customer)
    await asyncio.sleep(max(0.0, world.deadline - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    world.say(f"done: {world.ordered} orders placed, {world.delivered} delivered")
    return 0


def main(argv: list[str] | None = None) -> int:
    from config.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="vurksha simulate", description=__doc__)
    parser.add_argument("--partners", type=int, default=5)
    parser.add_argument("--customers", type=int, default=5)
    parser.add_argument("--duration", type=float, default=90, help="seconds")
    parser.add_argument("--speedup", type=float, default=10)
    parser.add_argument("--base-url", default=f"http://{settings.http_host}:{settings.http_port}")
    args = parser.parse_args(argv)
    return asyncio.run(
        simulate(
            args.base_url, settings.admin_phone, args.partners, args.customers, args.duration, args.speedup
        )
    )
