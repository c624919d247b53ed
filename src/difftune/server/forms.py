"""The config schema as form fields (grouped for the web UI), and validation of what a form sends.

A config.json body is checked by the loader of `difftune train` itself (`check_train_settings`), so the
form accepts and refuses exactly what a run does (the original tool's keys with their warnings,
`lora_type`, `--key` spellings, string values) with the same messages; errors come back as a list of
{"key", "value", "message"}.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from difftune.config.documents import read_document
from difftune.config.keys import TRAIN_ALIASES
from difftune.config.load import check_train_settings, dataset_entry_values, load_config
from difftune.config.schema import CaptionShuffle, DatasetConfig, TrainConfig, VideoConfig
from difftune.config.validate import canonical_keys, prepare_values, validate_model
from difftune.errors import ConfigError
from difftune.families import registry
from difftune.server.fieldhelp import CAPTION_SHUFFLE_HELP, DATASET_HELP, TRAIN_HELP, VIDEO_HELP

GROUPS = ("model", "data", "training", "memory", "validation", "datasets")
NESTED_HELP = {VideoConfig: VIDEO_HELP, CaptionShuffle: CAPTION_SHUFFLE_HELP}

# Keys that users' files spell differently (older or quickstart names) -> the schema's name: the
# loader's own table, so the form and `difftune train` accept the same spellings.
KEY_ALIASES = TRAIN_ALIASES

_MODEL_KEYS = {
    "model_family",
    "model_flavour",
    "model_type",
    "pretrained_model_name_or_path",
    "pretrained_vae_model_name_or_path",
    "revision",
    "prediction_type",
    "output_dir",
    "data_backend_config",
    "lycoris_config",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "use_dora",
    "lora_format",
}
_MEMORY_KEYS = {
    "mixed_precision",
    "gradient_checkpointing",
    "gradient_checkpointing_interval",
    "attention_mechanism",
    "base_model_default_dtype",
    "offload_during_startup",
    "compile_model",
}
_MEMORY_PREFIXES = ("text_encoder_", "base_model_precision", "group_offload", "enable_", "vae_")
_VALIDATION_KEYS = {"num_validation_images", "framerate", "user_prompt_library"}
# the datasets' defaults and where they are read from
_DATA_KEYS = {"data_backend_config", "cache_dir_text", "caption_dropout_probability"} | {
    key for key in DatasetConfig.model_fields if key in TrainConfig.model_fields
}


def group_of(key: str) -> str:
    """Which form group a TrainConfig key belongs to."""
    if key in _DATA_KEYS:
        return "data"
    if key in _MODEL_KEYS:
        return "model"
    if key in _MEMORY_KEYS or key.startswith(_MEMORY_PREFIXES):
        return "memory"
    if key in _VALIDATION_KEYS or key.startswith("validation_"):
        return "validation"
    return "training"


def _constraints(field: FieldInfo) -> dict[str, float]:
    names = {
        annotated_types.Ge: "ge",
        annotated_types.Gt: "gt",
        annotated_types.Le: "le",
        annotated_types.Lt: "lt",
    }
    found = {}
    for item in field.metadata:
        for cls, name in names.items():
            if isinstance(item, cls):
                found[name] = getattr(item, name)
    return found


def _describe_type(annotation: Any) -> dict[str, Any]:
    """JSON-friendly type of an annotation: string, integer, number, boolean, choice, object or json."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        described = _describe_type(members[0]) if len(members) == 1 else {"type": "json"}
        return {**described, "nullable": type(None) in args}
    if origin is Literal:
        return {"type": "choice", "choices": list(args)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {
            "type": "object",
            "fields": [
                describe_field(k, f, NESTED_HELP.get(annotation, {}))
                for k, f in annotation.model_fields.items()
            ],
        }
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return {"type": simple.get(annotation, "json")}


def describe_field(name: str, field: FieldInfo, descriptions: dict[str, str]) -> dict[str, Any]:
    """One form field: name, description, type, default, choices, bounds, whether it is required."""
    described = {"name": name, "nullable": False, **_describe_type(field.annotation)}
    described["description"] = descriptions.get(name)
    described["required"] = field.is_required()
    described["default"] = None if field.is_required() else field.get_default(call_default_factory=True)
    described.update(_constraints(field))
    return described


def schema_groups() -> dict[str, Any]:
    """Fields of config.json grouped as the form shows them, plus the dataset entry's fields.

    The registered families and their flavours are the choices of model_family / model_flavour.
    """
    families = {name: list(spec.flavours) for name, spec in registry.FAMILIES.items()}
    groups: dict[str, list[dict[str, Any]]] = {name: [] for name in GROUPS}
    for name, field in TrainConfig.model_fields.items():
        described = describe_field(name, field, TRAIN_HELP)
        if name == "model_family":
            described.update(type="choice", choices=list(families))
        if name == "model_flavour":
            described["choices_by_family"] = families
        groups[group_of(name)].append(described)
    groups["datasets"] = [
        describe_field(name, field, DATASET_HELP) for name, field in DatasetConfig.model_fields.items()
    ]
    return {"groups": groups, "aliases": KEY_ALIASES}


def normalize_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Drop a leading `--` and map older spellings to the schema's key names."""
    return canonical_keys(raw, TRAIN_ALIASES, frozenset(TrainConfig.model_fields), "form", [])


def check_train(
    raw: Any, folder: Path | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Check a config.json body as `difftune train` does; returns (the settings it gives, typed; errors;
    the loader's warnings). Original-tool keys come back translated (lora_type -> model_type).

    With `folder` (the working folder of the run) the lycoris_config file is read from it and checked
    as the run checks it; without, it is not read (the form writes a missing one first).
    """
    if not isinstance(raw, dict):
        return (
            {},
            [{"key": "", "value": None, "message": "config.json must be a JSON object of key: value"}],
            [],
        )
    settings = check_train_settings(raw, _SOURCE, read_lycoris_file=folder is not None, folder=folder)
    if settings.train is None:
        given = {**{str(k).lstrip("-"): v for k, v in raw.items()}, **normalize_keys(raw)}
        lycoris_file = str(given.get("lycoris_config") or TrainConfig.model_fields["lycoris_config"].default)
        errors = [_problem(message, given) for message in settings.problems]
        for error in errors:  # the LyCORIS file's own messages begin by naming it: shown at its field
            if lycoris_file in error["message"].split(": ", 1)[0]:
                error.update(key="lycoris_config", value=lycoris_file)
        return {}, errors, settings.warnings
    config = settings.train.model_dump(include=settings.given, mode="json")
    return config, [], [w.removeprefix(f"{_SOURCE}: ") for w in settings.warnings]


def validate_train(raw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`check_train` without the warnings (what the validate-first save calls)."""
    config, errors, _ = check_train(raw)
    return config, errors


def run_warnings(folder: Path, config_file: Path, document: Any = None) -> list[str]:
    """The warnings `difftune train` starts with for the config in `folder`, each naming its file.

    `document` is the config as sent (its keys the saved file may drop, such as ignored ones, warn
    too), else the file's. Then the whole load of the saved files: datasets and the family's checks.
    When the datasets do not load (yet), only the config's warnings: what stops the load is for the
    Datasets tab (and the run) to report.
    """
    warnings: list[str] = []
    try:
        if document is None:
            document = read_document(config_file, warnings=warnings, folder=folder)
        if isinstance(document, dict):
            check_train_settings(document, config_file.as_posix(), warnings=warnings, folder=folder)
        warnings += load_config(config_file, folder=folder).warnings
    except ConfigError:
        pass
    return list(dict.fromkeys(warnings))  # the file's own warnings come again with the whole load


_SOURCE = "config.json"
_QUOTED = re.compile(r"'([^']+)'")


def _problem(message: str, given: dict[str, Any]) -> dict[str, Any]:
    """A loader message as a form error: the first quoted key it names (`video.num_frames` for a nested
    one), that key's value, the message."""
    names = set(given) | set(TrainConfig.model_fields) | set(DatasetConfig.model_fields)
    key = next((name for name in _QUOTED.findall(message) if name.split(".")[0] in names), "")
    text = re.sub(r"^(config\.json|config|command line): ", "", message)
    return {"key": key, "value": given.get(key) if "." not in key else None, "message": text}


def validate_datasets(raw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Check a multidatabackend.json body (a list of dataset entries); returns (entries, errors)."""
    if not isinstance(raw, list):
        return [], [
            {"key": "", "value": None, "message": "multidatabackend.json must be a JSON list of datasets"}
        ]
    entries, errors, seen = [], [], set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            errors.append({"key": f"{index}", "value": item, "message": "each dataset must be a JSON object"})
            continue
        label, problems = f"dataset at index {index}", []
        given = dataset_entry_values(item, label, problems, [])  # the loader's key path
        raw_keys = {**{str(k).lstrip("-"): v for k, v in item.items()}, **given}
        if problems:
            errors += _entry_errors(problems, label, index, raw_keys)
            continue
        if given.get("id") is not None and given["id"] in seen:
            errors.append(
                {
                    "key": f"{index}.id",
                    "value": given["id"],
                    "message": f"dataset id '{given['id']}' is used twice; give each dataset its own id",
                }
            )
        seen.add(given.get("id"))
        entry = validate_model(
            DatasetConfig, prepare_values(given, DatasetConfig), lambda _key, label=label: label, problems
        )
        if entry is None:  # the loader's messages
            errors += _entry_errors(problems, label, index, raw_keys)
            continue
        entries.append(entry.model_dump(include=set(given), mode="json", exclude_none=False))
    return entries, errors


def _entry_errors(problems: list[str], label: str, index: int, given: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for message in problems:
        error = _problem(message.removeprefix(f"{label}: "), given)
        found.append({**error, "key": f"{index}.{error['key']}" if error["key"] else f"{index}"})
    return found
