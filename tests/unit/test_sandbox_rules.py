"""The sandbox gateway's pure rules: Razorpay's basic auth check and error wording."""

from __future__ import annotations

import base64
import pickle

import pytest

from models.sandbox_gateway import RazorpayError, check_auth, make_event, validation_error


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_accepts_the_right_keys_only():
    check_auth(basic("rzp_test_a", "s3cret"), "rzp_test_a", "s3cret")
    for header in [
        None,
        "",
        "Bearer x",
        "Basic",
        "Basic !!!notbase64",
        basic("rzp_test_a", "wrong"),
        basic("rzp_test_b", "s3cret"),
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
    ]:
        with pytest.raises(RazorpayError) as exc:
            check_auth(header, "rzp_test_a", "s3cret")
        assert exc.value.status_code == 401
        assert exc.value.body()["error"]["description"] == "Authentication failed"


@pytest.mark.parametrize(
    "error, description, field",
    [
        ({"type": "missing", "loc": ("body", "amount")}, "The amount field is required.", "amount"),
        ({"type": "int_type", "loc": ("body", "amount")}, "The amount must be an integer.", "amount"),
        (
            {"type": "extra_forbidden", "loc": ("body", "foo")},
            "foo is/are not required and should not be sent",
            "foo",
        ),
        ({"type": "json_invalid", "loc": ("body", 5)}, "The request body is not valid JSON", None),
        ({"type": "literal_error", "loc": ("body", "speed")}, "The speed is invalid.", "speed"),
    ],
)
def test_validation_errors_are_worded_like_razorpay(error, description, field):
    err = validation_error([error])
    assert err.status_code == 400
    assert err.body()["error"] == {
        "code": "BAD_REQUEST_ERROR",
        "description": description,
        "source": "business",
        "step": "payment_initiation",
        "reason": "input_validation_failed",
        "metadata": {},
        "field": field,
    }
    assert pickle.loads(pickle.dumps(err)).body() == err.body()


def test_events_have_razorpays_envelope_and_fixed_bytes():
    event = make_event("payment.failed", {"payment": {"id": "pay_1"}}, 1700000000)
    assert event.id.startswith("evt_") and event.name == "payment.failed"
    assert event.body == (
        b'{"entity":"event","account_id":"acc_sandbox","event":"payment.failed","contains":["payment"],'
        b'"payload":{"payment":{"entity":{"id":"pay_1"}}},"created_at":1700000000}'
    )
