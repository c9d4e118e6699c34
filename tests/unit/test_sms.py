"""The Twilio-compatible SMS adapter against a local server speaking Twilio's Messages API
over real HTTP, and the log filter that keeps tokens out of logs."""

from __future__ import annotations

import base64
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from config.logging import RedactSecrets
from models.channels import TwilioSms, otp_sms
from models.errors import ServiceUnavailable

SID, TOKEN = "AC0123456789abcdef", "auth-token-xyz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def sandbox() -> AsyncIterator[tuple[str, list[dict[str, str]], dict[str, int]]]:
    """A minimal Twilio Messages endpoint: basic auth, form body, 201 with a message SID."""
    received: list[dict[str, str]] = []
    behaviour = {"status": 201}

    async def messages(request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != expected or request.match_info["sid"] != SID:
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        form = await request.post()
        received.append({k: str(v) for k, v in form.items()})
        if behaviour["status"] >= 300:
            return web.json_response({"code": 20500, "message": "Internal"}, status=behaviour["status"])
        return web.json_response({"sid": "SM1", "status": "queued"}, status=201)

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", messages)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", received, behaviour
    await runner.cleanup()


async def test_sends_twilio_request_shape(sandbox):
    base, received, _ = sandbox
    sms = TwilioSms(base_url=base, account_sid=SID, auth_token=TOKEN, sender="VURKSHA")
    await sms.send("+919812345678", otp_sms("123456", 300))
    assert received == [{"To": "+919812345678", "From": "VURKSHA", "Body": otp_sms("123456", 300)}]


async def test_provider_errors_become_503(sandbox):
    base, _, behaviour = sandbox
    behaviour["status"] = 500
    sms = TwilioSms(base_url=base, account_sid=SID, auth_token=TOKEN, sender="VURKSHA")
    with pytest.raises(ServiceUnavailable) as err:
        await sms.send("+919812345678", "hi")
    assert err.value.code == "sms_unavailable"
    wrong_key = TwilioSms(base_url=base, account_sid=SID, auth_token="nope", sender="VURKSHA")
    with pytest.raises(ServiceUnavailable):
        await wrong_key.send("+919812345678", "hi")


async def test_unreachable_provider_is_503():
    sms = TwilioSms(base_url=f"http://127.0.0.1:{free_port()}", account_sid=SID, auth_token=TOKEN, sender="V")
    with pytest.raises(ServiceUnavailable):
        await sms.send("+919812345678", "hi")


def test_log_filter_masks_tokens():
    record = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "auth %s refresh %s header %s",
        ("eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln", "rt_" + "a" * 43, "Bearer abc.def"),
        None,
    )
    RedactSecrets().filter(record)
    message = record.getMessage()
    assert "eyJ" not in message and "rt_aaa" not in message and "abc.def" not in message
    assert message.count("[redacted]") == 3
