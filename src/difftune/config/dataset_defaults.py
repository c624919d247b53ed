"""Top-level keys as the defaults of every dataset, and the placeholders of dataset entries."""

from __future__ import annotations

import os
import re
from typing import Any

from difftune.config.schema import TrainConfig

# Top-level keys that are the defaults of every image, video, conditioning or eval dataset.
DATASET_DEFAULT_KEYS = (
    "resolution",
    "resolution_type",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "caption_strategy",
    "instance_prompt",
    "prepend_instance_prompt",
    "only_instance_prompt",
    "crop",
    "crop_aspect",
    "crop_aspect_buckets",
    "crop_style",
    "cache_dir_vae",
)
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


def expand_placeholders(value: Any, variables: dict[str, str]) -> Any:
    """'{model_family}', '{output_dir}', '{id}' and '{env:NAME}' in every string of a dataset entry.

    The original tool's example files write e.g. "cache_dir_vae": "cache/vae/{model_family}/{id}".
    A placeholder that is not one of these stays as written.
    """
    if isinstance(value, dict):
        return {key: expand_placeholders(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_placeholders(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        token = match.group(1)
        if token.startswith("env:"):
            return os.environ.get(token[4:], "")
        return variables.get(token, match.group(0))

    return _PLACEHOLDER.sub(replace, value)


def with_defaults(values: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    """A dataset entry with the top-level defaults for the keys it does not set, placeholders expanded."""
    kind = values.get("dataset_type", "image")
    filled = dict(values)
    if kind in ("text_embeds", "image_embeds"):
        if kind == "text_embeds" and "cache_dir" not in filled and train.cache_dir_text:
            filled["cache_dir"] = train.cache_dir_text
    else:
        for key in DATASET_DEFAULT_KEYS:
            default = getattr(train, key)
            if key not in filled and default is not None:
                filled[key] = default
    block = filled.get("parquet")
    if filled.get("caption_strategy") == "parquet" and (block is None or isinstance(block, dict)):
        block = dict(block or {})
        for column, default in (
            ("filename_column", train.parquet_filename_column),
            ("caption_column", train.parquet_caption_column),
        ):
            if block.get(column) is None and default is not None:
                block[column] = default
        filled["parquet"] = block
    variables = {
        "model_family": train.model_family,
        "output_dir": train.output_dir,
        "id": str(filled.get("id", "")),
    }
    return expand_placeholders(filled, variables)
