"""The base of every request body (pure: pydantic only, so the route optimizer's solver
processes can import it without the database layers)."""

from __future__ import annotations

import functools
import types
import typing
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


def _plain_types(annotation: Any) -> list[Any]:
    """The plain types inside an annotation (through Annotated and unions)."""
    if typing.get_origin(annotation) is Annotated:
        return _plain_types(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [t for arg in typing.get_args(annotation) for t in _plain_types(arg)]
    return [annotation]


@functools.cache
def _integer_keys(model: type[BaseModel]) -> frozenset[str]:
    """The input keys (names and aliases) of `model`'s integer fields."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        if int in _plain_types(info.annotation):
            keys |= {name, info.alias or name}
    return frozenset(keys)


class Strict(BaseModel):
    """A request body: unknown fields are refused, and numbers are JSON numbers (every integer
    and number field is declared strict: "2" is a 422, not 2). A JSON number without a
    fractional part is an integer, as JSON Schema's `integer` in the OpenAPI document says, so
    an integer field takes 2.0 as 2 (2.5 is still a 422)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data: Any) -> Any:
        keys = _integer_keys(cls)
        if not keys or not isinstance(data, dict):
            return data
        return {
            key: int(value) if key in keys and type(value) is float and value.is_integer() else value
            for key, value in data.items()
        }


def _date_time_string(value: Any) -> Any:
    # JSON has no date-time: the document says `string` (RFC 3339), and pydantic's lax mode
    # would also read a JSON number as Unix seconds (0 is 1970-01-01). Python callers may
    # still pass a datetime.
    if isinstance(value, str | datetime):
        return value
    raise PydanticCustomError("datetime_type", "Input should be an RFC 3339 date-time string")


# A date-time in a request body: an RFC 3339 string, never a number.
Timestamp = Annotated[datetime, BeforeValidator(_date_time_string)]
