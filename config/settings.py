"""The one settings class. Every knob is an env var with the `VURKSHA_` prefix.

`DATABASE_URL` and `REDIS_URL` are also read without the prefix because that is what
platforms (Heroku-style PaaS, Kubernetes secrets, CI) conventionally inject.
"""

from __future__ import annotations

from datetime import time
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Secrets that ship in the code for development. Production refuses to start with them.
DEV_OTP_PEPPER = "dev-only-otp-pepper-do-not-use-in-production"
DEV_CURSOR_SECRET = "dev-only-cursor-secret-do-not-use-in-production"  # noqa: S105
DEV_ADMIN_PHONE = "+919000000001"
DEV_RAZORPAY_KEY_ID = "rzp_test_vurkshadev"
# Deliberately in the code (S105): the production guard below refuses them.
DEV_RAZORPAY_KEY_SECRET = "dev-only-razorpay-key-secret"  # noqa: S105
DEV_RAZORPAY_WEBHOOK_SECRET = "dev-only-razorpay-webhook-secret"  # noqa: S105


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VURKSHA_", extra="ignore", frozen=True)

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Path(".vurksha")

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("VURKSHA_DATABASE_URL", "DATABASE_URL")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("VURKSHA_REDIS_URL", "REDIS_URL")
    )
    db_pool_size: int = Field(default=5, ge=1, le=100)
    db_max_overflow: int = Field(default=5, ge=0, le=100)

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    # Ray's Prometheus endpoint (its metrics and ours, config/metrics.py) on a local cluster:
    # http://127.0.0.1:<metrics_port>/metrics, loopback only like every Ray port. KubeRay
    # sets its own (8080, the pods' `metrics` port).
    metrics_port: int = Field(default=8080, ge=1, le=65535)
    # Peers whose X-Forwarded-For we believe (our own ingress runs on loopback).
    trusted_proxies: list[str] = ["127.0.0.1", "::1"]
    log_level: str = "INFO"
    # "json": one JSON object a line (request id, user id, latency), for a log pipeline;
    # "text": the human format.
    log_format: Literal["text", "json"] = "text"
    # A line per HTTP request (method, route, status, latency). Off by default: like Serve's
    # access log, it costs throughput on the hot paths.
    log_requests: bool = False

    # JWT: EdDSA (Ed25519). The private key is PEM text or a file; in development and
    # test a key is generated into the data dir on first run.
    jwt_private_key: SecretStr | None = None
    jwt_private_key_file: Path | None = None
    jwt_issuer: str = "vurksha"
    jwt_audience: str = "vurksha-api"
    access_token_ttl_seconds: int = Field(default=15 * 60, ge=60, le=3600)
    refresh_token_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=3600)
    max_sessions_per_user: int = Field(default=20, ge=1)

    # HMAC key of the opaque paging cursors (search): a client cannot forge where a page starts.
    cursor_secret: SecretStr = SecretStr(DEV_CURSOR_SECRET)

    # OTP login.
    otp_pepper: SecretStr = SecretStr(DEV_OTP_PEPPER)
    otp_ttl_seconds: int = Field(default=300, ge=30)
    otp_resend_after_seconds: int = Field(default=30, ge=0)
    otp_max_attempts: int = Field(default=5, ge=1)
    otp_max_sends_per_phone_per_hour: int = Field(default=5, ge=1)
    otp_max_sends_per_ip_per_hour: int = Field(default=20, ge=1)
    otp_max_consecutive_failures: int = Field(default=100, ge=1)
    otp_lockout_seconds: int = Field(default=3600, ge=60)
    phone_default_region: str = "IN"

    # SMS: a Twilio-compatible HTTP provider in production; the dev outbox elsewhere.
    sms_provider: Literal["dev_outbox", "http"] = "dev_outbox"
    sms_http_base_url: str = "https://api.twilio.com"
    sms_account_sid: str = ""
    sms_auth_token: SecretStr = SecretStr("")
    sms_from: str = "VURKSHA"
    enable_dev_endpoints: bool | None = None

    # Push: FCM HTTP v1, authorised by OAuth2 access tokens minted from a service-account key
    # (the JSON file Google issues). Outside production an empty base URL and key file mean the
    # local FCM stand-in (in the sandbox gateway, at /sandbox-gateway/fcm) and a key generated into the data
    # dir whose token_uri is the stand-in's.
    fcm_base_url: str = ""
    fcm_service_account: SecretStr | None = None  # the key's JSON text (e.g. from a k8s Secret) ...
    fcm_service_account_file: Path | None = None  # ... or the file it is in
    # Email over SMTP (aiosmtplib). An empty host means the local dev SMTP server that the
    # notifications service runs outside production on `dev_smtp_port` (its mail shows in the
    # dev outbox).
    smtp_host: str = ""
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_tls: Literal["starttls", "implicit", "none"] = "starttls"
    email_from: str = "Vurksha <orders@vurksha.example>"
    dev_smtp_port: int = Field(default=8025, ge=1, le=65535)
    # Where links in messages (unsubscribe) point: the public address of the API; empty means
    # this machine's http://<http_host>:<http_port>.
    public_base_url: str = ""
    # Quiet hours (local time in each user's zone) for users who set none: promotions wait
    # them out; order, delivery and critical messages never do.
    notification_quiet_start: time = time(22, 0)
    notification_quiet_end: time = time(8, 0)
    # At most this many promotional messages per user, channel and (UTC) day.
    notification_promotions_per_day: int = Field(default=3, ge=0)
    # A send the provider asked to retry is tried again after backoff (or its Retry-After,
    # whichever is later) up to this many attempts, then fails with `gave_up`.
    notification_max_attempts: int = Field(default=6, ge=1)
    notification_backoff_base_seconds: float = Field(default=2, gt=0)
    notification_backoff_max_seconds: float = Field(default=600, gt=0)
    # A claimed send is claimed again after this if its replica died while handing it over
    # (so a crash can resend it once), and due sends are looked for at least this often.
    notification_lease_seconds: float = Field(default=60, gt=0)
    notification_poll_seconds: float = Field(default=1.0, gt=0)
    # Finished sends (with their attempts: what support reads) and inbox items are kept this
    # long, then purged by the janitor.
    notification_send_retention_days: int = Field(default=30, ge=1)
    notification_inbox_retention_days: int = Field(default=90, ge=1)

    # Every HTTP request ends within this (504 `request_timeout`). WebSockets are not requests
    # with an end: a tracking socket lives as long as its delivery.
    http_request_timeout_seconds: float = Field(default=30, gt=0)

    # Generic API rate limits (fixed one-minute windows in Redis).
    rate_limit_per_ip_per_minute: int = Field(default=1200, ge=1)
    rate_limit_per_user_per_minute: int = Field(default=600, ge=1)
    # How long Redis may answer who a session is before PostgreSQL is asked again. Changes
    # made through the API take effect on the next request whatever this is; it bounds what a
    # change made by hand in SQL (without `vurksha auth reset`) leaves cached.
    auth_cache_ttl_seconds: int = Field(default=60, ge=1, le=3600)

    # Carts: live carts in sharded actors, written through to Redis.
    cart_shards: int = Field(default=4, ge=1, le=256)
    cart_max_quantity_per_item: int = Field(default=20, ge=1, le=1000)
    cart_max_distinct_items: int = Field(default=50, ge=1, le=500)
    cart_ttl_days: int = Field(default=30, ge=1, le=365)
    # Carts untouched this long leave the shard's memory (Redis still holds them).
    cart_idle_evict_seconds: int = Field(default=600, ge=1)
    delivery_fee_paise: int = Field(default=3000, ge=0)
    free_delivery_threshold_paise: int = Field(default=49900, ge=0)
    small_cart_threshold_paise: int = Field(default=9900, ge=0)
    small_cart_fee_paise: int = Field(default=1500, ge=0)

    # Orders: stock held for an unpaid order this long, then released by the sweeper.
    reservation_ttl_seconds: int = Field(default=600, ge=10)
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    max_tip_paise: int = Field(default=50000, ge=0)

    # Payments: Razorpay's API (the sandbox gateway application outside production). An
    # empty base URL means the local sandbox at http://127.0.0.1:<http_port>/sandbox-gateway.
    razorpay_base_url: str = ""
    razorpay_key_id: str = DEV_RAZORPAY_KEY_ID
    razorpay_key_secret: SecretStr = SecretStr(DEV_RAZORPAY_KEY_SECRET)
    razorpay_webhook_secret: SecretStr = SecretStr(DEV_RAZORPAY_WEBHOOK_SECRET)
    # Where the sandbox gateway sends its webhooks (empty: our own webhook route).
    sandbox_webhook_url: str = ""
    # Reconciliation: payments still pending after this long are asked of the gateway.
    reconcile_after_seconds: int = Field(default=120, ge=1)
    reconcile_interval_seconds: float = Field(default=60, gt=0)
    sweep_interval_seconds: float = Field(default=15, gt=0)

    # Outbox: at-least-once delivery of domain events to subscribers.
    outbox_max_attempts: int = Field(default=10, ge=1)
    outbox_backoff_base_seconds: float = Field(default=0.5, gt=0)
    outbox_backoff_max_seconds: float = Field(default=300, gt=0)
    outbox_poll_seconds: float = Field(default=1.0, gt=0)
    # A claimed event is delivered again if not settled within this (the relay died).
    outbox_lease_seconds: float = Field(default=30, gt=0)
    outbox_retention_days: int = Field(default=7, ge=1)

    # Delivery: partners' positions, dispatch and ETAs (the pure rules in models/delivery_rules.py).
    # A partner is a dispatch candidate only while their last kept position is this recent: the
    # app streams about once a second, and 30 s of silence at city speed is already ~150 m of
    # drift, or a phone that has put the app to sleep.
    partner_fresh_position_seconds: float = Field(default=30, gt=0)
    # Points closer in time than this to the last kept one are dropped (Traccar's minPeriod):
    # below the app's 1 Hz cadence, so clock jitter never drops a regular point, while a
    # client replaying a burst cannot fill the trail.
    partner_position_min_period_seconds: float = Field(default=0.5, ge=0)
    # Phone GPS outdoors reports 5-30 m; a fix worse than this is a cell/Wi-Fi guess, useless
    # for matching at the store or for "arrived".
    partner_position_max_accuracy_m: float = Field(default=100, gt=0)
    # ~120 km/h: faster than any delivery vehicle moves in a city, far slower than the
    # hundreds of km/h a GPS jump implies.
    partner_position_max_speed_mps: float = Field(default=33, gt=0)
    # Device clocks are NTP-synced to within seconds; a point further ahead than this is a
    # broken clock, and keeping it would pin the "latest" position in the future.
    partner_position_future_tolerance_seconds: float = Field(default=60, ge=0)
    # Points kept per partner in the shard's trail: two minutes at 1 Hz, enough for the live
    # map's tail (the trail is not a history: deliveries keep their own events).
    partner_trail_length: int = Field(default=120, ge=1, le=10_000)
    # An offer is answered in this long or goes to the next candidate; three silent expiries
    # in a row mean the phone is not being watched, and the partner is set offline.
    partner_offer_expiry_seconds: float = Field(default=20, gt=0)
    partner_expiries_before_offline: int = Field(default=3, ge=1)
    # WebSocket bounds (both sockets). A position message is ~200 bytes and an auth message
    # with its JWT ~1 KB; the app sends ~1 message/s, so 10/s leaves room for a reconnect
    # burst and offer replies while a flood is closed, not queued.
    delivery_ws_max_message_bytes: int = Field(default=4096, ge=256)
    delivery_ws_max_messages_per_second: float = Field(default=10, gt=0)
    # A socket's first message must authenticate within this; heartbeats keep proxies and
    # phones from dropping an idle socket and tell a dead client apart.
    delivery_ws_auth_timeout_seconds: float = Field(default=5, gt=0)
    delivery_ws_heartbeat_seconds: float = Field(default=15, gt=0)
    # Batching: orders of one store whose drops are all within this distance of each other
    # (a block or a gated society in a dense Indian city) may go as one trip ...
    delivery_batch_close_m: float = Field(default=500, ge=0)
    # ... if no order in it reaches its customer later than this compared with going alone
    # (a 10-minute promise absorbs about 5 minutes of batching, not more) ...
    delivery_batch_max_added_delay_seconds: float = Field(default=300, ge=0)
    # ... and a partner carries at most this many orders (one delivery bag).
    delivery_batch_max_orders: int = Field(default=3, ge=1, le=10)
    # Road distance / straight-line distance (the detour index). Figures of about 1.3-1.4
    # are the ones commonly reported for Indian cities' road networks.
    delivery_road_factor: float = Field(default=1.35, ge=1)
    # Effective door-to-door speeds in congested city traffic (signals and turns included),
    # not cruising speeds: ~12 km/h by bicycle, ~20 km/h on a two-wheeler (scooter or
    # motorbike), ~15 km/h by car, which loses to two-wheelers in Indian traffic.
    delivery_speed_bicycle_mps: float = Field(default=3.3, gt=0)
    delivery_speed_two_wheeler_mps: float = Field(default=5.5, gt=0)
    delivery_speed_car_mps: float = Field(default=4.2, gt=0)
    # Parking, finding the door or the lift, handing over: added to an ETA once per drop.
    delivery_handover_seconds: float = Field(default=120, ge=0)
    # Fleet shard actors: a store's live view (partners, positions, queue, offers) lives on
    # shard blake2b(store_id) % N. Fixed while the fleet runs (a restart rebuilds from
    # PostgreSQL and Redis).
    fleet_shards: int = Field(default=2, ge=1, le=64)
    # How often a store's dispatch round runs (expire offers, match queued orders to partners).
    delivery_round_seconds: float = Field(default=2.0, gt=0)
    # Latest positions are written to Redis at most this often per shard (coalesced).
    partner_position_flush_seconds: float = Field(default=1.0, gt=0)

    # Route optimizer (actors/routing.py, OR-Tools): a request's search time when it names
    # none, and the most it may ask for (well inside http_request_timeout_seconds).
    route_optimizer_time_limit_seconds: float = Field(default=0.5, gt=0)
    route_optimizer_max_time_limit_seconds: float = Field(default=10, gt=0, le=25)
    # Solver actors per optimizer replica, and so the configurations run side by side on
    # problems of more than `route_optimizer_portfolio_min_stops` stops (smaller ones run the
    # default alone), and the logical CPUs each solver asks Ray for (each uses a core while it
    # solves; locally they ask for the sliver every actor asks for, as the replicas and actors
    # have reserved most of the node's CPUs; k8s/rayservice.yaml asks for 1).
    route_optimizer_portfolio: int = Field(default=2, ge=1, le=2)
    route_optimizer_portfolio_min_stops: int = Field(default=10, ge=0)
    route_optimizer_solver_cpus: float = Field(default=0.05, gt=0)
    # Solvers are started by the first solve and stopped after this long without one (each is
    # a process of ~120 MB): the first solve after a quiet spell waits ~2-3 s for them.
    route_optimizer_solver_idle_seconds: float = Field(default=300, gt=0)
    # Dispatch asks the optimizer to order a batched trip's drops with this search time, and
    # falls back to nearest-neighbour order (recorded on the offer) when no answer comes within
    # the timeout; after a failure it does not ask again for `..._retry_seconds`.
    delivery_trip_route_time_limit_seconds: float = Field(default=0.1, gt=0)
    delivery_trip_route_timeout_seconds: float = Field(default=1.5, gt=0)
    delivery_trip_route_retry_seconds: float = Field(default=30, ge=0)

    # Recommender replicas look for a newly promoted model this often (the registry in
    # PostgreSQL is the source of truth, so it works wherever ops own the Serve config).
    recommender_poll_seconds: float = Field(default=2.0, gt=0)
    # Candidates asked of the model per item shown, before the store's stock filter drops
    # what it cannot sell now.
    recommender_oversample: int = Field(default=4, ge=1, le=20)
    # Served lists are logged (impressions) in batches, at least this often.
    recommender_impressions_flush_seconds: float = Field(default=1.0, gt=0)
    # How many order lines of a customer's history (newest first) a request reads.
    recommender_history_lines: int = Field(default=500, ge=1)
    # Each search replica keeps the Recommender's rankings this long (0: not at all), for at most
    # this many (customer or product, store, size) shapes: a customer back on the same screen
    # costs no history read and no call to the Recommender, only the stock filter. A "for you"
    # entry may miss an order delivered since; a promotion empties the cache at once.
    recommender_cache_seconds: float = Field(default=30.0, ge=0)
    recommender_cache_entries: int = Field(default=5_000, ge=1)

    # Recommender: `promote` refuses a model whose NDCG@10 (time split) is below production's by
    # more than this, unless forced. Several times the spread between fits that differ only in
    # their random seed (about 0.002 on Online Retail): noise alone does not block a retrain.
    recommender_promote_tolerance: float = Field(default=0.01, ge=0)

    admin_phone: str = DEV_ADMIN_PHONE

    # Seed catalog: the Online Retail Parquet file (default: the copy vendored in
    # pipelines/data/online_retail) and the base URL that product image paths hang off.
    catalog_parquet: Path | None = None
    catalog_image_base_url: str = "https://cdn.vurksha.example/catalog"

    @model_validator(mode="after")
    def _production_guard(self) -> Settings:
        if self.env != "production":
            return self
        problems = []
        if self.otp_pepper.get_secret_value() in ("", DEV_OTP_PEPPER):
            problems.append("VURKSHA_OTP_PEPPER must be set to a secret value")
        if self.cursor_secret.get_secret_value() in ("", DEV_CURSOR_SECRET):
            problems.append("VURKSHA_CURSOR_SECRET must be set to a secret value")
        if not (self.jwt_private_key or self.jwt_private_key_file):
            problems.append("VURKSHA_JWT_PRIVATE_KEY or VURKSHA_JWT_PRIVATE_KEY_FILE must be set")
        if not self.database_url or not self.redis_url:
            problems.append("DATABASE_URL and REDIS_URL must point at managed servers")
        if (
            self.sms_provider != "http"
            or not self.sms_account_sid
            or not self.sms_auth_token.get_secret_value()
        ):
            problems.append(
                "VURKSHA_SMS_PROVIDER=http with VURKSHA_SMS_ACCOUNT_SID and "
                "VURKSHA_SMS_AUTH_TOKEN is required"
            )
        if not self.fcm_base_url.startswith("https://") or not (
            self.fcm_service_account or self.fcm_service_account_file
        ):
            problems.append(
                "VURKSHA_FCM_BASE_URL (https) and VURKSHA_FCM_SERVICE_ACCOUNT or "
                "VURKSHA_FCM_SERVICE_ACCOUNT_FILE must be set"
            )
        if not self.smtp_host:
            problems.append("VURKSHA_SMTP_HOST must name a real SMTP server")
        if self.enable_dev_endpoints:
            problems.append("VURKSHA_ENABLE_DEV_ENDPOINTS is not allowed in production")
        if self.admin_phone == DEV_ADMIN_PHONE:
            problems.append("VURKSHA_ADMIN_PHONE must be set")
        if (
            not self.razorpay_base_url.startswith("https://")
            or self.razorpay_key_id == DEV_RAZORPAY_KEY_ID
            or self.razorpay_key_secret.get_secret_value() in ("", DEV_RAZORPAY_KEY_SECRET)
            or self.razorpay_webhook_secret.get_secret_value() in ("", DEV_RAZORPAY_WEBHOOK_SECRET)
        ):
            problems.append(
                "VURKSHA_RAZORPAY_BASE_URL (https), VURKSHA_RAZORPAY_KEY_ID, "
                "VURKSHA_RAZORPAY_KEY_SECRET and VURKSHA_RAZORPAY_WEBHOOK_SECRET must be set"
            )
        if problems:
            raise ValueError("refusing to start in production: " + "; ".join(problems))
        return self

    @property
    def dev_endpoints(self) -> bool:
        """Dev-only routes (the SMS outbox) exist outside production unless switched off."""
        if self.enable_dev_endpoints is None:
            return self.env != "production"
        return self.enable_dev_endpoints

    @property
    def gateway_base_url(self) -> str:
        return self.razorpay_base_url or f"http://127.0.0.1:{self.http_port}/sandbox-gateway"

    @property
    def gateway_webhook_url(self) -> str:
        """Where the sandbox gateway posts webhooks: our own receiver unless overridden."""
        return self.sandbox_webhook_url or f"http://127.0.0.1:{self.http_port}/payments/webhooks/razorpay"

    @property
    def public_url(self) -> str:
        return (self.public_base_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    @property
    def fcm_api_base(self) -> str:
        """FCM's API root (`.../v1/projects/{project}/messages:send` hangs off it)."""
        return self.fcm_base_url or f"http://127.0.0.1:{self.http_port}/sandbox-gateway/fcm"

    @property
    def fcm_key_file(self) -> Path:
        return self.fcm_service_account_file or (self.data_dir / "fcm" / "service-account.json")

    @property
    def smtp_address(self) -> tuple[str, int]:
        if self.smtp_host:
            return self.smtp_host, self.smtp_port
        return "127.0.0.1", self.dev_smtp_port

    @property
    def key_file(self) -> Path:
        return self.jwt_private_key_file or (self.data_dir / "jwt" / "ed25519.pem")


@lru_cache
def get_settings() -> Settings:
    return Settings()
