"""Load config.json (or config.toml) and multidatabackend.json into typed, checked settings.

The path of a setting from file to schema: key spelling (`--key` or `key`, aliases) -> keys outside
the schema (error with the nearest valid key; the original tool's keys refused, or ignored with a
warning when they cannot change the weights, as `original_keys` says) -> family defaults for keys the user did not set -> value coercion ("none", JSON strings) ->
pydantic validation (lax: "true", "1e-4", "20") -> cross-key checks. Every problem found on the way
is reported at once, each naming the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.config import dataset_defaults, keys, optimizers, original_keys, training_checks, validate
from difftune.config.documents import read_document
from difftune.config.memory import resolve_memory_settings
from difftune.config.schema import DatasetConfig, TrainConfig, VideoConfig
from difftune.errors import ConfigError
from difftune.families import registry
from difftune.training.checkpoint_paths import outside_output_dir_problem

DEFAULT_CONFIG_PATHS = (Path("config/config.json"), Path("config/config.toml"))
RESOLVED_FILE_NAME = "config.resolved.json"
# A config file may hold its datasets inline under this key (config.resolved.json does).
INLINE_DATASETS_KEY = "datasets"
_CLI = "command line"


@dataclass
class LoadedConfig:
    """A run's settings: the train config, its datasets and the warnings met while loading."""

    train: TrainConfig
    datasets: list[DatasetConfig]  # enabled ones, in file order
    all_datasets: list[DatasetConfig]  # disabled ones included
    warnings: list[str]
    source: Path
    text_embeds_dataset: DatasetConfig | None = None  # None: text cache under cache/text/<family>
    data_backend_source: Path | None = None  # None when the datasets were inline in the config file


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    data_config_path: str | Path | None = None,
    folder: Path | None = None,
) -> LoadedConfig:
    """Read, check and type a config file (default config/config.json) and its data backend config.

    `overrides` (e.g. from `parse_cli_overrides`) replace the file's values, with the same aliasing
    and checks. Relative paths (the config, data backend and LyCORIS files) are read from `folder`,
    None meaning the working directory, as `difftune train` reads them; messages name them as given.
    Raises ConfigError listing every problem found.
    """
    source = Path(path) if path is not None else _default_config_path()
    warnings: list[str] = []
    document = read_document(source, warnings=warnings, folder=folder)
    if not isinstance(document, dict):
        raise ConfigError(
            f'{source}: must hold one JSON object of settings ({{"key": value, ...}}), '
            f"found {validate.describe_kind(document)}"
        )
    settings = check_train_settings(
        document, str(source), overrides, data_config_path, warnings, folder=folder
    )
    _raise_if_any(settings.problems)
    train, inline_datasets = settings.train, settings.inline_datasets
    assert train is not None

    if inline_datasets is not None and data_config_path is None:
        data_source, raw_datasets, data_where = None, inline_datasets, f"{source} ({INLINE_DATASETS_KEY})"
    else:
        data_source = Path(train.data_backend_config)
        raw_datasets = read_document(
            data_source, what="data_backend_config", warnings=warnings, folder=folder
        )
        data_where = str(data_source)
    all_datasets = _load_datasets(raw_datasets, data_where, train, warnings)
    warnings += _family_check(train, all_datasets, source)
    enabled = [d for d in all_datasets if not d.disabled]
    return LoadedConfig(
        train=train,
        datasets=enabled,
        all_datasets=all_datasets,
        warnings=warnings,
        source=source,
        text_embeds_dataset=_pick_text_embeds(enabled, data_where, warnings),
        data_backend_source=data_source,
    )


@dataclass
class TrainSettings:
    """The train settings of one config document as `load_config` reads them, before any dataset."""

    train: TrainConfig | None  # None when `problems` is not empty
    given: set[str]  # the schema keys the document (or an override) sets, original-tool keys translated
    inline_datasets: Any
    warnings: list[str]
    problems: list[str]  # each names the source, the key, the value and the fix


def check_train_settings(
    document: dict[str, Any],
    source: str,
    overrides: dict[str, Any] | None = None,
    data_config_path: str | Path | None = None,
    warnings: list[str] | None = None,
    read_lycoris_file: bool = True,
    folder: Path | None = None,
) -> TrainSettings:
    """Read the train settings of a config document (`source` names it in messages); never raises.

    `load_config` and the web form both take this path, so they accept and refuse the same keys.
    `read_lycoris_file` False leaves the lycoris_config file to the caller (the form writes a missing
    one first); a relative lycoris_config is read from `folder` (None: the working directory).
    """
    warnings = [] if warnings is None else warnings
    problems: list[str] = []
    train_keys = set(TrainConfig.model_fields)
    known = train_keys | keys.ORIGINAL_TRAIN_KEYS | {INLINE_DATASETS_KEY}

    values, origin = {}, {}
    for where, raw in ((source, document), (_CLI, overrides or {})):
        for key, value in validate.canonical_keys(raw, keys.TRAIN_ALIASES, known, where, problems).items():
            values[key], origin[key] = value, where
    inline_datasets = values.pop(INLINE_DATASETS_KEY, None)
    if isinstance(values.get("caption_strategy"), str):
        values["caption_strategy"] = keys.CAPTION_STRATEGY_ALIASES.get(
            values["caption_strategy"], values["caption_strategy"]
        )
    _apply_lora_type(values, origin, problems)
    optimizers.apply_original_name(values, origin, problems)
    values = validate.drop_unknown(
        values, TrainConfig, original_keys.TRAIN_KEYS, keys.TRAIN_ALIASES, origin, problems, warnings
    )
    values = validate.prepare_values(values, TrainConfig)
    if data_config_path is not None:
        values["data_backend_config"] = str(data_config_path)

    if str(values.get("offset_noise", "")).strip().lower() == "true" and "noise_offset" not in values:
        values["noise_offset"] = 0.1  # the original tool's default strength
    if str(values.get("flow_schedule_auto_shift", "")).strip().lower() == "true":
        training_checks.auto_shift_over_static(values, origin, problems)
    family = _check_family(values, origin, problems)
    given = set(values) & set(TrainConfig.model_fields)  # what the document says, translated
    if family is not None:
        for key, default in family.defaults.items():
            values.setdefault(key, default)
    train = validate.validate_model(
        TrainConfig,
        values,
        lambda key: origin.get(key, source),
        problems,
        skip=frozenset({"model_family"}),
    )
    if train is not None and family is not None:
        problems.extend(_cross_key_problems(train, family, origin))
        warnings.extend(_unused_validation_settings(train, origin, Path(source)))
        train = resolve_memory_settings(train, origin, warnings, problems)
        problems.extend(_package_problems(train, origin))
    if train is not None and train.model_type == "lycoris" and read_lycoris_file:
        problems.extend(_lycoris_problems(train, warnings, folder))
    if problems or family is None:
        train = None
    return TrainSettings(train, given, inline_datasets, warnings, problems)


def write_resolved(loaded: LoadedConfig, output_dir: str | Path) -> Path:
    """Write output_dir/config.resolved.json: every setting as used (defaults included) and the datasets.

    The file loads again with `load_config` (its datasets are inline), reproducing the run's settings.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    document = loaded.train.model_dump(mode="json")
    if loaded.train.flow_schedule_auto_shift:
        document["flow_schedule_shift"] = 0  # the shift comes from each batch's size (0 lets auto shift act)
    document[INLINE_DATASETS_KEY] = [d.model_dump(mode="json") for d in loaded.all_datasets]
    target = folder / RESOLVED_FILE_NAME
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    partial.replace(target)
    return target


def parse_cli_overrides(argv: list[str]) -> dict[str, str]:
    """`--key value`, `--key=value` and a bare `--flag` ("true") -> {key: value}; the last one wins."""
    overrides: dict[str, str] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"command line: unexpected argument {token!r}; give settings as --key value or --key=value"
            )
        name, has_value, value = token[2:].partition("=")
        if not name:
            raise ConfigError(f"command line: {token!r} has no key name; write --key=value")
        if not has_value:
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is not None and not following.startswith("--"):
                value, index = following, index + 1
            else:
                value = "true"
        overrides[name] = value
        index += 1
    return overrides


# -- reading files ------------------------------------------------------------------------------
def _default_config_path() -> Path:
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_CONFIG_PATHS[0]


def _apply_lora_type(values: dict[str, Any], origin: dict[str, str], problems: list[str]) -> None:
    """The original tool spells a LyCORIS run as model_type lora + lora_type lycoris."""
    if "lora_type" not in values:
        return
    lora_type = str(values.pop("lora_type")).strip().lower()
    if lora_type == "lycoris" and str(values.get("model_type", "")).strip().lower() == "lora":
        values["model_type"] = "lycoris"
    elif lora_type not in ("standard", "lycoris"):
        problems.append(
            f"{origin['lora_type']}: 'lora_type' is {lora_type!r}, but it must be 'standard' or 'lycoris'"
        )


def _raise_if_any(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(
            f"{len(problems)} problems in the configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _family_check(train: TrainConfig, datasets: list[DatasetConfig], source: Path) -> list[str]:
    """The family's own checks of the settings and datasets (no weights needed); its warnings."""
    from difftune.families import get_family

    try:
        return [f"{source}: {warning}" for warning in get_family(train).check(datasets)]
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error


# -- checks across keys ---------------------------------------------------------------------------
def _check_family(
    values: dict[str, Any], origin: dict[str, str], problems: list[str]
) -> registry.FamilySpec | None:
    """The family's registry row (model_family made canonical) with a known model_flavour, or None after a problem."""
    given = values.get("model_family")
    if given is None or not str(given).strip():
        problems.append(
            f"{origin.get('model_family', 'config')}: 'model_family' is required; "
            f"use one of {', '.join(registry.FAMILIES)}"
        )
        return None
    try:
        family = registry.spec(str(given))
    except ConfigError as error:
        problems.append(f"{origin['model_family']}: {error}")
        return None
    values["model_family"] = family.name
    flavour = values.get("model_flavour")
    if flavour is not None:
        try:
            family.flavour(str(flavour))
        except ConfigError as error:
            problems.append(f"{origin['model_flavour']}: {error}")
    return family


def _cross_key_problems(train: TrainConfig, family: registry.FamilySpec, origin: dict[str, str]) -> list[str]:
    problems = []
    if train.webhook_config:
        from difftune.webhooks import WebhookConfigError, load_webhook_config

        try:
            load_webhook_config(train.webhook_config)
        except WebhookConfigError as exc:
            problems.append(f"{origin.get('webhook_config', 'config')}: {exc}")
    if train.enable_group_offload and train.enable_model_cpu_offload:
        where = origin.get("enable_model_cpu_offload", "config")
        problems.append(
            f"{where}: 'enable_group_offload' and 'enable_model_cpu_offload' are both true; both move weights "
            "between CPU and GPU and conflict with each other. Pick one: group offload saves more memory "
            "during training, model CPU offload is simpler; set the other to false"
        )
    problems.extend(training_checks.objective_problems(train, origin))
    problems.extend(training_checks.crepa_tread_problems(train, origin))
    if not family.flow_matching:
        problems.extend(training_checks.flow_key_problems(train, origin))
    outside = outside_output_dir_problem(
        train.output_dir, train.resume_from_checkpoint, train.allow_resume_outside_output_dir
    )
    if outside:
        problems.append(f"{origin.get('resume_from_checkpoint', 'config')}: {outside}")
    problems.extend(training_checks.optimizer_problems(train, origin))
    frames = train.validation_num_video_frames
    if frames is not None:
        problem = family.frame_count_problem(frames)
        if problem:
            problems.append(
                f"{origin.get('validation_num_video_frames', 'config')}: 'validation_num_video_frames' "
                f"is {frames}, but {problem}"
            )
    return problems


# Settings that only shape validation samples: setting one says the user expects samples.
_VALIDATION_KEYS = (
    "validation_resolution",
    "validation_guidance",
    "validation_num_inference_steps",
    "validation_steps",
    "validation_num_video_frames",
    "validation_negative_prompt",
    "validation_seed",
    "num_validation_images",
)


def _unused_validation_settings(train: TrainConfig, origin: dict[str, str], source: Path) -> list[str]:
    """A warning when validation settings are given but no prompt would ever be sampled (a resolved
    config, which lists every setting, does not count as giving them)."""
    if train.validation_disable or train.validation_prompt or train.user_prompt_library:
        return []
    given = [key for key in _VALIDATION_KEYS if key in origin and source.name != RESOLVED_FILE_NAME]
    if not given:
        return []
    where = origin[given[0]]
    return [
        f"{where}: validation settings are set ({', '.join(given)}) but there is no validation_prompt or "
        "user_prompt_library, so no samples will be made — add a validation_prompt to see samples "
        "during training, or set validation_disable to true"
    ]


# base_model_precision suffix -> (module to import, package to install)
_PRECISION_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "torchao": ("torchao", "torchao")}


def _package_problems(train: TrainConfig, origin: dict[str, str]) -> list[str]:
    """A problem when the quantisation back-end the run will use is not installed."""
    package = _missing_package(train.base_model_precision)
    if package is None:
        return []
    return [
        f"{origin.get('base_model_precision', 'config')}: 'base_model_precision' is "
        f"'{train.base_model_precision}', which needs the {package} package, and it is not installed "
        f'— pip install {package} (or pip install -e ".[quant]" for both quantisation back-ends), '
        "or set base_model_precision to no_change"
    ]


def _missing_package(precision: str) -> str | None:
    """The pip package a precision setting needs when it is not installed, else None."""
    module, package = _PRECISION_PACKAGES.get(precision.rpartition("-")[2], (None, None))
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or hidden from this process
        found = False
    return None if found else package


def _lycoris_problems(train: TrainConfig, warnings: list[str], folder: Path | None) -> list[str]:
    """The lycoris_config file of a LyCORIS run, read and checked against the rest of the config."""
    from difftune.config.lycoris import check_lycoris_run, read_lycoris_config

    try:
        settings = read_lycoris_config(train.lycoris_config, folder)
    except ConfigError as exc:
        return [str(exc)]
    if train.lora_format == "comfyui":
        warnings.append(
            f"lora_format comfyui: a LyCORIS run writes pytorch_lora_weights.safetensors in LyCORIS's "
            f"own key layout ({train.lycoris_config}), which ComfyUI reads; no second file is written"
        )
    return check_lycoris_run(settings, train, train.lycoris_config)


# -- datasets -------------------------------------------------------------------------------------
def dataset_entry_values(
    entry: dict[str, Any], label: str, problems: list[str], warnings: list[str]
) -> dict[str, Any]:
    """One dataset entry's keys as the schema spells them: `--key` and aliases (`disable`) mapped, the
    original tool's keys refused or dropped with a warning, the video block likewise. The loader and
    the web form both take this path."""
    known = set(DatasetConfig.model_fields) | keys.ORIGINAL_DATASET_KEYS
    known_video = set(VideoConfig.model_fields) | keys.ORIGINAL_VIDEO_KEYS
    values = validate.canonical_keys(entry, keys.DATASET_ALIASES, known, label, problems)
    values = validate.drop_unknown(
        values, DatasetConfig, original_keys.DATASET_KEYS, keys.DATASET_ALIASES, label, problems, warnings
    )
    if isinstance(values.get("video"), dict):
        video = validate.canonical_keys(values["video"], keys.VIDEO_ALIASES, known_video, label, problems)
        video = validate.drop_unknown(
            video,
            VideoConfig,
            original_keys.VIDEO_KEYS,
            keys.VIDEO_ALIASES,
            label,
            problems,
            warnings,
            "video.",
        )
        values["video"] = validate.prepare_values(video, VideoConfig)
    strategy = values.get("caption_strategy")
    if isinstance(strategy, str):
        values["caption_strategy"] = keys.CAPTION_STRATEGY_ALIASES.get(strategy, strategy)
    return values


def _load_datasets(raw: Any, where: str, train: TrainConfig, warnings: list[str]) -> list[DatasetConfig]:
    """Every entry of a multidatabackend list, checked; raises ConfigError listing all problems.

    Keys a dataset does not set take the top-level defaults (dataset_defaults.DATASET_DEFAULT_KEYS, and cache_dir_text
    for the text_embeds dataset); a video dataset's num_frames that the family's VAE cannot take
    is lowered to the nearest count it can, with a warning.
    """
    family = registry.spec(train.model_family)
    if not isinstance(raw, list):
        raise ConfigError(
            f'{where}: must hold a JSON list of datasets ([{{"id": ...}}, ...]), found {validate.describe_kind(raw)}'
        )
    problems: list[str] = []
    datasets = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            problems.append(
                f"{where}: the entry at index {index} must be a JSON object, found {validate.describe_kind(entry)}"
            )
            continue
        name = entry.get("id")
        label = f"{where}, dataset '{name}' (index {index})" if name else f"{where}, dataset at index {index}"
        values = dataset_entry_values(entry, label, problems, warnings)
        values = dataset_defaults.with_defaults(values, train)
        dataset = validate.validate_model(
            DatasetConfig,
            validate.prepare_values(values, DatasetConfig),
            lambda _key, label=label: label,
            problems,
        )
        if dataset is None:
            continue
        datasets.append(dataset)
        if dataset.video is not None and not dataset.disabled and dataset.dataset_type == "video":
            frames = dataset.video.num_frames
            usable = family.usable_frame_count(frames)
            if usable != frames:
                step = family.frames_per_latent
                warnings.append(
                    f"{label}: 'video.num_frames' is {frames}, but {family.name} needs (frames - 1) divisible "
                    f"by {step} (its VAE compresses time {step}x); training on {usable} frames instead"
                )
                dataset.video.num_frames = usable
    for dataset_id, count in Counter(d.id for d in datasets).items():
        if count > 1:
            where_used = [
                str(i) for i, e in enumerate(raw) if isinstance(e, dict) and e.get("id") == dataset_id
            ]
            problems.append(
                f"{where}: dataset id '{dataset_id}' is used {count} times (indexes "
                f"{', '.join(where_used)}); each dataset needs its own id"
            )
    enabled = [d for d in datasets if not d.disabled]
    flavour = train.model_flavour or family.default_flavour
    if flavour in family.flavours and family.flavours[flavour].kind == "i2v":
        problems += training_checks.image_to_video_problems(
            enabled, where, f"model_flavour '{flavour}'", family.frames_per_latent
        )
    recropped = [
        d.id
        for d in enabled
        if d.crop and d.crop_style == "random" and d.vae_cache_clear_each_epoch is not False
    ]
    if recropped and train.crepa_enabled and train.crepa_drop_vae_encoder:
        problems.append(
            f"{where}: dataset(s) {', '.join(recropped)} draw a new random crop each epoch, which the VAE "
            "encoder encodes, but crepa_drop_vae_encoder removes it; set crop_style center, or "
            '"vae_cache_clear_each_epoch": false on them, or crepa_drop_vae_encoder false'
        )
    regularisation = [d.id for d in enabled if d.is_regularisation_data]
    if regularisation and train.model_type == "full":
        problems.append(
            f"{where}: dataset(s) {', '.join(regularisation)} set is_regularisation_data, whose target is the "
            "base model's prediction with the adapter switched off; full training has no adapter, so use "
            "model_type lora (or lycoris) or remove is_regularisation_data"
        )
    eval_ids = [d.id for d in enabled if d.dataset_type == "eval"]
    if train.eval_dataset_id is not None and train.eval_dataset_id not in eval_ids:
        problems.append(
            f"{where}: eval_dataset_id '{train.eval_dataset_id}' names no enabled dataset of dataset_type eval "
            f"(eval datasets: {', '.join(eval_ids) or 'none'}); add one with that id and "
            '"dataset_type": "eval", or remove eval_dataset_id'
        )
    if not problems and not any(d.dataset_type in ("image", "video") for d in enabled):
        problems.append(
            f'{where}: no enabled image or video dataset; add an entry with "dataset_type": '
            '"image" (or "video") and "instance_data_dir", or set "disabled": false on one'
        )
    _raise_if_any(problems)
    return datasets


def _pick_text_embeds(enabled: list[DatasetConfig], where: str, warnings: list[str]) -> DatasetConfig | None:
    """The one text_embeds dataset that holds the text cache (the `default` one when several are enabled)."""
    candidates = [d for d in enabled if d.dataset_type == "text_embeds"]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    defaults = [d for d in candidates if d.default]
    ids = ", ".join(f"'{d.id}'" for d in candidates)
    if len(defaults) != 1:
        raise ConfigError(
            f"{where}: {len(candidates)} enabled text_embeds datasets ({ids}) and "
            f'{len(defaults)} of them marked "default": true; difftune keeps one text cache, '
            "so mark exactly one as default or disable the others"
        )
    chosen = defaults[0]
    unused = ", ".join(f"'{d.id}'" for d in candidates if d is not chosen)
    warnings.append(
        f"{where}: text_embeds dataset(s) {unused} are not used; difftune keeps one text cache, "
        f"in the default one '{chosen.id}'"
    )
    return chosen
