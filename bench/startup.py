"""Start-up: seconds from `python -m difftune train` to the first optimizer step, peak RSS, CLI import cost.

For each family's tiny model, `python -m difftune train --config ...` runs twice in a fresh process:
with empty caches (cold: latents and text are encoded first) and again with them filled (warm). The
time to the first step is the first progress event's time minus the moment the process was started;
the reference is a process that only imports what training cannot do without (torch, diffusers'
models, transformers, peft, accelerate). Then `import difftune.cli` and `difftune --help` against a
bare `python -c pass`, and which heavy modules each of them imports (none may).

    python bench/startup.py --quick       # sdxl and kandinsky5-image, one run each of cold and warm
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common

FAMILIES = ("sdxl", "kandinsky5-image")
HEAVY_MODULES = (
    "torch",
    "diffusers",
    "diffusers.pipelines",
    "transformers",
    "peft",
    "accelerate",
    "fastapi",
    "uvicorn",
    "wandb",
    "torch.utils.tensorboard",
    "tensorboard",
    "matplotlib",
)
MUST_NOT_IMPORT = (
    "diffusers",
    "transformers",
    "fastapi",
    "uvicorn",
    "wandb",
    "torch.utils.tensorboard",
    "tensorboard",
)
IMPORT_FLOOR = (
    "import torch, transformers, peft, accelerate; from diffusers import UNet2DConditionModel, AutoencoderKL"
)
_LIST_MODULES = "import sys, json; {prelude}; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"


def first_step_seconds(
    config: Path, workdir: Path, output_dir: Path
) -> tuple[float, float, dict[str, float]]:
    """(seconds from process start to the first progress event, peak RSS in MiB, seconds per phase).

    Phases, from events.jsonl: to_model_load (interpreter, torch, accelerate, config: up to the
    "loading ..." log), model_and_data (model load with its diffusers/transformers imports, then
    discovery and caches: up to the "start" event), first_step (up to the first progress event).
    """
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    argv = [
        sys.executable,
        "-m",
        "difftune",
        "train",
        "--config",
        str(config),
        "--output_dir",
        str(output_dir),
    ]
    started = time.time()  # events carry time.time(), so this clock and not perf_counter
    code, _, rss_mb, errors = common.run_child(argv, cwd=workdir, env=env)
    if code != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed with exit code {code}:\n{errors}")
    events = common.read_events(output_dir / "events.jsonl")
    progress = [e["time"] for e in events if e["type"] == "progress"]
    if not progress:
        raise RuntimeError(f"{output_dir / 'events.jsonl'} has no progress event; the run made no step")
    loading = next(e["time"] for e in events if str(e.get("message", "")).startswith("loading "))
    start = next(e["time"] for e in events if e["type"] == "start")
    phases = {
        "to_model_load": loading - started,
        "model_and_data": start - loading,
        "first_step": progress[0] - start,
    }
    return progress[0] - started, rss_mb, phases


def process_seconds(code: str, repeats: int) -> float:
    """Fastest wall seconds of `python -c code` over repeats (interpreter start included).

    The fastest, not the median: on a shared machine other processes only ever add time.
    """
    times = []
    for _ in range(repeats):
        exit_code, wall, _, errors = common.run_child([sys.executable, "-c", code])
        if exit_code != 0:
            raise RuntimeError(f"python -c {code!r} failed:\n{errors}")
        times.append(wall)
    return min(times)


def heavy_modules_after(prelude: str) -> list[str]:
    """The HEAVY_MODULES that are in sys.modules after running `prelude` in a fresh interpreter."""
    import subprocess

    code = _LIST_MODULES.format(prelude=prelude, heavy=HEAVY_MODULES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    arguments = common.parser(__doc__.splitlines()[0])
    arguments.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    args = arguments.parse_args()
    common.quiet()
    repeats = 3 if args.quick else 7

    from difftune.testing.images import make_image_dataset
    from difftune.testing.runs import build_tiny_model, write_tiny_run

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="difftune-bench-") as scratch:
        scratch = Path(scratch)
        make_image_dataset(scratch / "images", n=8, sizes=[(64, 64)], seed=0)
        floors = []
        for family in args.families:
            floors.append(process_seconds(IMPORT_FLOOR, 1 if args.quick else 3))  # once per family
            model = build_tiny_model(family, scratch / "models" / family)
            workdir = scratch / family
            config = write_tiny_run(
                workdir,
                model,
                scratch / "images",
                dataset=common.DATASET,
                model_family=family,
                max_train_steps=2,
                **common.RUN,
            )
            for state in ("cold", "warm"):  # the cold run fills the caches the warm one reads
                seconds, rss_mb, phases = first_step_seconds(config, workdir, workdir / f"out-{state}")
                figures[f"{family}_first_step_{state}_s"] = seconds
                figures[f"{family}_peak_rss_{state}_mb"] = rss_mb
            figures |= {f"{family}_warm_{phase}_share": part / seconds for phase, part in phases.items()}
    floor_s = figures["import_floor_s"] = min(floors)
    for key in [k for k in figures if "_first_step_" in k and k.endswith("_s")]:
        figures[key[:-2] + "_ratio"] = figures[key] / floor_s

    python_s = process_seconds("pass", repeats)
    cli_s = process_seconds("import difftune.cli", repeats)
    config_s = process_seconds("import difftune.cli, difftune.config", repeats)
    help_s = process_seconds("from difftune.cli import main; main(['--help'])", repeats)
    figures |= {
        "python_start_s": python_s,
        "import_cli_s": cli_s,
        "import_cli_ratio": cli_s / python_s,
        "import_cli_config_s": config_s,
        "help_s": help_s,
        "help_ratio": help_s / python_s,
    }
    imported = {
        "import difftune.cli": heavy_modules_after("import difftune.cli"),
        "import difftune.cli, difftune.config": heavy_modules_after("import difftune.cli, difftune.config"),
        "difftune --help": heavy_modules_after("from difftune.cli import main; main(['--help'])"),
    }
    offenders = {
        what: [m for m in found if m.split(".")[0] in MUST_NOT_IMPORT or m in MUST_NOT_IMPORT]
        for what, found in imported.items()
    }
    notes = {
        "reference": f'first_step ratios: to `python -c "{IMPORT_FLOOR}"` ({floor_s:.2f} s); '
        "import/help ratios: to `python -c pass`",
        "setup": "tiny models, 8 images 64x64, batch 2, LoRA rank 4, fp32, no validation or checkpoints",
        **{f"heavy modules after `{what}`": ", ".join(found) or "none" for what, found in imported.items()},
        "verdict": "clean" if not any(offenders.values()) else f"heavy imports: {offenders}",
    }
    common.report("startup", figures, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
