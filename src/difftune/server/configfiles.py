"""The config files the web UI edits: read and parsed strictly, checked, and written atomically.

A file is written only when what is about to be written is valid JSON (no NaN or Infinity, which
neither the browser nor other tools read back) that loads back to the same valid config; it replaces
the old file in one rename, so a failed save leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from difftune.config.documents import parse_json
from difftune.errors import ConfigError

# (parsed body) -> (the values to save, errors as [{"key", "value", "message"}])
Validator = Callable[[Any], tuple[Any, list[dict[str, Any]]]]


def non_finite(value: Any, key: str = "") -> list[dict[str, Any]]:
    """An error for each NaN or infinite number in a parsed JSON value, named by its key path ("0.resolution")."""
    if isinstance(value, float) and not math.isfinite(value):
        return [
            {
                "key": key,
                "value": None,
                "message": f"is {value} (too large, or NaN/Infinity), which JSON cannot hold; "
                "give a finite number",
            }
        ]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in non_finite(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in non_finite(v, f"{key}.{i}" if key else str(i))]
    return []


def parse_body(raw: bytes, file: Path, warnings: list[str] | None = None) -> Any:
    """A request body as JSON; 400 naming `file` when it is not JSON or is nested too deeply.

    A key given twice in one object is added to `warnings`, as the loader reports it in a file.
    """
    try:
        return parse_json(file, raw.decode("utf-8"), [] if warnings is None else warnings)
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"the body for {file.as_posix()} is not valid JSON: {exc}") from None
    except ConfigError as exc:
        raise HTTPException(400, f"the body for {exc}") from None


def read_config_file(path: Path, shown: Path, empty: Any) -> Any:
    """The JSON in `path` (`empty` if there is none); 422 naming `shown` and the key for what cannot be used."""
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HTTPException(
            422,
            f"{shown.as_posix()} is not valid JSON (line {exc.lineno}, column "
            f"{exc.colno}: {exc.msg}); fix the file or save the form again",
        ) from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise HTTPException(422, f"{shown.as_posix()} cannot be read as JSON ({exc}); fix the file") from None
    problems = non_finite(data)
    if problems:
        first = problems[0]
        raise HTTPException(422, f"{shown.as_posix()}: '{first['key']}' {first['message']} in the file")
    return data


def save_config_file(path: Path, data: Any, validate: Validator) -> list[dict[str, Any]]:
    """Write `data` to `path` if it loads back, valid and unchanged; returns the errors (nothing written) or [].

    Raises HTTPException 507/500 when the disk refuses the write; the old file stays as it was.
    """
    errors = non_finite(data)
    if errors:
        return errors
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    again, errors = validate(json.loads(text))
    if errors:
        return errors
    if again != data:
        return [
            {
                "key": "",
                "value": None,
                "message": f"{path.name} would not load back as given, so it was not written",
            }
        ]
    try:
        replace_atomically(path, text)
    except OSError as exc:
        full = exc.errno == 28  # ENOSPC
        raise HTTPException(
            507 if full else 500,
            f"could not write {path.name} ({exc.strerror or exc}); the previous file is unchanged",
        ) from None
    return []


def replace_atomically(path: Path, text: str) -> None:
    """Write a temporary file next to `path`, flush it to disk, and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
