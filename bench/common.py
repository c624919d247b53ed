"""What the speed benchmarks share: timing, peak RSS, the settings of tiny runs, and JSON results.

Results go to bench/results/<name>.json (git-ignored); each script prints the change of every figure
against the previous file before overwriting it. Figures are flat {name: number}; a name ending in
`_ratio` or `_share` is dimensionless (lower is better), `_ms` / `_s` are times, `_mb` / `_bytes`
sizes, `_per_s` rates and `_efficiency` a fraction of a reference rate (higher is better).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HIGHER_IS_BETTER = ("_per_s", "_efficiency")
LOWER_IS_BETTER = ("_ms", "_s", "_mb", "_bytes", "_ratio", "_share")


# -- arguments and timing ---------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes (--quick, --no-save)."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--quick", action="store_true", help="CI-sized run (under ~60 s on 2 CPU cores)")
    result.add_argument("--no-save", action="store_true", help="print only; keep bench/results as it is")
    return result


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then t["s"] holds the seconds the block took."""
    timing = {"s": 0.0}
    started = time.perf_counter()
    try:
        yield timing
    finally:
        timing["s"] = time.perf_counter() - started


def time_calls(function: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of function."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def median_ms(seconds: list[float]) -> float:
    """The median of a list of durations in seconds, in milliseconds."""
    return 1000 * statistics.median(seconds)


def low_ms(seconds: list[float], fraction: float = 0.2) -> float:
    """The `fraction` quantile of durations in seconds, in ms: steady speed, less skewed by other processes."""
    ordered = sorted(seconds)
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory of this process (or RUSAGE_CHILDREN: the largest waited-for child), MiB."""
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def run_child(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, float, float, str]:
    """Run argv to its end; (exit code, wall seconds, the child's own peak RSS in MiB, its stderr tail).

    The child is reaped with os.wait4, whose rusage is that child's alone (RUSAGE_CHILDREN would give
    the largest of all children so far).
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryFile("w+") as errors:
        started = time.perf_counter()
        child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        tail = errors.read()[-2000:]
    return child.returncode, wall, usage.ru_maxrss / 1024, tail


# -- tiny runs --------------------------------------------------------------------------------------
def quiet() -> None:
    """Silence library warnings and progress bars, so the figures are what gets printed."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("diffusers", "transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


# The settings every benchmark's run shares, over difftune.testing.runs.write_tiny_run's (a LoRA of rank
# 4, batch 2, fp32): no validation or checkpoints, each image once an epoch. The latent and text caches
# live in the run's workdir/cache, so a second run with the same workdir is warm.
RUN = {
    "learning_rate": 1e-4,
    "lr_scheduler": "constant",
    "checkpointing_steps": 0,
    "validation_disable": True,
}
DATASET = {"repeats": 0}


def read_events(events_file: Path) -> list[dict[str, Any]]:
    """The events of an events.jsonl, in order (each has "type" and "time", a time.time() value)."""
    return [json.loads(line) for line in events_file.read_text(encoding="utf-8").splitlines() if line]


def progress_times(events_file: Path) -> list[float]:
    """Wall-clock times (time.time()) of the progress events of events.jsonl, in order."""
    return [float(event["time"]) for event in read_events(events_file) if event["type"] == "progress"]


# -- results ----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes on the machine skew timings
    }


def report(
    name: str, figures: dict[str, float], notes: dict[str, Any] | None = None, save: bool = True
) -> dict[str, Any]:
    """Print figures and their change against bench/results/<name>.json; then (save) write the new file."""
    path = RESULTS_DIR / f"{name}.json"
    previous = _read_previous(path)
    width = max(len(key) for key in figures)
    print(f"\n== {name} ==")
    for key, value in figures.items():
        change = _change(key, value, previous.get("figures", {}).get(key))
        print(f"  {key:<{width}}  {_format(value):>12}  {change}")
    for key, value in (notes or {}).items():
        print(f"  {key}: {value}")
    if previous:
        print(
            f"  (changes against {path.relative_to(RESULTS_DIR.parent.parent)} of {previous.get('machine', {}).get('date', '?')})"
        )
    document = {
        "name": name,
        "machine": machine(),
        "argv": sys.argv[1:],
        "figures": figures,
        "notes": notes or {},
    }
    if save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return document


def _read_previous(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _format(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def _change(key: str, value: float, before: float | None) -> str:
    """'+12.0% (worse)' style text, or '' when there is nothing to compare with."""
    if before is None or not isinstance(before, (int, float)) or before == 0:
        return ""
    percent = 100 * (value - before) / abs(before)
    if abs(percent) < 0.05:
        return "unchanged"
    if key.endswith(HIGHER_IS_BETTER):
        verdict = "better" if percent > 0 else "worse"
    elif key.endswith(LOWER_IS_BETTER):
        verdict = "better" if percent < 0 else "worse"
    else:
        verdict = "changed"
    return f"{percent:+.1f}% ({verdict}; was {_format(before)})"


# -- the bare training step (the reference the recipe is measured against) ---------------------------
class BareLoop:
    """The recipe's step with nothing around it: same model, LoRA, optimizer, objective and model_forward.

    Built from a LoadedConfig the way train() builds it (fp32 weights, the family's LoRA targets,
    config.optimizer), but without accelerate, events, the sampler or cache reads.
    """

    def __init__(self, loaded: Any, device: str = "cpu") -> None:
        import torch

        from difftune.families import get_family
        from difftune.training.adapters import attach_lora
        from difftune.training.optim import build_optimizer

        self.config = loaded.train
        self.device = torch.device(device)
        self.family = get_family(self.config)
        self.components = self.family.load(self.device, torch.float32)
        self.denoiser = self.components.denoiser
        self.denoiser.requires_grad_(False)
        attach_lora(self.denoiser, self.family, self.config)
        self.denoiser.train()
        self.optimizer = build_optimizer(self.denoiser.parameters(), self.config)
        self.objective = self.family.objective(self.components)
        self.generator = torch.Generator().manual_seed(self.config.seed or 0)

    def load_batches(self, loaded: Any, count: int) -> list[dict[str, Any]]:
        """`count` batches read once through TrainingData.load_batch (warm caches), kept in memory."""
        from itertools import islice

        data = self.training_data(loaded)
        return [data.load_batch(indices) for indices in islice(data.sampler.iter_forever(), count)]

    def training_data(self, loaded: Any):
        """TrainingData for this run's datasets (fills the caches when they are cold)."""
        from difftune.data.pipeline import prepare_training_data
        from difftune.training.setup import text_cache_dir

        return prepare_training_data(
            self.config,
            loaded.datasets,
            text_cache_dir(loaded),
            self.family,
            self.components,
            self.device,
            lambda *_: None,
            extra_prompts=[""],
        )

    def step(self, batch: dict[str, Any]) -> float:
        """One optimizer step on a batch; returns the loss."""
        import torch

        from difftune.training.losses import diffusion_loss

        latents = batch["latents"].to(self.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        timesteps = self.objective.sample_timesteps(latents.shape[0], self.generator, self.device)
        noisy = self.objective.add_noise(latents, noise, timesteps)
        prediction = self.family.model_forward(self.components, self.denoiser, noisy, timesteps, batch)
        target = self.objective.target(latents, noise, timesteps)
        loss = diffusion_loss(self.family, self.objective, batch, latents, prediction, target, timesteps)
        loss.backward()
        if self.config.max_grad_norm > 0:  # as difftune clips (grad_clip_method)
            clip = torch.nn.utils.clip_grad_norm_
            if self.config.grad_clip_method == "value":
                clip = torch.nn.utils.clip_grad_value_
            clip(self.denoiser.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()
