"""Pure rules: phone normalisation, OTP hashing, error pickling, settings guard, client IP."""

import pickle
import uuid

import pytest
from pydantic import ValidationError

from config.settings import Settings
from models.errors import AppError, NotFound, TooManyRequests
from models.users import AddressIn, OtpRequest, OtpVerify, UserUpdate, otp_hash


@pytest.mark.parametrize(
    "raw, e164",
    [
        ("9812345678", "+919812345678"),
        ("+91 98123 45678", "+919812345678"),
        ("098123-45678", "+919812345678"),
        ("+1 650 253 0000", "+16502530000"),
    ],
)
def test_phone_is_normalised_to_e164(raw, e164):
    assert OtpRequest(phone=raw).phone == e164


@pytest.mark.parametrize(
    "raw",
    ["12345", "not a phone", "+91 00000 00000", "", "9" * 40, "+91 98123 4567x", "+490409 7969-.98900-39 8"],
)
def test_invalid_phone_is_rejected_with_its_own_code(raw):
    with pytest.raises(ValidationError) as err:
        OtpRequest(phone=raw)
    assert err.value.errors()[0]["type"] in ("invalid_phone", "string_too_long")


def test_otp_hash_is_keyed_and_bound_to_challenge():
    cid = uuid.uuid4()
    assert otp_hash("pepper", cid, "123456") == otp_hash("pepper", cid, "123456")
    assert otp_hash("pepper", cid, "123456") != otp_hash("other", cid, "123456")
    assert otp_hash("pepper", cid, "123456") != otp_hash("pepper", uuid.uuid4(), "123456")
    assert b"123456" not in otp_hash("pepper", cid, "123456")


@pytest.mark.parametrize("code", ["12345", "1234567", "12a456", " 123456"])
def test_otp_code_must_be_six_digits(code):
    with pytest.raises(ValidationError):
        OtpVerify(challenge_id=uuid.uuid4(), code=code)


def test_profile_update_rejects_privileged_fields():
    with pytest.raises(ValidationError):
        UserUpdate.model_validate({"name": "A", "role": "admin"})
    with pytest.raises(ValidationError):
        UserUpdate.model_validate({"phone": "+919812345678"})
    assert UserUpdate.model_validate({"name": "  Asha  "}).name == "Asha"


@pytest.mark.parametrize(
    "patch",
    [
        {"lat": 91},
        {"lng": -181},
        {"pincode": "012345"},
        {"pincode": "56001"},
        {"line1": ""},
        {"line1": "a\x00b"},
        {"is_default": 0},
        {"lat": "12.9"},
        {"city": "x" * 101},
    ],
)
def test_address_validation(patch):
    base = {"line1": "12 MG Road", "city": "Bengaluru", "pincode": "560001", "lat": 12.97, "lng": 77.59}
    AddressIn.model_validate(base)
    with pytest.raises(ValidationError):
        AddressIn.model_validate({**base, **patch})


def test_errors_pickle_with_their_state():
    for err in (
        NotFound("gone", code="address_not_found"),
        TooManyRequests("slow", retry_after=7, code="otp_locked"),
        AppError("x", code="c", status_code=418, extra={"a": 1}).with_kept_changes(),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err)
        assert back.__dict__ == err.__dict__ and str(back) == str(err)
    assert pickle.loads(pickle.dumps(TooManyRequests("slow", retry_after=7))).headers == {"Retry-After": "7"}


def test_production_refuses_default_secrets():
    with pytest.raises(ValidationError) as err:
        Settings(env="production")
    message = str(err.value)
    assert "OTP_PEPPER" in message and "JWT_PRIVATE_KEY" in message and "ADMIN_PHONE" in message
    assert "CURSOR_SECRET" in message
    assert "RAZORPAY_WEBHOOK_SECRET" in message


def test_production_refuses_dev_endpoints_and_accepts_real_config():
    good = dict(
        env="production",
        otp_pepper="s3cret-pepper",
        cursor_secret="s3cret-cursor-key",
        jwt_private_key="pem",
        database_url="postgresql://db/x",
        redis_url="redis://r",
        sms_provider="http",
        sms_account_sid="AC1",
        sms_auth_token="tok",
        admin_phone="+919812345678",
        razorpay_base_url="https://api.razorpay.com",
        razorpay_key_id="rzp_live_x",
        razorpay_key_secret="live-secret",
        razorpay_webhook_secret="whsec",
        fcm_base_url="https://fcm.googleapis.com",
        fcm_service_account='{"project_id": "p"}',
        smtp_host="smtp.example.com",
    )
    settings = Settings(**good)
    assert settings.dev_endpoints is False
    with pytest.raises(ValidationError):
        Settings(**good, enable_dev_endpoints=True)
    # The FCM stand-in and the local SMTP server are refused too.
    for stand_in in ({"fcm_base_url": ""}, {"fcm_service_account": None}, {"smtp_host": ""}):
        with pytest.raises(ValidationError, match=r"FCM|SMTP"):
            Settings(**{**good, **stand_in})
    assert Settings(env="development").dev_endpoints is True
