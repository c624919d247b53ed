"""The layer rule: config/, data/, training/ and validation/ name no model family; what a family is and
does lives in families/ (its registry row and its module), reached through the Family protocol."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import difftune
from difftune.families import registry

NEUTRAL_PACKAGES = ("config", "data", "training", "validation")

# (file under src/difftune, text on the line) -> why that mention stays. Every entry must still match.
ALLOWED = {
    ("config/original_keys.py", '"sdxl_refiner_uses_full_range"'): (
        "a key of the original tool's config.json, refused for every family"
    ),
}


def family_words(name: str, folder: Path) -> set[str]:
    """What names a family: its registry name (both spellings) and the name's leading word, its title,
    its flavours' Hub ids and organisations, and the classes its diffusers folder holds: the pipeline,
    the denoiser (under the row's adapter_prefix) and the text encoders."""
    spec = registry.spec(name)
    index = json.loads((folder / "model_index.json").read_text())
    classes = {index["_class_name"], index[spec.adapter_prefix][1]}
    classes |= {part[1] for key, part in index.items() if key.startswith("text_encoder") and part[1]}
    hub_ids = {flavour.hub_id for flavour in spec.flavours.values()}
    stem = re.match(r"[a-z]*", spec.name).group()
    words = {spec.name, spec.name.replace("-", "_"), spec.title} | hub_ids | classes
    words |= {hub_id.split("/")[0] for hub_id in hub_ids}
    return words | ({stem} if len(stem) >= 4 else set())


def neutral_lines():
    """(file under src/difftune, line number, text) of every line, comments and docstrings included."""
    root = Path(difftune.__file__).parent
    for package in NEUTRAL_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                yield relative, number, text


def allowed_by(relative: str, text: str) -> tuple[str, str] | None:
    return next((key for key in ALLOWED if key[0] == relative and key[1] in text), None)


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_config_data_training_and_validation_do_not_name_the_family(name, tiny_model):
    words = family_words(name, tiny_model(name))
    found = [
        f"src/difftune/{relative}:{number}: '{word}' in {text.strip()!r}"
        for relative, number, text in neutral_lines()
        for word in sorted(words)
        if word.lower() in text.lower() and allowed_by(relative, text) is None
    ]
    assert not found, (
        f"{name} is named outside families/; move the fact behind the Family protocol or its registry "
        "row, or word it for any family (or add an ALLOWED entry with the reason):\n" + "\n".join(found)
    )


def test_every_allowed_mention_is_still_there():
    used = {allowed_by(relative, text) for relative, _, text in neutral_lines()}
    assert set(ALLOWED) <= used, f"ALLOWED entries that match no line any more: {set(ALLOWED) - used}"
