"""The prompts validation generates: validation_prompt plus the user prompt library."""

from __future__ import annotations

import json
from pathlib import Path

from difftune.config.schema import TrainConfig
from difftune.errors import ConfigError


def load_prompt_library(path: str | Path) -> list[tuple[str, str]]:
    """A user_prompt_library JSON file: {name: prompt} or {name: {"prompt": prompt, ...}} -> [(name, prompt)]."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"user_prompt_library: {path} does not exist; fix the path or remove the key")
    try:
        library = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"user_prompt_library: {path} is not valid JSON ({error})") from error
    except RecursionError:
        raise ConfigError(
            f'user_prompt_library: {path} is nested too deeply; it holds {{"name": "prompt", ...}}'
        ) from None
    if not isinstance(library, dict):
        raise ConfigError(
            f'user_prompt_library: {path} must hold an object {{"name": "prompt", ...}}, '
            f"not a {type(library).__name__}"
        )
    prompts = []
    for name, entry in library.items():
        prompt = entry.get("prompt") if isinstance(entry, dict) else entry
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(
                f"user_prompt_library: {path}, entry '{name}' needs a prompt: "
                f'"{name}": "a photo of ..." or "{name}": {{"prompt": "a photo of ..."}}'
            )
        prompts.append((str(name), prompt))
    return prompts


def validation_prompts(config: TrainConfig) -> list[tuple[str, str]]:
    """[(name, prompt)]: ("validation", validation_prompt) first, then the library's entries in file order."""
    prompts = []
    if config.validation_prompt:
        prompts.append(("validation", config.validation_prompt))
    if config.user_prompt_library:
        prompts += load_prompt_library(config.user_prompt_library)
    return prompts
