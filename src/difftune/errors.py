"""Errors every layer may raise, and the spelling hint their messages give; imports nothing of difftune."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A setting cannot be used; the message names the file, the key, the value and the fix."""


def nearest(word: str, choices: object) -> str | None:
    """The choice closest in spelling to `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return matches[0] if matches else None
