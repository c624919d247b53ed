"""The base of every config model: strict about unknown keys and about values that only look like numbers."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class StrictModel(BaseModel):
    """A config model: unknown keys, NaN / Infinity and true-for-a-number are errors."""

    # allow_inf_nan: "Infinity" / NaN pass a bound check and then break the run
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1; a true where a number is meant (max_train_steps: true) is a mistake."""
        annotation = cls.model_fields[info.field_name].annotation
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in values) and _wants_number(annotation):
            raise ValueError("it must be a number, not true or false")
        return value


def _wants_number(annotation: Any) -> bool:
    """Whether a field (or the items of a list field) holds numbers and not booleans."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        arguments = typing.get_args(annotation)
        return any(_wants_number(a) for a in arguments) and bool not in arguments
    if origin is Annotated:
        return _wants_number(typing.get_args(annotation)[0])
    return annotation in (int, float)
