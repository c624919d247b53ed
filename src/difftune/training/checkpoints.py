"""Checkpoints: written to a temporary folder and renamed only when complete; exact resume.

A checkpoint-STEP/ folder holds:
- trainable.safetensors: the trained weights (LoRA parameters, or the whole denoiser for full training)
- optimizer.pt, lr_scheduler.pt: their state dicts
- trainer_state.pt: step, epoch, sampler position, RNG states (python, numpy, torch, the noise generator)
- complete.json: written last; a folder without it is never resumed from
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


@dataclass
class TrainerState:
    """Where training stands: enough to continue exactly."""

    global_step: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    noise_generator: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        step = path.name[len(PREFIX) :]
        if step.isdigit() and (path / "complete.json").exists():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: Path, resume_from: str | None) -> Path | None:
    """'latest' -> newest complete checkpoint (None if there is none); a path -> that checkpoint."""
    if not resume_from:
        return None
    if resume_from == "latest":
        dirs = checkpoint_dirs(output_dir)
        return dirs[-1] if dirs else None
    path = Path(resume_from)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from
    if not (path / "complete.json").exists():
        raise FileNotFoundError(
            f"resume_from_checkpoint: '{resume_from}' is not a complete checkpoint folder "
            f"(expected {path}/complete.json); use 'latest' or one of: "
            f"{', '.join(p.name for p in checkpoint_dirs(output_dir)) or 'none saved yet'}"
        )
    return path


def _rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    output_dir: Path,
    trainable: dict[str, torch.Tensor],
    optimizer,
    lr_scheduler,
    state: TrainerState,
    total_limit: int | None = None,
) -> Path:
    """Write checkpoint-STEP atomically, then prune to `total_limit` complete checkpoints."""
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{state.global_step}"
    tmp = output_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
    )
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    torch.save(
        {
            "global_step": state.global_step,
            "sampler": state.sampler,
            "rng": _rng_states(),
            "noise_generator": state.noise_generator,
            "extra": state.extra,
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "complete.json").write_text(json.dumps({"global_step": state.global_step}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if total_limit:
        for old in checkpoint_dirs(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, lr_scheduler) -> TrainerState:
    """Restore weights, optimizer, schedule and RNG from a checkpoint folder; returns the trainer state."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    named = dict(model.named_parameters())
    missing = [k for k in weights if k not in named]
    if missing:
        raise ValueError(
            f"{path}: checkpoint holds weights this model does not have, e.g. {missing[:3]}; "
            "was it saved for another model_type or LoRA configuration?"
        )
    with torch.no_grad():
        for key, value in weights.items():
            named[key].copy_(value.to(named[key].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=False))
    saved = torch.load(path / "trainer_state.pt", weights_only=False)
    _restore_rng(saved["rng"])
    return TrainerState(
        global_step=saved["global_step"],
        sampler=saved["sampler"],
        noise_generator=saved["noise_generator"],
        extra=saved.get("extra", {}),
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (what a checkpoint stores)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
