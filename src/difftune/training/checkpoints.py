"""Checkpoints: safetensors and JSON only, written to a temporary folder, verified on resume.

A checkpoint-STEP/ folder holds (nothing in it is a pickle, so loading one never runs code):
- trainable.safetensors: the trained weights (LoRA parameters, or the whole denoiser for full training)
- optimizer.{json,safetensors}, lr_scheduler.{json,safetensors}: their state dicts (see state_files)
- trainer_state.{json,safetensors}: step, sampler position, RNG states (python, numpy, torch, CUDA,
  the noise generator) and the features' state (EMA, CREPA)
- manifest.json: written last; the size and sha256 of every other file. A folder without it is
  never resumed from, and one whose files do not match it is reported as damaged.

`read_checkpoint` reads a folder into a `Checkpoint` (full CPU tensors and state dicts);
`distributed.apply_checkpoint` loads one into a model, sharded or not. `save_checkpoint` takes the
same parts (under FSDP2 gathered first by `distributed.checkpoint_parts`).

"latest" resumes from the newest intact checkpoint: a damaged one is reported (a warning event) and
the next older one is tried. Old checkpoints are pruned by renaming them to .checkpoint-STEP.pruning
before deleting, so an interrupted prune never leaves a half-deleted folder under a checkpoint name.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from difftune.storage import free_bytes, is_disk_full, megabytes, sha256_file, write_json, write_tensors
from difftune.training.checkpoint_paths import PREFIX, CheckpointError, is_inside, resume_location
from difftune.training.state_files import StateFileError, load_state, save_state, state_bytes

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
_STATES = ("optimizer", "lr_scheduler", "trainer_state")
_REQUIRED = (WEIGHTS, *(f"{name}{ext}" for name in _STATES for ext in (".json", ".safetensors")))

Emit = Callable[[str, dict[str, Any]], None]


class CheckpointDiskFull(CheckpointError):
    """The disk filled up while a checkpoint was written; the partial folder has been removed."""


@dataclass
class TrainerState:
    """Where training stands: enough to continue exactly."""

    global_step: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    noise_generator: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # python, numpy, torch (and CUDA) RNG states as a checkpoint holds them; save_checkpoint records
    # the states of the moment it runs instead
    rng: dict[str, Any] = field(default_factory=dict)


class Checkpoint(NamedTuple):
    """A checkpoint folder read into memory: full CPU tensors and state dicts."""

    weights: dict[str, torch.Tensor]  # trainable parameters by name
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    state: TrainerState
    path: Path


def _step_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Every checkpoint-STEP folder, complete or not, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        step = path.name[len(PREFIX) :]
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return sorted(found)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Checkpoints with a manifest under output_dir, oldest first (not verified; see verify_checkpoint)."""
    return [path for _, path in _step_folders(output_dir) if (path / MANIFEST).exists()]


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the manifest; otherwise what is wrong, in words."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        if (path / "complete.json").exists():
            return (
                "it was written by an older difftune in a format (pickled .pt files) that is no longer "
                "loaded, because loading it could run code"
            )
        return f"{MANIFEST} is missing (the write was interrupted, or files were removed)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {str(name): (int(e["bytes"]), str(e["sha256"])) for name, e in manifest["files"].items()}
        step = int(manifest["global_step"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not a readable manifest"
    if path.name.startswith(PREFIX) and path.name[len(PREFIX) :] != str(step):
        return f"{MANIFEST} is for step {step}, not {path.name[len(PREFIX) :]}"
    unlisted = [name for name in _REQUIRED if name not in files]
    if unlisted:
        return f"{MANIFEST} does not list {', '.join(unlisted)}"
    for name, (size, digest) in files.items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, but {size} were written (truncated or overwritten)"
        if sha256_file(file) != digest:
            return f"{name} does not match its sha256 checksum (its bytes changed after it was written)"
    return None


def resolve_resume(
    output_dir: Path,
    resume_from: str | None,
    allow_outside: bool = False,
    emit: Emit | None = None,
) -> Path | None:
    """The checkpoint to resume from, verified; None when there is none yet or nothing was asked.

    'latest' -> the newest intact checkpoint; each newer damaged one is reported through emit
    ("warning") and skipped. A path -> that checkpoint, refused when outside output_dir (unless
    allow_outside) or damaged. Raises CheckpointError with what was found and what to do.
    """
    if not resume_from:
        return None
    output_dir = Path(output_dir)
    if resume_from != "latest":
        path = resume_location(output_dir, resume_from)
        if not allow_outside and not is_inside(path, output_dir):
            raise CheckpointError(
                f"resume_from_checkpoint: '{resume_from}' is outside output_dir ({output_dir}); set "
                "allow_resume_outside_output_dir: true to resume from it, or copy it into output_dir"
            )
        if not path.is_dir():
            raise CheckpointError(
                f"resume_from_checkpoint: '{resume_from}' is not a checkpoint folder ({path} does not "
                f"exist); use 'latest' or one of: {_names(checkpoint_dirs(output_dir))}"
            )
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(
                f"resume_from_checkpoint: {path} is damaged: {problem}. Use 'latest' to resume from "
                f"the newest intact checkpoint, or one of: {_names(checkpoint_dirs(output_dir))}"
            )
        return path

    damaged = []
    for _, path in reversed(_step_folders(output_dir)):
        if not allow_outside and not is_inside(path, output_dir):
            problem = "it links outside output_dir (set allow_resume_outside_output_dir: true to use it)"
        else:
            problem = verify_checkpoint(path)
        if problem is None:
            return path
        damaged.append(f"{path.name}: {problem}")
        if emit is not None:
            emit("warning", {"message": f"{path} is damaged and is skipped: {problem}", "path": str(path)})
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint to resume from in {output_dir} ("
            + "; ".join(damaged)
            + "). Remove these folders to start again from step 0, or set resume_from_checkpoint to "
            "another checkpoint"
        )
    return None


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths) or "none saved yet"


def _rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Set the python, numpy, torch (and CUDA, when present) RNGs to saved states."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    output_dir: Path,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    lr_scheduler_state: dict[str, Any],
    state: TrainerState,
    total_limit: int | None = None,
) -> Path:
    """Write checkpoint-STEP atomically, then prune to `total_limit` complete checkpoints.

    trainable and optimizer_state are full (gathered under FSDP2); the RNG states saved are the
    current ones. A full disk removes the partial folder and raises CheckpointDiskFull saying how much was needed.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{state.global_step}"
    tmp = output_dir / f".{final.name}.tmp"
    _remove_leftovers(output_dir)
    weights = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
    parts = {
        "optimizer": optimizer_state,
        "lr_scheduler": lr_scheduler_state,
        "trainer_state": {
            "global_step": state.global_step,
            "sampler": state.sampler,
            "rng": _rng_states(),
            "noise_generator": state.noise_generator,
            "extra": state.extra,
        },
    }
    try:
        tmp.mkdir(parents=True)
        write_tensors(tmp / WEIGHTS, weights)
        names = [WEIGHTS]
        for name, part in parts.items():
            names += save_state(tmp, name, part)
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in names
        }
        write_json(tmp / MANIFEST, {"global_step": state.global_step, "files": files})
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(error):
            raise
        needed = state_bytes(weights) + state_bytes(parts) + (1 << 20)
        free = free_bytes(output_dir)
        raise CheckpointDiskFull(
            f"no space left on device while writing checkpoint {state.global_step} to {output_dir} "
            f"(needs about {megabytes(needed)}"
            + (f", {megabytes(free)} free" if free is not None else "")
            + "); free some space, move output_dir to a larger disk or lower checkpoints_total_limit. "
            "The partial checkpoint was removed; earlier checkpoints are intact"
        ) from None
    if final.exists():
        _prune(final)
    tmp.rename(final)
    if total_limit:
        for old in checkpoint_dirs(output_dir)[:-total_limit]:
            _prune(old)
    return final


def _prune(path: Path) -> None:
    """Rename first, then delete: a kill in between leaves a .pruning folder no resume looks at."""
    doomed = path.with_name(f".{path.name}.pruning")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(output_dir: Path) -> None:
    """Folders an interrupted write or prune left behind."""
    for pattern in (f".{PREFIX}*.tmp", f".{PREFIX}*.pruning"):
        for path in Path(output_dir).glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (safetensors and JSON only); raises CheckpointError when a file cannot be read."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        weights = load_file(str(path / WEIGHTS))
        optimizer_state, scheduler_state, saved = (load_state(path, name) for name in _STATES)
    except (StateFileError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be loaded: {error}") from None
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"{path / WEIGHTS} cannot be loaded: {error}") from None
    state = TrainerState(
        global_step=int(saved["global_step"]),
        sampler=saved["sampler"],
        noise_generator=saved["noise_generator"],
        extra=saved.get("extra", {}),
        rng=saved["rng"],
    )
    return Checkpoint(weights, optimizer_state, scheduler_state, state, path)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (what a checkpoint stores)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
