"""What a run has written, read back for the web UI: events.jsonl, the job log, validation samples."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

from difftune.server.files import media_kind


class LineTail:
    """Follows a growing text file; `read_new()` returns the complete lines added since the last call.

    Starts at the last `backlog` lines. A file that shrinks (rewritten) is read again from the start.
    """

    def __init__(self, path: Path, backlog: int = 200) -> None:
        self.path = path
        self.offset = 0
        self._backlog: int | None = backlog

    def read_new(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:
            self.offset = 0
        if size == self.offset:
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:  # only a partial line so far: wait for its end
            return []
        self.offset += end + 1
        lines = chunk[: end + 1].decode("utf-8", errors="replace").splitlines()
        if self._backlog is not None:
            lines, self._backlog = list(deque(lines, maxlen=self._backlog)), None
        return lines


def parse_event(line: str) -> dict[str, Any] | None:
    """One events.jsonl line as a dict with a "type"; None for blank or broken lines."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or "type" not in event:
        return None
    return event


def loss_series(events_path: Path) -> dict[str, list[float]]:
    """Loss and learning rate by step from the progress events; a later run's value for a step wins."""
    by_step: dict[int, tuple[float, float | None]] = {}
    if events_path.is_file():
        with events_path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                event = parse_event(line)
                if not event or event["type"] != "progress" or event.get("loss") is None:
                    continue
                try:
                    step, loss = int(event["step"]), float(event["loss"])
                except (KeyError, TypeError, ValueError):
                    continue
                by_step[step] = (loss, event.get("lr"))
    steps = sorted(by_step)
    return {"steps": steps, "loss": [by_step[s][0] for s in steps], "lr": [by_step[s][1] for s in steps]}


def validation_gallery(output_dir: Path) -> list[dict[str, Any]]:
    """Samples under output_dir/validation/<step>/, newest step first: [{"step", "files": [...]}].

    Each file has "name", "kind" (image|video) and "path" relative to output_dir.
    """
    root = output_dir / "validation"
    if not root.is_dir():
        return []
    steps = []
    for folder in root.iterdir():
        if not folder.is_dir() or not folder.name.isdigit():
            continue
        files = [
            {"name": f.name, "kind": media_kind(f), "path": f.relative_to(output_dir).as_posix()}
            for f in sorted(folder.iterdir())
            if f.is_file() and media_kind(f) in ("image", "video")
        ]
        if files:
            steps.append({"step": int(folder.name), "files": files})
    return sorted(steps, key=lambda item: item["step"], reverse=True)
