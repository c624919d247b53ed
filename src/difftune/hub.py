"""Publish a finished run to the Hugging Face Hub: the weights, a model card and the validation images.

One commit holds `pytorch_lora_weights.safetensors` (and the ComfyUI export when present) or, for full
training, the saved model folder; `README.md` (the card) and the validation images under `images/`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.errors import ConfigError
from difftune.families import registry

if TYPE_CHECKING:
    from difftune.config.schema import DatasetConfig, TrainConfig

LORA_FILE = "pytorch_lora_weights.safetensors"
EXTRA_LORA_FILES = ("pytorch_lora_weights_comfyui.safetensors",)
MODEL_FOLDERS = ("unet", "transformer")
# The settings a reader needs to reproduce or judge the run, in the card's table.
CARD_SETTINGS = (
    "model_family",
    "model_flavour",
    "model_type",
    "lora_rank",
    "lora_alpha",
    "use_dora",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "optimizer",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "num_train_epochs",
    "mixed_precision",
    "base_model_precision",
    "seed",
    "snr_gamma",
    "flow_schedule_shift",
    "caption_dropout_probability",
    "validation_resolution",
    "validation_guidance",
    "validation_num_inference_steps",
)
ValidationImage = str | Path | tuple[str, str | Path]  # a path, or (prompt, path)


def push_to_hub(
    output_dir: str | Path,
    hub_model_id: str,
    config: TrainConfig,
    validation_images: Sequence[ValidationImage] = (),
    token: str | None = None,
    api: Any = None,
    datasets: Sequence[DatasetConfig] = (),
    base_model: str | None = None,
    private: bool | None = None,
) -> str:
    """Create (or reuse) the model repo and commit weights, card and images; returns the repo id."""
    from huggingface_hub import CommitOperationAdd

    if not hub_model_id:
        raise ValueError("push_to_hub needs hub_model_id (e.g. 'your-name/my-lora') in config.json")
    output_dir = Path(output_dir)
    weights = _weight_files(output_dir, config)
    images = _image_entries(validation_images, config)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo = api.create_repo(
        repo_id=hub_model_id, token=token, private=private, repo_type="model", exist_ok=True
    )
    repo_id = getattr(repo, "repo_id", None) or hub_model_id
    card = model_card(config, repo_id, [(prompt, name) for prompt, name, _ in images], datasets, base_model)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in weights]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for _, name, path in images
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    api.create_commit(
        repo_id=repo_id,
        operations=operations,
        token=token,
        repo_type="model",
        commit_message=f"difftune: {config.model_family} {config.model_type} weights and card",
    )
    return repo_id


def _weight_files(output_dir: Path, config: TrainConfig) -> list[tuple[str, Path]]:
    """(path in repo, local path) of the weights to upload."""
    if config.model_type in ("lora", "lycoris"):
        lora = output_dir / LORA_FILE
        if not lora.is_file():
            raise FileNotFoundError(
                f"push_to_hub: {lora} does not exist; the run must finish (save its final "
                "weights) before it can be pushed"
            )
        files = [(LORA_FILE, lora)]
        files += [(name, output_dir / name) for name in EXTRA_LORA_FILES if (output_dir / name).is_file()]
        return files
    files = [
        (path.relative_to(output_dir).as_posix(), path)
        for folder in MODEL_FOLDERS
        if (output_dir / folder).is_dir()
        for path in sorted((output_dir / folder).rglob("*"))
        if path.is_file()
    ]
    if not files:
        raise FileNotFoundError(
            f"push_to_hub: no saved model folder ({' or '.join(MODEL_FOLDERS)}) in "
            f"{output_dir}; the run must finish before it can be pushed"
        )
    return files


def _image_entries(
    validation_images: Sequence[ValidationImage], config: TrainConfig
) -> list[tuple[str, str, Path]]:
    """(prompt, path in repo, local path) of each validation image; prompts default to validation_prompt."""
    entries = []
    for i, item in enumerate(validation_images):
        prompt, path = item if isinstance(item, tuple) else (config.validation_prompt or "", item)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"push_to_hub: validation image {path} does not exist")
        entries.append((prompt, f"images/{i:02d}_{path.name}", path))
    return entries


def _resolve_base_model(config: TrainConfig, base_model: str | None) -> str | None:
    """The Hub id of the base model: given, from pretrained_model_name_or_path, or the flavour's default."""
    if base_model:
        return base_model
    named = config.pretrained_model_name_or_path
    if named:
        return None if Path(named).exists() else named
    try:
        return registry.flavour_hub_id(config.model_family, config.model_flavour)
    except ConfigError:
        return None


def _pipeline_tag(config: TrainConfig) -> str:
    """text-to-image, image-to-image, text-to-video or image-to-video, from the flavour's kind."""
    spec = registry.spec(config.model_family)
    source, target = spec.flavour(config.model_flavour).kind.split("2")
    words = {"t": "text", "i": "image", "v": "video"}
    return f"{words[source]}-to-{words[target]}"


def trigger_words(datasets: Sequence[DatasetConfig]) -> list[str]:
    """Instance prompts of the enabled image/video datasets, in order, without repeats."""
    words: list[str] = []
    for dataset in datasets:
        prompt = (dataset.instance_prompt or "").strip()
        if (
            prompt
            and not dataset.disabled
            and dataset.dataset_type in ("image", "video")
            and prompt not in words
        ):
            words.append(prompt)
    return words


def model_card(
    config: TrainConfig,
    repo_id: str,
    images: Sequence[tuple[str, str]],
    datasets: Sequence[DatasetConfig] = (),
    base_model: str | None = None,
) -> str:
    """README.md text: YAML metadata (base_model, tags, widget) and a body with usage, settings, images."""
    base = _resolve_base_model(config, base_model)
    family = registry.canonical_name(config.model_family)
    is_lora = config.model_type in ("lora", "lycoris")
    tags = ["diffusers", "difftune", family, _pipeline_tag(config)]
    if is_lora:
        tags += ["lora", "template:sd-lora"]
    words = trigger_words(datasets)
    meta: list[str] = ["---"]
    if base:
        meta.append(f"base_model: {json.dumps(base)}")
    meta += [
        "library_name: diffusers",
        "license: other",
        f"pipeline_tag: {_pipeline_tag(config)}",
        "tags:",
    ]
    meta += [f"- {tag}" for tag in tags]
    if words:
        meta.append(f"instance_prompt: {json.dumps(', '.join(words))}")
    if images:
        meta.append("widget:")
        for prompt, name in images:
            meta += [f"- text: {json.dumps(prompt)}", "  output:", f"    url: {name}"]
    meta.append("---")

    kind = "LoRA" if is_lora else "fine-tuned model"
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {kind} for {family}" + (f" on [{base}](https://huggingface.co/{base})." if base else "."),
        "Trained with difftune.",
        "",
    ]
    if words:
        body += ["## Trigger words", "", "Use these in the prompt:", ""]
        body += [f"- `{word}`" for word in words]
        body.append("")
    if images:
        body += ["## Validation images", ""]
        for prompt, name in images:
            body += [f"![{_markdown_alt(prompt)}]({name})", ""] + ([f"*{prompt}*", ""] if prompt else [])
    body += ["## Settings", "", "| setting | value |", "| --- | --- |"]
    values = config.model_dump()
    body += [f"| {key} | {values[key]} |" for key in CARD_SETTINGS if values.get(key) is not None]
    body += [
        "",
        "## Use with diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
    ]
    if is_lora:
        body += [
            f"pipeline = DiffusionPipeline.from_pretrained({json.dumps(base or '<base model>')}, "
            "torch_dtype=torch.bfloat16)",
            f"pipeline.load_lora_weights({json.dumps(repo_id)}, weight_name={json.dumps(LORA_FILE)})",
        ]
    else:
        body.append(
            f"pipeline = DiffusionPipeline.from_pretrained({json.dumps(base or '<base model>')}, "
            "torch_dtype=torch.bfloat16)"
        )
        body.append(f"# the trained denoiser is in the {' / '.join(MODEL_FOLDERS)} folder of {repo_id}")
    body += [
        'pipeline.to("cuda")',
        f"prompt = {json.dumps(config.validation_prompt or (words[0] if words else ''))}",
        "result = pipeline(prompt)",
        "```",
        "",
    ]
    return "\n".join(meta) + "\n\n" + "\n".join(body)


def _markdown_alt(text: str) -> str:
    return text.replace("[", "(").replace("]", ")").replace("\n", " ")[:120]
