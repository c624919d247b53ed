"""Files the config tests write: a config and its multidatabackend.json, the way a user would."""

import json
from pathlib import Path

IMAGES = {
    "id": "my-images",
    "type": "local",
    "instance_data_dir": "datasets/images",
    "caption_strategy": "textfile",
}
TEXT = {
    "id": "text-embeds",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": True,
    "cache_dir": "cache/text",
}


def write_config(workdir: Path, config, datasets=None, name: str = "config.json") -> Path:
    """Write config/<name> (a dict as JSON, or text as is) and config/multidatabackend.json."""
    folder = workdir / "config"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2))
    backends = [dict(IMAGES), dict(TEXT)] if datasets is None else datasets
    backend_file = folder / "multidatabackend.json"
    backend_file.write_text(backends if isinstance(backends, str) else json.dumps(backends, indent=2))
    return path
