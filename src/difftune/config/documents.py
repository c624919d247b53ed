"""Settings files read as documents: JSON (duplicate keys reported) or TOML, errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from difftune.errors import ConfigError

# Deeper than any settings file needs; far deeper JSON is hostile and would exhaust Python's recursion.
MAX_JSON_DEPTH = 32


def read_document(
    path: Path, what: str = "config", warnings: list[str] | None = None, folder: Path | None = None
) -> Any:
    """Parse a JSON or TOML file; syntax errors name the file, line and column.

    A relative `path` is read from `folder` (None: the working directory); messages name `path` as
    given. A key given twice in one JSON object is added to `warnings` (JSON keeps the last value silently).
    """
    file = path if folder is None or path.is_absolute() else folder / path
    if not file.is_file():
        raise ConfigError(
            f"{path}: {what} file not found (relative paths are read from the working directory "
            f"{folder or Path.cwd()}); create it (`difftune configure` writes one) or point to it"
            + (" with --config PATH" if what == "config" else f" with the '{what}' key")
        )
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file ({exc.reason} at byte {exc.start}); the {what} file must be UTF-8 JSON"
        ) from None
    if path.suffix.lower() == ".toml":
        document = _parse_toml(path, text)
    else:
        document = parse_json(path, text, warnings if warnings is not None else [])
    if _deeper_than(document, MAX_JSON_DEPTH):
        raise ConfigError(
            f"{path}: nested more than {MAX_JSON_DEPTH} levels deep; settings files need only a few "
            f"levels. Check that this is the {what} file"
        )
    return document


def parse_json(path: Path, text: str, warnings: list[str]) -> Any:
    """JSON `text` of the file `path` (named in messages); a key given twice in an object is a warning."""
    repeated: dict[str, int] = {}

    def keep_last(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                repeated[key] = repeated.get(key, 1) + 1
            result[key] = value
        return result

    try:
        document = json.loads(text, object_pairs_hook=keep_last)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg} "
            "(a trailing comma, a missing comma or quote, or a comment is the usual cause)"
        ) from exc
    except RecursionError:
        raise ConfigError(
            f"{path}: nested too deeply to read; settings files need only a few levels (at most "
            f"{MAX_JSON_DEPTH})"
        ) from None
    for key, count in repeated.items():
        warnings.append(
            f"{path}: the key '{key}' is given {count} times in one object; only the last value is used, "
            "so remove the others"
        )
    return document


def _deeper_than(document: Any, limit: int) -> bool:
    """Whether objects and lists nest more than `limit` levels (no recursion: the input may be hostile)."""
    stack = [(document, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            if level > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, level + 1) for child in children)
    return False


def _parse_toml(path: Path, text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError as exc:  # Python 3.10
        raise ConfigError(f"{path}: reading TOML needs Python 3.11 or newer; use a JSON config") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
