"""Property-based fuzzing of the users API from its own OpenAPI document (schemathesis):
no 5xx, and every response matches the documented status codes, headers and schemas."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import Live, Session, fake_ip


@pytest.fixture(scope="module")
def fuzz_user(live: Live) -> Session:
    return live.login()


@pytest.fixture(scope="module")
def users_schema(live: Live):
    schema = schemathesis.openapi.from_url(f"{live.base_url}/users/openapi.json")
    # Logging out would end the session the rest of the run authenticates with; it has its own tests.
    return schema.exclude(path="/auth/logout")


schema = schemathesis.pytest.from_fixture("users_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_users_api_conforms_to_its_schema(case, live: Live, fuzz_user: Session):
    case.call_and_validate(
        base_url=f"{live.base_url}/users",
        headers={**fuzz_user.auth, "X-Forwarded-For": fake_ip()},
        # A phone number that fits the documented pattern can still not exist in its region
        # (422 invalid_phone): JSON Schema cannot express numbering plans.
        excluded_checks=[positive_data_acceptance],
    )
