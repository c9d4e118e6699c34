"""Email: an SMTP adapter (`SmtpEmail`, aiosmtplib) that answers an `Outcome` like the other
channels, and the local SMTP server (`DevSmtpServer`, aiosmtpd) that development and tests
send to, which records what it accepts in the dev outbox."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Literal

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session
from redis.exceptions import RedisError

from config.settings import Settings
from models.channels import DevOutbox, Outcome

log = logging.getLogger(__name__)

# Transactional mail (receipts, order updates) is a few tens of KB; a message past this is a
# template gone wrong, and the dev server refuses it as a real provider would (552).
DEV_SMTP_MAX_BYTES = 1024 * 1024
# Headers the dev outbox keeps, so tests can check one-click unsubscribe (RFC 8058).
RECORDED_HEADERS = ("List-Unsubscribe", "List-Unsubscribe-Post")


class SmtpEmail:
    """Sends one message per call over a fresh SMTP connection: notifications go out from a
    queue at a modest rate, and a pooled connection would need its own liveness handling."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        username: str = "",
        password: str = "",
        tls: Literal["starttls", "implicit", "none"] = "starttls",
        timeout: float = 10.0,
    ) -> None:
        domain = parseaddr(sender)[1].rpartition("@")[2]
        if not domain:
            raise ValueError("the sender must be an address with a domain")
        self._host = host
        self._port = port
        self._sender = sender
        self._domain = domain  # Message-IDs are on our domain, as receivers' filters expect
        self._username = username
        self._password = password
        self._tls = tls
        self._timeout = timeout

    def _message(
        self, to: str, subject: str, text: str, html: str | None, headers: Mapping[str, str]
    ) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = format_datetime(datetime.now(UTC))
        message["Message-ID"] = make_msgid(domain=self._domain)
        for name, value in headers.items():
            message[name] = value
        message.set_content(text)
        if html is not None:
            message.add_alternative(html, subtype="html")
        return message

    async def send(
        self,
        to: str,
        *,
        subject: str,
        text: str,
        html: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Outcome:
        message = self._message(to, subject, text, html, headers or {})
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            use_tls=self._tls == "implicit",
            start_tls=False,  # done below, so a server without it is an answer, not an error
            timeout=self._timeout,
        )
        try:
            async with client:
                await client.ehlo()
                if self._tls == "starttls":
                    if not client.supports_extension("starttls"):
                        # Sending in clear text instead would leak the mail and the login.
                        log.warning("SMTP server does not offer STARTTLS")
                        return Outcome("failed", code="smtp_starttls_unavailable")
                    await client.starttls()
                    await client.ehlo()  # RFC 3207: what was learnt before TLS is void
                if self._username:
                    if not client.supports_extension("auth"):
                        log.warning("SMTP server does not offer AUTH")
                        return Outcome("failed", code="smtp_auth_unavailable")
                    await client.login(self._username, self._password)
                await client.send_message(message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            # Only a refusal at RCPT says the address itself is bad.
            return _refused(exc.recipients[0].code, address=True)
        except aiosmtplib.SMTPResponseException as exc:
            # Greeting, sender, auth or content refused: about us or the message, not the address.
            return _refused(exc.code, address=False)
        except aiosmtplib.SMTPNotSupported:
            # A non-ASCII address and a server without SMTPUTF8: retrying will not change it.
            log.warning("SMTP server cannot take this message: SMTPUTF8 not supported")
            return Outcome("failed", code="smtp_not_supported")
        except OSError as exc:
            # aiosmtplib's connect, timeout and disconnect errors are OSErrors, as are TLS ones.
            log.warning("SMTP server unreachable: %s", type(exc).__name__)
            return Outcome("retry", code="unreachable")
        return Outcome("sent", provider_id=str(message["Message-ID"]))


def _refused(code: int, *, address: bool) -> Outcome:
    # The server's text may echo the address; log its code only.
    log.warning("SMTP server refused the message: %s", code)
    if 400 <= code < 500:
        return Outcome("retry", code=f"smtp_{code}")
    return Outcome("failed", code=f"smtp_{code}", drop_address=address)


def make_email(settings: Settings) -> SmtpEmail:
    host, port = settings.smtp_address
    if not settings.smtp_host:  # the dev server: plain SMTP on loopback, no login
        return SmtpEmail(host=host, port=port, sender=settings.email_from, tls="none")
    return SmtpEmail(
        host=host,
        port=port,
        sender=settings.email_from,
        username=settings.smtp_username,
        password=settings.smtp_password.get_secret_value(),
        tls=settings.smtp_tls,
    )


class _OutboxHandler:
    """aiosmtpd hooks: refuse the test addresses like a real server, record the rest."""

    def __init__(self, outbox: DevOutbox) -> None:
        self._outbox = outbox

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        local_part = address.rpartition("@")[0].lower()
        if local_part.startswith("bounce"):
            return "550 5.1.1 No such user"
        if local_part.startswith("defer"):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.original_content is not None  # aiosmtpd sets it before this hook
        # SMTP carries lines as CRLF; back to "\n" so the parts read as the sender wrote them.
        raw = envelope.original_content.replace(b"\r\n", b"\n")
        message = message_from_bytes(raw, policy=policy.default)
        text_part = message.get_body(preferencelist=("plain",))
        html_part = message.get_body(preferencelist=("html",))
        extra: dict[str, object] = {
            "subject": _header(message, "Subject"),
            "html": html_part.get_content() if html_part is not None else None,
            "from": _header(message, "From"),
            "message_id": _header(message, "Message-ID"),
            "headers": {name: str(message[name]) for name in RECORDED_HEADERS if name in message},
        }
        text = text_part.get_content() if text_part is not None else ""
        try:
            for recipient in envelope.rcpt_tos:
                await self._outbox.record("email", recipient, text, extra=extra)
        except RedisError:
            # Transient like a real server's full queue: the sender keeps the message and retries.
            log.warning("dev SMTP server could not record a message: Redis unavailable")
            return "451 4.3.0 Outbox unavailable, try again later"
        return "250 OK"


def _header(message: EmailMessage, name: str) -> str | None:
    value = message[name]
    return None if value is None else str(value)


class DevSmtpServer:
    """A real SMTP server on the replica's own event loop (no thread: aiosmtpd's protocol is
    asyncio), on loopback only since it accepts anyone's mail without login."""

    def __init__(self, outbox: DevOutbox, *, port: int, host: str = "127.0.0.1") -> None:
        self._outbox = outbox
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> bool:
        """Serve, or answer False when the port is taken: another replica on this machine
        already serves it, into the same outbox."""
        loop = asyncio.get_running_loop()
        handler = _OutboxHandler(self._outbox)
        try:
            self._server = await loop.create_server(
                # A fixed hostname: aiosmtpd's default looks up the FQDN for every connection.
                lambda: SMTP(handler, data_size_limit=DEV_SMTP_MAX_BYTES, hostname="localhost", loop=loop),
                host=self._host,
                port=self._port,
            )
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return False
        return True

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
