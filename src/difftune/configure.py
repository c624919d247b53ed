"""`difftune configure`: a question-and-answer wizard that writes config/config.json and
config/multidatabackend.json with the quickstarts' defaults for the chosen family and GPU memory.

Answers come from `input_fn`, so the wizard runs in a terminal and with answers piped on stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from difftune.config.schema import DatasetConfig, TrainConfig, parse_resolutions
from difftune.families import registry

CONFIG_FILE = Path("config/config.json")
DATASETS_FILE = Path("config/multidatabackend.json")
LYCORIS_FILE = Path("config/lycoris_config.json")
VRAM_TIERS_GB = (12, 16, 24, 48)

CAPTION_STRATEGIES = {
    "textfile": "a .txt file next to each image/video holds its caption",
    "filename": "the file name is the caption",
    "instanceprompt": "one prompt for every file",
}
# Family defaults the wizard does not copy into config.json: asked for, or set by the training type.
ASKED_OR_BY_TYPE = frozenset({"validation_resolution", "lora_rank"})
LEARNING_RATES = {"lora": 1e-4, "lycoris": 1e-4, "full": 1e-5}


def quickstart(family: str) -> registry.Quickstart:
    """The quickstart's recommendations for a family (its registry row's; neutral ones when it has none)."""
    return registry.spec(family).quickstart


def vram_tier(gigabytes: float) -> int:
    """The preset tier for a GPU with this much memory: 12, 16, 24 or 48 (GB)."""
    tiers = [tier for tier in VRAM_TIERS_GB if gigabytes >= tier - 1]  # a "16 GB" card reports ~15.9
    return tiers[-1] if tiers else VRAM_TIERS_GB[0]


def lycoris_file(family: str) -> dict[str, Any]:
    """config/lycoris_config.json for a LyCORIS run: the original tool's documented LoKr example,
    aimed at the family's attention (and feed-forward) classes, as its registry row names them."""
    targets = list(registry.spec(family).lycoris_targets)
    return {
        "algo": "lokr",
        "multiplier": 1.0,
        "linear_dim": 10000,
        "linear_alpha": 1,
        "factor": 10,
        "apply_preset": {
            "target_module": targets,
            "module_algo_map": {
                name: {"factor": 4 if name.endswith("FeedForward") else 10} for name in targets
            },
        },
    }


def build_files(answers: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """config.json and multidatabackend.json contents for the wizard's answers."""
    family = answers["model_family"]
    spec, preset = registry.spec(family), quickstart(family)
    steps = int(answers["max_train_steps"])
    config: dict[str, Any] = {
        "model_family": family,
        "model_flavour": answers["model_flavour"],
        "model_type": answers["model_type"],
        "output_dir": answers["output_dir"],
        "data_backend_config": DATASETS_FILE.as_posix(),
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_train_steps": steps,
        "learning_rate": LEARNING_RATES[answers["model_type"]],
        "lr_scheduler": "constant",
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "checkpointing_steps": max(1, min(500, steps // 4)),
        "checkpoints_total_limit": 5,
        "validation_prompt": answers["validation_prompt"],
        "validation_resolution": answers["validation_resolution"],
        "validation_steps": max(1, min(250, steps // 10)),
        "seed": 42,
        "report_to": "tensorboard",
        **{key: value for key, value in spec.defaults.items() if key not in ASKED_OR_BY_TYPE},
        **preset.config,
        **preset.memory.get(answers["vram_tier"], {}),
    }
    if answers.get("pretrained_model_name_or_path"):
        config["pretrained_model_name_or_path"] = answers["pretrained_model_name_or_path"]
    if answers["model_type"] == "lora":
        config["lora_rank"] = 16
    if answers["model_type"] == "lycoris":
        config["lycoris_config"] = LYCORIS_FILE.as_posix()
    dataset_id = "my-videos" if spec.is_video else "my-images"
    dataset: dict[str, Any] = {
        "id": dataset_id,
        "type": "local",
        "dataset_type": "video" if spec.is_video else "image",
        "instance_data_dir": answers["dataset_folder"],
        "caption_strategy": answers["caption_strategy"],
        "resolution": answers["resolution"],
        "resolution_type": "pixel_area",
        "cache_dir_vae": f"cache/vae/{family}/{dataset_id}",
        **preset.dataset,
    }
    if answers.get("instance_prompt"):
        dataset["instance_prompt"] = answers["instance_prompt"]
    text_embeds = {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": f"cache/text/{family}",
        "disabled": False,
    }
    return config, [dataset, text_embeds]


class _Asker:
    """Asks one question at a time; an empty answer takes the default, a bad one is asked again."""

    def __init__(self, input_fn: Callable[[str], str], output_fn: Callable[[str], None]) -> None:
        self.input_fn = input_fn
        self.output_fn = output_fn

    def text(self, question: str, default: str, check: Callable[[str], Any] | None = None) -> str:
        while True:
            answer = self.input_fn(f"{question} [{default}]: ").strip() or default
            if check is None:
                return answer
            try:
                check(answer)
                return answer
            except (ValueError, TypeError) as exc:
                self.output_fn(f"  '{answer}' is not valid: {exc}")

    def choice(
        self,
        question: str,
        options: dict[str, str],
        default: str,
        other: Callable[[str], str] | None = None,
    ) -> str:
        """One of `options` by number or name; with `other`, any answer it accepts (its return value)."""
        names = list(options)
        self.output_fn(question)
        for number, name in enumerate(names, 1):
            self.output_fn(f"  {number}) {name}: {options[name]}" if options[name] else f"  {number}) {name}")
        while True:
            answer = self.input_fn(f"choose 1-{len(names)} or a name [{default}]: ").strip() or default
            if answer.isdigit() and 1 <= int(answer) <= len(names):
                return names[int(answer) - 1]
            if answer in options:
                return answer
            if other is None:
                self.output_fn(f"  '{answer}' is not one of: {', '.join(names)}")
                continue
            try:
                return other(answer)
            except ValueError as exc:
                self.output_fn(f"  '{answer}' is not one of: {', '.join(names)}, {exc}")

    def yes(self, question: str, default: bool = False) -> bool:
        while True:
            answer = self.input_fn(f"{question} [{'Y/n' if default else 'y/N'}]: ").strip().lower()
            if not answer:
                return default
            if answer in ("y", "yes", "n", "no"):
                return answer.startswith("y")
            self.output_fn("  answer y or n")


def local_model_folder(text: str) -> str:
    """The absolute path of a local diffusers model folder (it holds model_index.json); ValueError if not."""
    folder = Path(text).expanduser()
    if (folder / "model_index.json").is_file():
        return str(folder.resolve())
    if folder.is_dir():
        raise ValueError(
            f"and the folder {folder} has no model_index.json: a diffusers model folder holds it and one "
            "subfolder per component (save_pretrained or a downloaded Hub snapshot writes that layout)"
        )
    raise ValueError("nor a local model folder")


def _positive_number(text: str) -> float:
    value = float(text.lower().removesuffix("+").removesuffix("gb").strip())
    if value <= 0:
        raise ValueError("give the GPU memory in GB, e.g. 24")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def ask_questions(ask: _Asker) -> dict[str, Any]:
    """Every question of the wizard, in order; returns the answers."""
    families = {name: spec.title for name, spec in registry.FAMILIES.items()}
    answers: dict[str, Any] = {"model_family": ask.choice("Model family:", families, next(iter(families)))}
    spec, preset = registry.spec(answers["model_family"]), quickstart(answers["model_family"])
    flavours = {name: flavour.description for name, flavour in spec.flavours.items()}
    model = ask.choice(
        "Model flavour (downloaded from the Hub), or the path of a local diffusers model folder:",
        flavours,
        spec.default_flavour,
        other=local_model_folder,
    )
    if model in spec.flavours:
        answers["model_flavour"] = model
    else:  # a local folder: the family's default flavour names its settings
        answers["model_flavour"], answers["pretrained_model_name_or_path"] = spec.default_flavour, model
    answers["model_type"] = ask.choice(
        "Training type:",
        {
            "lora": "low-rank adapter (small file, least memory)",
            "lycoris": "LyCORIS LoKr adapter (writes config/lycoris_config.json)",
            "full": "every weight (much more memory)",
        },
        "lora",
    )
    media = "videos" if spec.is_video else "images"
    answers["dataset_folder"] = ask.text(f"Folder with your {media}", f"datasets/my_{media}")
    answers["caption_strategy"] = ask.choice("Captions:", CAPTION_STRATEGIES, "textfile")
    if answers["caption_strategy"] == "instanceprompt":
        answers["instance_prompt"] = ask.text("The prompt for every file", "a photo of sks person")
    answers["resolution"] = int(
        ask.text("Training resolution (pixels, short side)", str(preset.resolution), _positive_int)
    )
    square = f"{answers['resolution']}x{answers['resolution']}"
    suggested = preset.validation_resolution if answers["resolution"] == preset.resolution else None
    answers["validation_resolution"] = ask.text(
        "Validation resolution (WxH, comma-separated for several)", suggested or square, parse_resolutions
    )
    vram = _positive_number(ask.text("GPU memory in GB (12, 16, 24, 48+)", "24", _positive_number))
    answers["vram_tier"] = vram_tier(vram)
    answers["max_train_steps"] = int(ask.text("Training steps", "2000", _positive_int))
    answers["validation_prompt"] = ask.text("Validation prompt", preset.validation_prompt)
    answers["output_dir"] = ask.text("Output folder", "output/models")
    answers["vram_gb"] = vram
    return answers


def run_wizard(
    input_fn: Callable[[str], str] = input,
    output_fn: Callable[[str], None] = print,
    workdir: Path = Path("."),
) -> list[Path]:
    """Ask, then write config/config.json and config/multidatabackend.json under `workdir`.

    Returns the files written; an empty list if the user declined to overwrite existing ones.
    EOFError from `input_fn` (answers ran out) propagates, with nothing written.
    """
    ask = _Asker(input_fn, output_fn)
    targets = [Path(workdir) / CONFIG_FILE, Path(workdir) / DATASETS_FILE]
    existing = [path for path in targets if path.exists()]
    if existing:
        names = " and ".join(str(path) for path in existing)
        if not ask.yes(
            f"{names} already exist{'s' if len(existing) == 1 else ''}. Overwrite?", default=False
        ):
            output_fn("Nothing written; existing files kept.")
            return []
    answers = ask_questions(ask)
    preset = quickstart(answers["model_family"])
    title = registry.spec(answers["model_family"]).title
    config, datasets = build_files(answers)
    try:  # the same checks `difftune train` makes: never write a file it would refuse
        TrainConfig.model_validate(config)
        for entry in datasets:
            DatasetConfig.model_validate(entry)
    except ValidationError as exc:
        raise ValueError(f"the answers make an invalid config: {exc}") from exc

    memory = preset.memory.get(answers["vram_tier"], {})
    output_fn(
        f"\nMemory settings for {answers['vram_gb']:g} GB (the {answers['vram_tier']} GB preset): "
        + (", ".join(f"{k}={v}" for k, v in memory.items()) or "none needed")
    )
    if answers["vram_gb"] < preset.minimum_vram_gb:
        output_fn(
            f"Note: {title} wants at least {preset.minimum_vram_gb} GB; expect to run out of "
            "memory, or lower the resolution."
        )
    if not (Path(workdir) / answers["dataset_folder"]).is_dir():
        output_fn(
            f"Note: {answers['dataset_folder']} does not exist yet; create it and put your files there "
            "(with .txt captions when captions come from text files)."
        )
    files = list(zip(targets, (config, datasets)))
    if answers["model_type"] == "lycoris":
        lycoris = Path(workdir) / LYCORIS_FILE
        if lycoris.exists():
            output_fn(f"kept {lycoris} (your LyCORIS settings)")
        else:
            files.append((lycoris, lycoris_file(answers["model_family"])))
            targets.append(lycoris)
    for path, data in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        output_fn(f"wrote {path}")
    output_fn("Next: difftune train   (or difftune server for the web UI)")
    return targets


def _echoing_input(prompt: str) -> str:
    """input() for piped answers: show each answer after its question, as a terminal would."""
    answer = input(prompt)
    print(answer)
    return answer


CONFIGURE_EPILOG = """asks:
  the model family and flavour (or a local model folder), LoRA or full training, the dataset folder
  and how its captions are stored, the resolution, your GPU memory (which picks the memory settings),
  the training steps, a validation prompt and the output folder; Enter keeps the shown default.

writes:
  config/config.json and config/multidatabackend.json under --workdir (asks before overwriting);
  then run `difftune train` there. Answers may be piped on stdin, one per line.

example:
  difftune configure --workdir my-run && cd my-run && difftune train
"""


def main(argv: list[str] | None = None) -> int:
    """`difftune configure [--workdir DIR]`; 0 when the files were written."""
    parser = argparse.ArgumentParser(
        prog="difftune configure",
        description=__doc__.split("\n\n")[0],
        epilog=CONFIGURE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default=".", help="folder that gets config/ (default: the current one)")
    args = parser.parse_args(argv)
    input_fn = input if sys.stdin.isatty() else _echoing_input
    try:
        written = run_wizard(input_fn=input_fn, workdir=Path(args.workdir))
    except EOFError:
        print(
            "\ndifftune configure: the answers ended before the last question; nothing was written",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\ndifftune configure: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0 if written else 1
