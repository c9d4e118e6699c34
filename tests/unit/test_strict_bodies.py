"""Every number and boolean that any route takes in a JSON body must be a JSON number or
boolean: `"quantity": "2"` is a 422 everywhere, not accepted on some routes and refused on
others. Walks every application's request bodies, nested models included."""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Annotated, Any

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

APPS = ["users", "products", "carts", "orders", "payments", "notifications", "delivery", "search"]


def _types(annotation: Any) -> list[Any]:
    """The plain types inside an annotation (through Annotated, unions and containers)."""
    if typing.get_origin(annotation) is Annotated:
        return _types(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, list, dict):
        return [t for arg in typing.get_args(annotation) for t in _types(arg)]
    return [annotation]


def _scalar_fields() -> list[tuple[str, str, Any]]:
    """(model, field, FieldInfo) of each int, float or bool field reachable from a request body."""
    models: set[type[BaseModel]] = set()
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
