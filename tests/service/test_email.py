"""Email over real SMTP sockets: the SMTP adapter against the dev SMTP server (what it records
in the dev outbox, how refusals map to outcomes), and against servers that offer neither
STARTTLS nor AUTH, refuse a login, stay silent or hang up."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiosmtpd.handlers import Sink
from aiosmtpd.smtp import SMTP, AuthResult
from redis.asyncio import Redis

from config.settings import Settings
from models.channels import DevOutbox
from models.email import DevSmtpServer, SmtpEmail, make_email

SENDER = "Vurksha <orders@vurksha.example>"
UNSUBSCRIBE = {
    "List-Unsubscribe": "<https://vurksha.example/unsubscribe?t=abc123>",
    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def address(local_part: str) -> str:
    """A recipient no earlier run wrote to (the outbox keeps a day of messages)."""
    return f"{local_part}.{secrets.token_hex(4)}@example.com"


@pytest.fixture
async def outbox(request: pytest.FixtureRequest) -> AsyncIterator[DevOutbox]:
    # The machine's Redis when the run names one; otherwise the embedded one the backend starts.
    url = Settings().redis_url or request.getfixturevalue("live").redis_url
    redis = Redis.from_url(url)
    yield DevOutbox(redis)
    await redis.aclose()


@pytest.fixture
async def smtp_port(outbox: DevOutbox) -> AsyncIterator[int]:
    port = free_port()
    server = DevSmtpServer(outbox, port=port)
    assert await server.start()
    yield port
    await server.stop()


def plain(port: int, *, username: str = "", password: str = "") -> SmtpEmail:
    return SmtpEmail(
        host="127.0.0.1", port=port, sender=SENDER, username=username, password=password, tls="none"
    )


async def test_message_arrives_with_subject_parts_and_unsubscribe_headers(outbox, smtp_port):
    to = address("asha")
    text = "Your order #1042 is on its way.\n"
    html = "<p>Your order <b>#1042</b> is on its way.</p>\n"

    outcome = await plain(smtp_port).send(
        to, subject="Order #1042 dispatched", text=text, html=html, headers=UNSUBSCRIBE
    )

    assert outcome.status == "sent" and outcome.code is None and not outcome.drop_address
    [message] = await outbox.read(to, channel="email")
    assert message.body == text
    assert message.extra == {
        "subject": "Order #1042 dispatched",
        "html": html,
        "from": SENDER,
        "message_id": outcome.provider_id,
        "headers": UNSUBSCRIBE,
    }
    assert outcome.provider_id and outcome.provider_id.endswith("@vurksha.example>")


async def test_text_only_message_has_no_html_part(outbox, smtp_port):
    to = address("ravi")
    outcome = await plain(smtp_port).send(to, subject="Receipt", text="Paid ₹499.\n")

    assert outcome.status == "sent"
    [message] = await outbox.read(to, channel="email")
    assert message.body == "Paid ₹499.\n" and message.extra["html"] is None
    assert message.extra["headers"] == {}


# MIME text travels as lines, so a body always ends with a line break: these end with one.
@pytest.mark.parametrize(
    "html",
    [
        # Short lines go as 8-bit: SMTP dot-stuffing, a line starting "From ", entities, ₹.
        '<p>Tom &amp; Jerry&#39;s "deal"</p>\n.a line starting with a dot\n'
        'From the store: <a href="https://vurksha.example/o?id=1&amp;t=2">₹499</a>\n',
        # A long line forces quoted-printable ("=" must survive) ...
        "<p>" + "order=3D confirmed &lt;soon&gt; " * 12 + "</p>\n",
        # ... or base64 when the text is mostly not ASCII.
        "<p>" + "आपका ऑर्डर रास्ते में है। " * 10 + "</p>\n",
    ],
    ids=["8bit", "quoted-printable", "base64"],
)
async def test_html_part_arrives_exactly_as_given(outbox, smtp_port, html):
    to = address("meera")
    outcome = await plain(smtp_port).send(to, subject="Hello", text="Hello\n", html=html)

    assert outcome.status == "sent"
    [message] = await outbox.read(to, channel="email")
    assert message.extra["html"] == html


async def test_make_email_without_host_sends_to_the_dev_server(outbox, smtp_port):
    to = address("kiran")
    email = make_email(Settings(smtp_host="", dev_smtp_port=smtp_port, smtp_tls="starttls"))

    assert (await email.send(to, subject="Hi", text="Hi\n")).status == "sent"
    assert len(await outbox.read(to, channel="email")) == 1


async def test_unknown_recipient_fails_and_drops_the_address(outbox, smtp_port, caplog):
    caplog.set_level(logging.WARNING, logger="models.email")
    to = address("bounce")

    outcome = await plain(smtp_port).send(to, subject="Hi", text="Hi\n")

    assert (outcome.status, outcome.code, outcome.drop_address) == ("failed", "smtp_550", True)
    assert await outbox.read(to, channel="email") == []
    assert "550" in caplog.text and to not in caplog.text


async def test_deferred_recipient_is_retried_and_kept(outbox, smtp_port):
    to = address("defer")

    outcome = await plain(smtp_port).send(to, subject="Hi", text="Hi\n")

    assert (outcome.status, outcome.code, outcome.drop_address) == ("retry", "smtp_451", False)
    assert await outbox.read(to, channel="email") == []


async def test_message_over_the_size_limit_fails_without_dropping_the_address(outbox, smtp_port):
    to = address("big")

    outcome = await plain(smtp_port).send(to, subject="Catalog", text="x\n", html="y\n" * 600_000)

    assert (outcome.status, outcome.code, outcome.drop_address) == ("failed", "smtp_552", False)
    assert await outbox.read(to, channel="email") == []


async def test_non_ascii_address_and_no_smtputf8_fails(smtp_port):
    outcome = await plain(smtp_port).send("अनु@example.com", subject="Hi", text="Hi\n")

    assert (outcome.status, outcome.code, outcome.drop_address) == ("failed", "smtp_not_supported", False)


async def test_nothing_listening_is_retried_as_unreachable():
    outcome = await plain(free_port()).send(address("asha"), subject="Hi", text="Hi\n")

    assert (outcome.status, outcome.code) == ("retry", "unreachable")


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # never greets; returns when the client gives up
    writer.close()


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@pytest.mark.parametrize("behaviour", [_silent, _hang_up], ids=["timeout", "disconnect"])
async def test_a_server_that_times_out_or_hangs_up_is_retried_as_unreachable(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
):
    server = await asyncio.start_server(behaviour, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        email = SmtpEmail(host="127.0.0.1", port=port, sender=SENDER, tls="none", timeout=0.5)
        outcome = await email.send(address("asha"), subject="Hi", text="Hi\n")
    finally:
        server.close()
        await server.wait_closed()

    assert (outcome.status, outcome.code) == ("retry", "unreachable")


async def test_second_dev_server_on_a_taken_port_does_not_start(outbox, smtp_port):
    second = DevSmtpServer(outbox, port=smtp_port)

    assert await second.start() is False
    await second.stop()  # nothing to stop: harmless
    assert (await plain(smtp_port).send(address("asha"), subject="Hi", text="Hi\n")).status == "sent"


async def test_starttls_required_but_not_offered_fails_without_sending(outbox, smtp_port):
    to = address("asha")
    email = SmtpEmail(host="127.0.0.1", port=smtp_port, sender=SENDER, tls="starttls")

    outcome = await email.send(to, subject="Hi", text="Hi\n")

    assert (outcome.status, outcome.code, outcome.drop_address) == (
        "failed",
        "smtp_starttls_unavailable",
        False,
    )
    assert await outbox.read(to, channel="email") == []


async def test_login_without_auth_offered_fails(outbox, smtp_port):
    # The dev server offers AUTH only over TLS, which it does not have.
    outcome = await plain(smtp_port, username="mailer", password="hunter2").send(
        address("asha"), subject="Hi", text="Hi\n"
    )

    assert (outcome.status, outcome.code, outcome.drop_address) == ("failed", "smtp_auth_unavailable", False)


async def test_refused_login_fails_with_535_and_logs_no_secret(caplog):
    caplog.set_level(logging.WARNING, logger="models.email")
    loop = asyncio.get_running_loop()

    def refuse(*args: object) -> AuthResult:
        return AuthResult(success=False, handled=False)

    server = await loop.create_server(
        lambda: SMTP(Sink(), hostname="localhost", auth_require_tls=False, authenticator=refuse, loop=loop),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        outcome = await plain(port, username="mailer", password="hunter2").send(
            address("asha"), subject="Your code", text="Secret body 8213\n"
        )
    finally:
        server.close()
        await server.wait_closed()

    # Our credentials are wrong, not the recipient's address.
    assert (outcome.status, outcome.code, outcome.drop_address) == ("failed", "smtp_535", False)
    assert "535" in caplog.text
    assert "hunter2" not in caplog.text and "8213" not in caplog.text
