"""Every number and boolean that any route takes in a JSON body must be a JSON number or
boolean: `"quantity": "2"` is a 422 everywhere, not accepted on some routes and refused on
others; and an integer is what the OpenAPI document's `integer` says, 2.0 included. Walks
every application's request bodies, nested models included."""

from __future__ import annotations

import importlib
import inspect
import json
import types
import typing
from datetime import UTC, datetime
from typing import Annotated, Any

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from models.bodies import Strict

APPS = ["users", "products", "carts", "orders", "payments", "notifications", "delivery", "search"]


def _types(annotation: Any) -> list[Any]:
    """The plain types inside an annotation (through Annotated, unions and containers)."""
    if typing.get_origin(annotation) is Annotated:
        return _types(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, list, dict):
        return [t for arg in typing.get_args(annotation) for t in _types(arg)]
    return [annotation]


MODELS: set[type[BaseModel]] = set()


def _scalar_fields() -> list[tuple[str, str, Any]]:
    """(model, field, FieldInfo) of each int, float or bool field reachable from a request body."""
    models = MODELS
    todo: list[Any] = []
    for app in APPS:
        api = importlib.import_module(f"deployments.{app}").api
        todo += [
            r.body_field.field_info.annotation for r in api.routes if isinstance(r, APIRoute) and r.body_field
        ]
    fields = []
    while todo:
        for t in _types(todo.pop()):
            if inspect.isclass(t) and issubclass(t, BaseModel) and t not in models:
                models.add(t)
                for name, info in t.model_fields.items():
                    if any(s in (int, float, bool) for s in _types(info.annotation)):
                        fields.append((t.__name__, name, info))
                    todo.append(info.annotation)
    return fields


FIELDS = _scalar_fields()


def test_the_walk_finds_the_bodies() -> None:
    names = {(model, field) for model, field, _ in FIELDS}
    assert {("AddItem", "quantity"), ("RouteStop", "latest_s"), ("ShiftIn", "online")} <= names


@pytest.mark.parametrize(("model", "field", "info"), FIELDS, ids=[f"{m}.{f}" for m, f, _ in FIELDS])
def test_numbers_and_booleans_sent_as_strings_are_refused(model: str, field: str, info: Any) -> None:
    adapter = TypeAdapter(Annotated[info.annotation, info])
    for text in ("2", "1.5", "true"):
        with pytest.raises(ValidationError):
            adapter.validate_python(text)


def test_every_body_is_a_strict_body() -> None:
    assert MODELS
    assert [m.__name__ for m in MODELS if not issubclass(m, Strict)] == []


class Sample(Strict):
    count: int = Field(strict=True, ge=1)
    maybe: int | None = Field(default=None, strict=True)
    share: float = Field(default=0.5, strict=True)
    flag: bool = Field(default=False, strict=True)


@pytest.mark.parametrize(("sent", "kept"), [(2, 2), (2.0, 2), (1e3, 1000)])
def test_an_integer_field_takes_a_whole_json_number(sent: float, kept: int) -> None:
    body = Sample.model_validate_json(json.dumps({"count": sent, "maybe": sent}))
    assert (body.count, body.maybe) == (kept, kept)
    assert type(body.count) is int and type(body.maybe) is int


@pytest.mark.parametrize("sent", ["2", 2.5, True, 0.0, float("inf")])
def test_an_integer_field_refuses_anything_else(sent: Any) -> None:
    with pytest.raises(ValidationError):
        Sample.model_validate({"count": sent})


def test_only_integer_fields_are_touched() -> None:
    body = Sample.model_validate({"count": 1, "share": 1.0})
    assert type(body.share) is float
    with pytest.raises(ValidationError):
        Sample.model_validate({"count": 1, "flag": 1.0})
    with pytest.raises(ValidationError):  # still no unknown fields
        Sample.model_validate({"count": 1, "other": 1})


def _date_time_fields() -> list[tuple[str, str, Any]]:
    """(model, field, FieldInfo) of each datetime field reachable from a request body."""
    return [
        (m.__name__, name, info)
        for m in MODELS
        for name, info in m.model_fields.items()
        if datetime in _types(info.annotation)
    ]


DATE_TIMES = _date_time_fields()


def test_the_walk_finds_the_date_times() -> None:
    assert ("RoutingProblem", "origin") in {(model, field) for model, field, _ in DATE_TIMES}


@pytest.mark.parametrize(("model", "field", "info"), DATE_TIMES, ids=[f"{m}.{f}" for m, f, _ in DATE_TIMES])
def test_date_times_sent_as_numbers_are_refused(model: str, field: str, info: Any) -> None:
    # The document says `string`, format date-time; pydantic's lax mode reads 0 as 1970.
    adapter = TypeAdapter(Annotated[info.annotation, info])
    for number in (0, 1_700_000_000, 1.5):
        with pytest.raises(ValidationError):
            adapter.validate_python(number)
    assert adapter.validate_python("2026-12-07T08:00:00+05:30") == datetime(
        2026, 12, 7, 2, 30, tzinfo=UTC
    )
