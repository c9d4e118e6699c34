"""Real journeys under load, over the public API only (run it with `python -m tests.load.run`).

- Customer (mobile app): the nearest store, browse, search, cart, checkout (online), pay in the
  sandbox gateway, then watch the order on its tracking WebSocket until it is delivered, handing
  the PIN shown there to the partner at the door.
- Partner (fleet): online near the store, a position every second, poll offers, accept, ride
  (compressed: a few believable fixes), at the store, picked up once packed, arrived, delivered
  with the customer's PIN.
- Staff (one per store): confirm placed orders, pack confirmed ones a moment later.
- Admin (one): each store's board, its partners and orders, a restock now and then.

Every simulated person logs in by OTP through the dev outbox (so the backend must run outside
production) from an X-Forwarded-For address of their own in the documentation range (RFC 3849):
per-IP limits apply per simulated phone, not to the load generator. Partners and staff get their
roles from the seeded admin, as `vurksha simulate` does. The admin's session is kept between
runs (`--admin-session-file`), since OTP sends per phone are capped per hour.

Staff and partners only touch orders placed in this run: the load test may share a store with
real traffic, and an earlier run's leftovers would need PINs nobody here knows. Users share that
state in this process, so do not run this file with `--processes` or workers.

Tracking is measured on the socket, as two request events of type "WS": `track`, connect and
auth to the first tracking message, and `position`, a partner's fix (from just before its POST)
to the moment a customer's socket shows it: the SLO's "partner position to customer socket".
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import gevent.lock
import gevent.pool
import websocket  # websocket-client (what locust's own socket.io user uses; gevent-friendly)
from locust import FastHttpUser, between, constant, events, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.stats import StatsError

log = logging.getLogger("vurksha.load")

ROOT = Path(__file__).resolve().parents[2]
KM_LAT = 1 / 111.0
POOL_SIZE = 24  # products per store the customers buy (restocked at the start)
RESTOCK_TO = 100_000
PACK_S = 1.0  # staff pack an order this long after confirming it (compressed packing)
RIDE_FIXES = 3  # fixes a partner sends riding to a drop (compressed ride)
STEP_M = 15.0  # metres per fix, at least 0.6 s apart: 25 m/s at most, under the speed filter
PIN_WAIT_S = 30.0  # how long a partner at the door waits for the customer's app to show the PIN
PICKUP_WAIT_S = 120.0
WATCH_MAX_S = 240.0  # a customer whose order is not on its way by then cancels it
FINISHED = 1000  # the tracking socket's close code once the order is over


class JourneyError(Exception):
    """A journey could not go on (its failed request is already in the stats)."""


# ---------------------------------------------------------------- options and run-wide state


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--stores", type=int, default=1, help="dark stores to spread the journeys over")
    parser.add_argument("--admin-phone", default="", help="the seeded admin (default: the settings')")
    parser.add_argument(
        "--admin-session-file",
        default=str(ROOT / ".vurksha" / "load-admin-session.json"),
        help="where the admin's refresh token is kept between runs, per host",
    )
    parser.add_argument("--report", default="", help="write the final stats here as JSON (tests/load/run.py)")


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    Staff.fixed_count = max(1, options.stores if options else 1)


@events.test_stopping.add_listener
def _stopping(**_: Any) -> None:
    # Journeys in flight wind down within --stop-timeout: orders a partner holds are packed and
    # delivered, the others cancelled; idle people stop at once (locust ends them while they wait).
    STATE.stopping = True


@events.test_stop.add_listener
def _report(environment: Environment, **_: Any) -> None:
    """The final stats, once every user has stopped. (Locust's own CSV files are rewritten once
    a second and not at exit: they miss the last second, the journeys finishing at the end.)"""
    options = environment.parsed_options
    if not options or not options.report:
        return

    def percentile(entry: Any, share: float) -> float | None:
        return float(entry.get_response_time_percentile(share)) if entry.num_requests else None

    steps = [
        {"type": e.method, "name": e.name, "requests": e.num_requests, "failures": e.num_failures,
         "p50_ms": percentile(e, 0.5), "p95_ms": percentile(e, 0.95), "p99_ms": percentile(e, 0.99)}
        for e in environment.stats.entries.values()
    ]  # fmt: skip
    failures = [
        {"type": e.method, "name": e.name, "error": StatsError.parse_error(e.error), "count": e.occurrences}
        for e in environment.stats.errors.values()
    ]
    runner = environment.runner
    exceptions = [
        {"count": x["count"], "message": x["msg"], "traceback": x["traceback"]}
        for x in (runner.exceptions.values() if runner else [])
    ]
    Path(options.report).write_text(
        json.dumps({"steps": steps, "failures": failures, "exceptions": exceptions})
    )


@dataclass
class Tokens:
    access: str
    refresh: str
    expires_at: float  # time.monotonic()
    user: dict[str, Any]
    lock: gevent.lock.BoundedSemaphore = field(default_factory=gevent.lock.BoundedSemaphore)
    on_refresh: Callable[[Tokens], None] | None = None

    @classmethod
    def of(cls, body: dict[str, Any]) -> Tokens:
        return cls(
            body["access_token"], body["refresh_token"], time.monotonic() + body["expires_in"], body["user"]
        )

    def update(self, body: dict[str, Any]) -> None:
        self.access, self.refresh = body["access_token"], body["refresh_token"]
        self.expires_at = time.monotonic() + body["expires_in"]
        if self.on_refresh:
            self.on_refresh(self)


@dataclass
class State:
    """What the simulated people of this process share."""

    ready: bool = False
    error: str = ""
    stopping: bool = False
    admin: Tokens | None = None
    stores: list[dict[str, Any]] = field(default_factory=list)
    pools: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # store id -> products
    orders: set[str] = field(default_factory=set)  # placed in this run
    watched: set[str] = field(default_factory=set)  # placed and not over yet: customers watch them
    cancelled: set[str] = field(default_factory=set)
    pins: dict[str, str] = field(default_factory=dict)  # order id -> PIN the customer's app shows
    sent: dict[tuple[float, float], float] = field(default_factory=dict)  # fix -> perf_counter() at POST
    counters: dict[str, int] = field(default_factory=dict)
    phones: set[str] = field(default_factory=set)
    lock: gevent.lock.BoundedSemaphore = field(default_factory=gevent.lock.BoundedSemaphore)

    def store_for(self, kind: str) -> dict[str, Any]:
        """Stores round-robin per kind of person, so each store gets its share of everyone."""
        n = self.counters.get(kind, 0)
        self.counters[kind] = n + 1
        return self.stores[n % len(self.stores)]

    def note_sent(self, lat: float, lng: float) -> None:
        if len(self.sent) > 20_000:
            old = time.perf_counter() - 60
            self.sent = {k: t for k, t in self.sent.items() if t > old}
        self.sent[_key(lat, lng)] = time.perf_counter()

    def phone(self) -> str:
        while True:
            phone = "+9195" + "".join(secrets.choice("0123456789") for _ in range(8))
            if phone not in self.phones:
                self.phones.add(phone)
                return phone


STATE = State()


def _key(lat: float, lng: float) -> tuple[float, float]:
    return round(lat, 6), round(lng, 6)


def _fake_ip() -> str:
    return f"2001:db8:10ad:{secrets.token_hex(2)}::{secrets.token_hex(2)}"


def _near(store: dict[str, Any], low_km: float, high_km: float) -> tuple[float, float]:
    angle, km = random.uniform(0, 2 * math.pi), random.uniform(low_km, high_km)
    return (
        store["lat"] + km * KM_LAT * math.sin(angle),
        store["lng"] + km * KM_LAT * math.cos(angle) / math.cos(math.radians(store["lat"])),
    )


def _metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    return math.hypot((b[0] - a[0]) * 111_000, (b[1] - a[1]) * 111_000 * math.cos(math.radians(a[0])))


def _problem(response: Any) -> str:
    try:
        body = response.json()
    except Exception:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


def _describe(response: Any) -> str:
    """A failure's message: `HTTP <status> <problem code>` (the runner counts 5xx by it)."""
    if not response.status_code:
        return f"no response: {response.error!r}"
    return f"HTTP {response.status_code} {_problem(response) or (response.text or '')[:80]}"


# ---------------------------------------------------------------- people


class Person(FastHttpUser):
    abstract = True
    tokens: Tokens | None = None

    def on_start(self) -> None:
        self.ip = _fake_ip()
        self.ws_base = str(self.host).replace("http://", "ws://").replace("https://", "wss://")
        setup(self)

    def call(
        self,
        method: str,
        path: str,
        name: str,
        *,
        ok: tuple[int, ...] = (200,),
        expected: Callable[[ResponseContextManager], bool] | None = None,
        who: Tokens | None = None,
        anonymous: bool = False,
        **kw: Any,
    ) -> ResponseContextManager | None:
        """One request, recorded under `name`. Statuses in `ok`, or a response `expected`
        accepts (an answer the journey handles, such as "not packed yet"), are successes;
        anything else is a failure and returns None."""
        headers = {"X-Forwarded-For": self.ip, **kw.pop("headers", {})}
        tokens = None if anonymous else who or self.tokens
        if tokens:
            headers["Authorization"] = f"Bearer {self.fresh(tokens).access}"
        with self.client.request(method, path, name=name, headers=headers, catch_response=True, **kw) as r:
            if r.status_code in ok or (r.status_code and expected and expected(r)):
                r.success()
                return r
            r.failure(_describe(r))
            return None

    def fresh(self, tokens: Tokens) -> Tokens:
        """Tokens with a minute of life left at least (access tokens last 15 minutes)."""
        if tokens.expires_at - time.monotonic() > 60:
            return tokens
        with tokens.lock:
            if tokens.expires_at - time.monotonic() <= 60:
                r = self.call(
                    "POST",
                    "/users/auth/refresh",
                    "refresh",
                    anonymous=True,
                    json={"refresh_token": tokens.refresh},
                )
                if r is None:
                    raise JourneyError("the session could not be refreshed")
                tokens.update(r.json())
        return tokens

    def login(self, phone: str, *, patient: bool = False) -> Tokens:
        """OTP login, reading the code from the dev outbox. `patient` waits out the resend
        window of a code sent moments ago (the admin, whose phone is shared by every run)."""
        for _ in range(3):
            challenge = self.call(
                "POST",
                "/users/auth/otp",
                "otp",
                ok=(202,),
                expected=(lambda r: _problem(r) == "otp_resend_too_soon") if patient else None,
                anonymous=True,
                json={"phone": phone},
            )
            if challenge is None:
                raise JourneyError(f"no login code for {phone}")
            if challenge.status_code == 202:
                break
            wait = challenge.headers.get("retry-after") if challenge.headers else None
            gevent.sleep(min(35.0, float(str(wait or 30))) + 0.5)
        else:
            raise JourneyError(f"no login code for {phone}")
        code = None
        for _ in range(10):  # the SMS is handed to the dev outbox after the commit
            outbox = self.call(
                "GET", "/notifications/dev/outbox", "outbox", anonymous=True, params={"to": phone}
            )
            found = re.match(r"^(\d{6}) ", outbox.json()[0]["body"]) if outbox and outbox.json() else None
            if found:
                code = found.group(1)
                break
            gevent.sleep(0.2)
        if code is None:
            raise JourneyError(f"the login code for {phone} never reached the dev outbox")
        verified = self.call(
            "POST",
            "/users/auth/verify",
            "verify",
            anonymous=True,
            json={"challenge_id": challenge.json()["challenge_id"], "code": code},
        )
        if verified is None:
            raise JourneyError(f"login of {phone} refused")
        return Tokens.of(verified.json())

    def register_device(self) -> None:
        """The app's push token (FCM; the backend's stand-in takes the pushes outside production)."""
        token = f"load-{secrets.token_urlsafe(24)}"
        device = {"token": token, "platform": random.choice(["android", "ios"]), "app_version": "load-test"}
        self.call("POST", "/notifications/devices", "device", ok=(201,), json=device)

    def fire(self, name: str, began: float, exception: Exception | None = None, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(time.perf_counter() - began) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )


# ---------------------------------------------------------------- the shared setup


def setup(user: Person) -> None:
    """Once per run (the first person to start does it, the others wait): the admin's
    session, the stores, and a pool of products per store restocked so checkout cannot run
    out of them. A failure here ends the run: no journey can work without it."""
    with STATE.lock:
        if STATE.error:
            raise JourneyError(STATE.error)
        if STATE.ready:
            return
        try:
            _setup(user)
            STATE.ready = True
        except Exception as exc:
            STATE.error = f"load test setup failed: {exc}"
            log.error("%s", STATE.error)
            user.environment.process_exit_code = 2
            if user.environment.runner:
                gevent.spawn(user.environment.runner.quit)
            raise


def _setup(user: Person) -> None:
    options = user.environment.parsed_options
    STATE.admin = admin = _admin_session(user, options)
    if admin.user.get("role") != "admin":
        raise JourneyError(f"{admin.user.get('phone')} is not an admin")
    listed = user.call("GET", "/products/stores", "stores", who=admin)
    if listed is None:
        raise JourneyError("no store list")
    # Stores open around the clock first (opens_at == closes_at), then by code: the same each
    # run. Only stores with a catalog to shop from (a test suite's stores hold a product or two).
    stores = sorted(listed.json(), key=lambda s: (s["opens_at"] != s["closes_at"], s["code"]))
    wanted = options.stores if options else 1
    restocks = gevent.pool.Pool(4)
    for store in (s for s in stores if s["is_active"]):
        if len(STATE.stores) == wanted:
            break
        page = user.call(
            "GET", "/products/", "catalog", who=admin, params={"store_id": store["id"], "limit": 100}
        )
        if page is None:
            raise JourneyError(f"no catalog for {store['code']}")
        pool = [p for p in page.json()["items"] if p.get("availability")][:POOL_SIZE]
        if len(pool) < POOL_SIZE:
            continue
        STATE.stores.append(store)
        STATE.pools[store["id"]] = pool
        for product in pool:
            if product["availability"]["available"] < RESTOCK_TO // 2:
                restocks.spawn(_restock, user, store, product, admin)
    if len(STATE.stores) < wanted:
        raise JourneyError(
            f"{wanted} stores asked for, {len(STATE.stores)} with {POOL_SIZE} products stocked: seed the catalog"
        )
    restocks.join(raise_error=True)


def _restock(user: Person, store: dict[str, Any], product: dict[str, Any], admin: Tokens) -> bool:
    return (
        user.call(
            "PUT",
            f"/products/stores/{store['id']}/inventory/{product['id']}",
            "restock",
            who=admin,
            json={"on_hand": RESTOCK_TO},
        )
        is not None
    )


def _admin_session(user: Person, options: Any) -> Tokens:
    """The seeded admin: the session kept from an earlier run against this host (refreshed,
    under a file lock: a refresh token is single-use, and presenting a used one revokes the
    session), else a new OTP login. The refresh token rotates; every new one is saved."""
    path = Path(options.admin_session_file if options else ROOT / ".vurksha" / "load-admin-session.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    host = user.host

    def save(tokens: Tokens) -> None:
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            kept = json.loads(f.read() or "{}")
            kept[host] = {"refresh_token": tokens.refresh}
            f.seek(0)
            f.truncate()
            f.write(json.dumps(kept))
        os.chmod(path, 0o600)

    tokens = None
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        kept = json.loads(f.read() or "{}").get(host)
        if kept:
            refreshed = user.call(
                "POST",
                "/users/auth/refresh",
                "refresh",
                # A session revoked or from an emptied database: log in again.
                expected=lambda r: r.status_code in (401, 403),
                anonymous=True,
                json={"refresh_token": kept["refresh_token"]},
            )
            if refreshed is not None and refreshed.status_code == 200:
                tokens = Tokens.of(refreshed.json())
    if tokens is None:
        phone = options.admin_phone if options and options.admin_phone else _settings_admin_phone()
        tokens = user.login(phone, patient=True)
    save(tokens)
    tokens.on_refresh = save
    return tokens


def _settings_admin_phone() -> str:
    from config.settings import get_settings

    return get_settings().admin_phone


# ---------------------------------------------------------------- customers


class Customer(Person):
    """The mobile app: one journey per task, from the store screen to the doorstep."""

    weight = 3
    wait_time = between(2, 5)

    def on_start(self) -> None:
        super().on_start()
        self.tokens = self.login(STATE.phone())
        self.register_device()
        self.store = STATE.store_for("customer")
        self.pool = STATE.pools[self.store["id"]]
        self.order_id: str | None = None
        for _ in range(20):
            # A home this store serves before any other (the nearest store takes the order).
            self.home = _near(self.store, 0.15, 0.6)
            if self.nearby():
                break
        else:
            raise JourneyError(f"no home found that {self.store['code']} serves first")
        lat, lng = self.home
        address = self.call(
            "POST",
            "/users/me/addresses",
            "address",
            ok=(201,),
            json={"line1": "1 Load Test Road", "city": self.store["city"], "pincode": "560001",
                  "lat": lat, "lng": lng, "is_default": True},
        )  # fmt: skip
        if address is None:
            raise JourneyError("no address")
        self.address_id = address.json()["id"]

    def nearby(self) -> bool:
        lat, lng = self.home
        found = self.call("GET", "/products/stores/nearby", "nearby", params={"lat": lat, "lng": lng})
        return bool(found is not None and found.json() and found.json()[0]["id"] == self.store["id"])

    def pause(self) -> None:
        gevent.sleep(random.uniform(0.2, 0.8))  # reading the screen

    @task
    def shop(self) -> None:
        store_id = self.store["id"]
        self.nearby()
        self.pause()
        self.call("GET", "/products/", "browse", params={"store_id": store_id, "limit": 20})
        self.pause()
        wanted = random.sample(self.pool, k=random.randint(1, min(3, len(self.pool))))
        words = [w for w in re.findall(r"[A-Za-z]{4,}", wanted[0]["name"])] or [wanted[0]["name"][:20]]
        self.call(
            "GET",
            "/search",
            "search",
            params={"q": random.choice(words), "store_id": store_id, "in_stock": "true"},
        )
        self.pause()
        for product in wanted:
            self.call("POST", "/carts/me/items", "cart", json={"product_id": product["id"], "quantity": 1})
        self.pause()
        if STATE.stopping:
            return
        placed = self.call(
            "POST",
            "/orders",
            "checkout",
            ok=(201,),
            headers={"Idempotency-Key": uuid.uuid4().hex},
            json={"address_id": self.address_id, "payment_method": "online", "tip_paise": 0},
        )
        if placed is None:
            return
        order = placed.json()
        self.order_id = order["id"]
        STATE.orders.add(order["id"])
        STATE.watched.add(order["id"])
        # The app opens the gateway's checkout; the sandbox "pays" (its webhook places the order).
        paid = self.call(
            "POST",
            f"/sandbox-gateway/sandbox/orders/{order['payment']['razorpay_order_id']}/pay",
            "pay",
            anonymous=True,
            json={"outcome": "success"},
        )
        if paid is None:
            self.cancel(order["id"])
            return
        try:
            self.watch(order["id"])
        finally:
            STATE.watched.discard(order["id"])
        self.order_id = None

    def watch(self, order_id: str) -> None:
        """The tracking screen: until the socket closes with 1000 (the order is over). A
        dropped socket is reopened, as the app does. An order no partner has taken after
        `WATCH_MAX_S`, or when the run stops, is cancelled."""
        give_up_at = time.monotonic() + WATCH_MAX_S
        status, partner, cancel_refused = "pending_payment", False, False
        for _ in range(5):
            began = time.perf_counter()
            try:
                ws = websocket.create_connection(
                    f"{self.ws_base}/delivery/ws/orders/{order_id}",
                    timeout=10,
                    header=[f"X-Forwarded-For: {self.ip}"],
                    enable_multithread=False,
                )
            except Exception as exc:
                self.fire("track", began, exc)
                gevent.sleep(1)
                continue
            try:
                assert self.tokens
                ws.send(json.dumps({"type": "auth", "token": self.fresh(self.tokens).access}))
                first = True
                while True:
                    waited = STATE.stopping or time.monotonic() > give_up_at
                    if waited and not partner and status != "out_for_delivery" and not cancel_refused:
                        if self.cancel(order_id):
                            return
                        cancel_refused = True  # it is on its way after all: see it to the door
                    ws.settimeout(1.0 if not first else 10.0)
                    try:
                        opcode, data = ws.recv_data()
                    except websocket.WebSocketTimeoutException:
                        if first:
                            raise
                        continue
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                        if code == FINISHED and not first:
                            return
                        raise JourneyError(f"tracking socket closed with {code}")
                    message = json.loads(data)
                    if message.get("type") == "ping":
                        ws.send(json.dumps({"type": "pong"}))
                        continue
                    if message.get("type") != "tracking":
                        continue
                    tracking = message["tracking"]
                    status, partner = tracking["order_status"], tracking.get("partner") is not None
                    if first:
                        self.fire("track", began, length=len(data))
                        first = False
                    elif tracking.get("position"):
                        sent = STATE.sent.get(_key(tracking["position"]["lat"], tracking["position"]["lng"]))
                        if sent and sent > began:
                            self.fire("position", sent, length=len(data))
                    if tracking.get("pin"):
                        STATE.pins[order_id] = tracking["pin"]
            except (websocket.WebSocketException, OSError, JourneyError, ValueError) as exc:
                self.fire("track", began, exc)
                gevent.sleep(1)
            finally:
                ws.close()

    def cancel(self, order_id: str) -> bool:
        """Cancel before it is out for delivery; False when it is on its way (409)."""
        STATE.cancelled.add(order_id)  # first: staff and partners racing it must know
        done = self.call(
            "POST",
            f"/orders/{order_id}/cancel",
            "cancel",
            expected=lambda r: r.status_code == 409,
            json={"reason": "load test: changed my mind"},
        )
        if done is not None and done.status_code == 409:
            STATE.cancelled.discard(order_id)
            return False
        return True

    def on_stop(self) -> None:
        if self.order_id and self.tokens:  # stopped mid-journey
            self.cancel(self.order_id)


# ---------------------------------------------------------------- partners


class Partner(Person):
    """The partner app: a fix and an offers poll a second while idle; a whole trip per offer."""

    weight = 1
    wait_time = constant(1)

    def on_start(self) -> None:
        super().on_start()
        phone = STATE.phone()
        self.tokens = self.login(phone)
        self.store = STATE.store_for("partner")
        attached = self.call(
            "POST",
            "/delivery/partners",
            "attach",
            ok=(201,),
            who=STATE.admin,
            json={"phone": phone, "store_id": self.store["id"],
                  "vehicle": random.choice(["scooter", "motorbike", "bicycle"])},
        )  # fmt: skip
        if attached is None:
            raise JourneyError("not attached as a partner")
        self.register_device()
        self.here = _near(self.store, 0.1, 0.4)
        self.last_ts = 0.0
        self.fix()
        if self.call("POST", "/delivery/partners/me/shift", "shift", json={"online": True}) is None:
            raise JourneyError("could not go online")

    def fix(self, toward: tuple[float, float] | None = None) -> None:
        """Report where the partner is: `STEP_M` closer to `toward`, or a metre or two of GPS
        jitter. Fixes are at least 0.6 s apart (the ingest filter drops faster ones)."""
        lat, lng = self.here
        if toward is None:
            lat, lng = (
                lat + random.uniform(-1, 1) * KM_LAT / 1000,
                lng + random.uniform(-1, 1) * KM_LAT / 1000,
            )
        elif (distance := _metres(self.here, toward)) > 1:
            share = min(1.0, STEP_M / distance)
            lat, lng = lat + (toward[0] - lat) * share, lng + (toward[1] - lng) * share
        self.here = (lat, lng)
        self.last_ts = max(time.time(), self.last_ts + 0.6)
        STATE.note_sent(lat, lng)
        point = {"lat": lat, "lng": lng, "ts": self.last_ts, "accuracy_m": 8.0, "speed_mps": 6.0}
        self.call("POST", "/delivery/partners/me/positions", "positions", json={"points": [point]})

    @task
    def work(self) -> None:
        self.fix()
        offers = self.call("GET", "/delivery/partners/me/offers", "offers")
        if offers is None or not offers.json():
            return
        offer = offers.json()[0]
        answer = "accept" if set(offer["order_ids"]) <= STATE.orders and not STATE.stopping else "decline"
        taken = self.call(
            "POST",
            f"/delivery/offers/{offer['id']}/{answer}",
            answer,
            # Expired, recalled (a customer cancelled) or taken by someone else meanwhile.
            expected=lambda r: r.status_code == 409 and _problem(r) in ("offer_closed", "order_taken"),
        )
        if answer == "accept" and taken is not None and taken.status_code == 200:
            self.trip(sorted(taken.json(), key=lambda d: d["seq"]))

    def advance(self, job: dict[str, Any], to: str, name: str, **extra: Any) -> ResponseContextManager | None:
        def handled(r: ResponseContextManager) -> bool:
            if r.status_code != 409:
                return False
            not_packed = to == "picked_up" and _problem(r) == "order_not_packed"
            return not_packed or job["order_id"] in STATE.cancelled

        return self.call(
            "POST",
            f"/delivery/deliveries/{job['id']}/status",
            name,
            expected=handled,
            json={"to": to, **extra},
        )

    def trip(self, jobs: list[dict[str, Any]]) -> None:
        store = (self.store["lat"], self.store["lng"])
        for _ in range(2):  # to the store
            gevent.sleep(0.6)
            self.fix(store)
        for job in jobs:
            self.advance(job, "at_store", "at_store")
        carried = []
        for job in jobs:
            deadline = time.monotonic() + PICKUP_WAIT_S
            while time.monotonic() < deadline:
                picked = self.advance(job, "picked_up", "picked_up")
                if picked is not None and picked.status_code == 200:
                    carried.append(job)
                    break
                if picked is None or job["order_id"] in STATE.cancelled:
                    break
                gevent.sleep(1)  # not packed yet: wait at the counter, as the app polls
                self.fix()
        for job in carried:
            drop = (job["drop"]["lat"], job["drop"]["lng"])
            for _ in range(RIDE_FIXES):
                gevent.sleep(1)
                self.fix(drop)
            arrived = self.advance(job, "arrived", "arrived")
            if arrived is None or arrived.status_code != 200:
                continue
            began = time.perf_counter()
            while job["order_id"] not in STATE.pins and time.perf_counter() - began < PIN_WAIT_S:
                gevent.sleep(0.25)  # the customer reads it off the tracking screen
            pin = STATE.pins.get(job["order_id"])
            if pin is None:
                self.fire(
                    "deliver", began, JourneyError(f"no PIN on the customer's socket in {PIN_WAIT_S:.0f} s")
                )
                self.advance(job, "failed", "fail", reason="load test: the customer never saw the PIN")
                continue
            cash = {"cash_collected_paise": job["amount_due_paise"]} if job["amount_due_paise"] else {}
            self.advance(job, "delivered", "deliver", pin=pin, **cash)

    def on_stop(self) -> None:
        if self.tokens:
            self.call(
                "POST",
                "/delivery/partners/me/shift",
                "offline",
                expected=lambda r: _problem(r) == "active_delivery",
                json={"online": False},
            )


# ---------------------------------------------------------------- store staff and the admin


class Staff(Person):
    """A store's packer: confirm what is placed, pack it a moment later. One per store."""

    fixed_count = 1  # set to --stores at init
    wait_time = constant(1)

    def on_start(self) -> None:
        super().on_start()
        self.tokens = self.login(STATE.phone())
        self.store = STATE.store_for("staff")
        self.confirmed_at: dict[str, float] = {}
        granted = self.call(
            "PUT",
            f"/users/{self.tokens.user['id']}/role",
            "grant",
            who=STATE.admin,
            json={"role": "staff", "store_id": self.store["id"]},
        )
        if granted is None:
            raise JourneyError("no staff role")

    def queue(self, status: str) -> list[dict[str, Any]]:
        page = self.call(
            "GET",
            f"/orders/stores/{self.store['id']}",
            "store queue",
            params={"status": status, "limit": 100},
        )
        return [o for o in page.json()["items"] if o["id"] in STATE.orders] if page else []

    def move(self, order_id: str, to: str) -> bool:
        moved = self.call(
            "POST",
            f"/orders/{order_id}/transitions",
            "confirm" if to == "confirmed" else "pack",
            expected=lambda r: r.status_code == 409 and order_id in STATE.cancelled,
            json={"to": to},
        )
        return moved is not None and moved.status_code == 200

    @task
    def work(self) -> None:
        self.round()
        # When the run stops, keep packing while customers still wait for orders (a partner
        # may already be at the counter); locust's --stop-timeout bounds it.
        while STATE.stopping and STATE.watched:
            gevent.sleep(1)
            self.round()

    def round(self) -> None:
        for order in self.queue("placed"):
            if self.move(order["id"], "confirmed"):
                self.confirmed_at[order["id"]] = time.monotonic()
        for order in self.queue("confirmed"):
            if time.monotonic() - self.confirmed_at.get(order["id"], 0) >= PACK_S:
                self.move(order["id"], "packed")
                self.confirmed_at.pop(order["id"], None)


class Admin(Person):
    """The seeded admin at the console (the session the setup opened)."""

    fixed_count = 1
    wait_time = between(1, 2)  # the dispatcher's screen, refreshed

    def on_start(self) -> None:
        super().on_start()
        self.tokens = STATE.admin
        self.rounds = 0

    @task
    def console(self) -> None:
        """A look at each store's board, partners and latest orders; a restock now and then."""
        for store in STATE.stores:
            self.call("GET", f"/delivery/stores/{store['id']}/board", "board")
            self.call("GET", "/delivery/partners", "partners", params={"store_id": store["id"]})
            self.call("GET", f"/orders/stores/{store['id']}", "store orders", params={"limit": 20})
            if self.rounds % 5 == 4:
                assert self.tokens
                _restock(self, store, random.choice(STATE.pools[store["id"]]), self.tokens)
        self.rounds += 1
