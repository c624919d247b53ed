"""One settings dict (config.json, or one dataset entry) -> a schema object, every problem as a message.

Steps: key spelling (`--key`, `key-name`) and aliases -> keys outside the schema (an error with the
nearest valid key; keys of the original tool as `original_keys` classifies them: refused, or
ignored with a warning when they cannot change the weights) -> value coercion
("none" -> None, JSON text -> dict/list) -> pydantic validation, whose errors become
"<where>: '<key>' is <value>, but it must be <what is allowed>".
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from difftune.config import original_keys
from difftune.errors import nearest


def canonical_keys(
    raw: dict[str, Any],
    aliases: dict[str, str],
    known: set[str] | frozenset[str],
    where: str,
    problems: list[str],
) -> dict[str, Any]:
    """Strip leading dashes, map aliases; two spellings of one key with different values are a problem."""
    seen: dict[str, tuple[str, Any]] = {}
    for given, value in raw.items():
        key = str(given).strip().lstrip("-")
        if key not in known and key not in aliases and key.replace("-", "_") in known | set(aliases):
            key = key.replace("-", "_")
        key = aliases.get(key, key)
        if key in seen:
            first, first_value = seen[key]
            if not _same_value(first_value, value):
                problems.append(
                    f"{where}: '{first}' and '{given}' are two names of the setting '{key}' and have "
                    f"different values ({first_value!r} and {value!r}); keep only one of them"
                )
            continue
        seen[key] = (str(given), value)
    return {key: value for key, (_, value) in seen.items()}


def _same_value(a: Any, b: Any) -> bool:
    if a == b:
        return True
    text_a, text_b = str(a).strip().lower(), str(b).strip().lower()
    if text_a == text_b:
        return True
    try:
        return float(text_a) == float(text_b)
    except ValueError:
        return False


def drop_unknown(
    values: dict[str, Any],
    model: type[BaseModel],
    table: dict[str, original_keys.Status],
    aliases: dict[str, str],
    origin: Any,
    problems: list[str],
    warnings: list[str],
    prefix: str = "",
) -> dict[str, Any]:
    """Keep the schema's keys; the original tool's other keys as `table` classifies them; report the rest.

    A refused key set to anything but a neutral value is a problem; a cosmetic key is a warning; an
    unknown key is a problem with the nearest valid key. `origin` is a dict key -> where it came
    from, or one string for all keys.
    """
    fields = set(model.model_fields)
    kept = {}
    for key, value in values.items():
        where = origin if isinstance(origin, str) else origin.get(key, "config")
        status = table.get(key)
        if key in fields:
            kept[key] = value
        elif isinstance(status, original_keys.Refused):
            if not original_keys.is_neutral(status, value):
                problems.append(
                    f"{where}: '{prefix}{key}' is {_show(value)}, a setting of the original tool that "
                    f"changes the trained weights and that difftune does not implement; {status.instead}"
                )
        elif isinstance(status, original_keys.Cosmetic):
            warnings.append(
                f"{where}: '{prefix}{key}' is a setting of the original tool that difftune ignores: "
                f"{status.why}"
            )
        elif status is None:
            hint = nearest(key, sorted(fields | set(aliases))) or nearest(key, sorted(table))
            guess = f"did you mean '{prefix}{hint}'?" if hint else "remove it or check its spelling"
            problems.append(f"{where}: unknown key '{prefix}{key}'; {guess}")
    return kept


def _accepted_types(annotation: Any) -> set[Any]:
    """The plain types a field annotation admits: Literal[...] counts as str, dict[str, X] as dict."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_accepted_types(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {str}
    return {origin or annotation}


def prepare_values(values: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """'none'/'null' -> None where the field is optional; JSON text -> dict/list where str is not allowed."""
    prepared = {}
    for key, value in values.items():
        accepted = _accepted_types(model.model_fields[key].annotation)
        if isinstance(value, str):
            text = value.strip()
            if type(None) in accepted and (
                text.lower() in ("none", "null") or (not text and str not in accepted)
            ):
                value = None
            elif str not in accepted and text[:1] in ("{", "[") and accepted & {dict, list}:
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    pass  # pydantic reports the value with what the key allows
        prepared[key] = value
    return prepared


def validate_model(
    model: type[BaseModel],
    values: dict[str, Any],
    where_for: Callable[[str], str],
    problems: list[str],
    skip: frozenset[str] = frozenset(),
) -> BaseModel | None:
    """model.model_validate(values), or None with every validation error added to `problems`.

    `where_for(key)` says where a key came from (file, dataset, command line) for the messages.
    """
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems.extend(_describe(exc, model, where_for, skip))
        return None


_KINDS = {
    "string_type": "a string",
    "dict_type": "a JSON object",
    "list_type": "a list",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "none_required": "null",
    "finite_number": "a finite number",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "greater than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}


def _describe(
    exc: ValidationError, model: type[BaseModel], where_for: Callable[[str], str], skip: frozenset[str]
) -> list[str]:
    """pydantic errors -> one message per key: "<where>: '<key>' is <value>, but it must be <what>"."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for error in exc.errors():
        grouped.setdefault(_key_path(model, error["loc"]), []).append(error)
    messages = []
    for key, errors in grouped.items():
        where = where_for(key.split(".")[0])
        first = errors[0]
        if not key:
            messages.extend(f"{where}: {_plain(e['msg'])}" for e in errors)
        elif key in skip:
            continue
        elif first["type"] == "missing":
            messages.append(f"{where}: '{key}' is required")
        else:
            messages.append(f"{where}: '{key}' is {_show(first['input'])}, but {_requirement(errors)}")
    return messages


def _key_path(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """('video', 'num_frames') -> 'video.num_frames'; union tags and list indices are dropped."""
    parts: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            break
        parts.append(part)
        nested = [
            t
            for t in _accepted_types(current.model_fields[part].annotation)
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        current = nested[0] if nested else None
    return ".".join(parts)


def _requirement(errors: list[dict[str, Any]]) -> str:
    error = errors[0]
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "literal_error":
        return f"it must be one of {ctx['expected']}"
    if kind in _BOUNDS:
        bound, words = _BOUNDS[kind]
        return f"it must be {words} {ctx[bound]}"
    kinds = [_KINDS[e["type"]] for e in errors if e["type"] in _KINDS]
    if kinds:
        return "it must be " + _either(list(dict.fromkeys(kinds)))
    return _plain(error["msg"])


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def _plain(message: str) -> str:
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _show(value: Any) -> str:
    """A value as the user wrote it: strings quoted, None/True as null/true, long values cut."""
    text = repr(value)
    if value is None or isinstance(value, (bool, list, dict)):
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            pass
    return text if len(text) <= 80 else text[:77] + "..."


def describe_kind(value: Any) -> str:
    """What a JSON value is, in words: 'a list', 'a number'..."""
    kinds = {
        dict: "a JSON object",
        list: "a list",
        str: "a string",
        bool: "true/false",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return kinds.get(type(value), type(value).__name__)
