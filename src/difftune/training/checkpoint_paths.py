"""Where checkpoints live, which ones a run may resume from, and their error; torch-free for the CLI and config.

A run resumes only from checkpoints under its own output_dir unless the config sets
`allow_resume_outside_output_dir: true`: a checkpoint from elsewhere (a shared folder, a dataset) is
someone else's file, and loading it is an explicit choice.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed from; the message says why and what to do."""


def resume_location(output_dir: str | Path, value: str) -> Path:
    """The folder a resume_from_checkpoint value names: absolute, under output_dir, else from the cwd."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    inside = Path(output_dir) / path
    return inside if inside.exists() or not path.exists() else path


def is_inside(path: Path, folder: str | Path) -> bool:
    """Whether path, with every link followed, lies under folder (also followed)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def outside_output_dir_problem(output_dir: str | Path, value: str | None, allowed: bool) -> str | None:
    """The refusal for a resume path outside output_dir (None when it is inside, allowed, or 'latest')."""
    if not value or value == "latest" or allowed:
        return None
    path = resume_location(output_dir, value)
    if is_inside(path, output_dir):
        return None
    return (
        f"'resume_from_checkpoint' is '{value}', which is outside output_dir ({output_dir}); a run resumes "
        "only from its own checkpoints unless you set 'allow_resume_outside_output_dir': true (do so "
        "only for checkpoints you trust), or copy the checkpoint into output_dir"
    )
