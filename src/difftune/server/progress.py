"""What a run has written, read back for the web UI: events.jsonl, the job log, validation samples."""

from __future__ import annotations

import bisect
import json
import math
import threading
from array import array
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from difftune.server.files import media_kind


class LineTail:
    """Follows a growing text file from byte `start`; `read_new()` returns the complete lines added since.

    The first call returns only the last `backlog` lines (at most `backlog_bytes` of them), found by
    reading backwards from the end, so a huge file costs no more than its tail; backlog None returns
    every line from `start`. One call reads at most `chunk_bytes`: call again while it returns lines.
    A file that shrinks below the current position (rewritten) is read again from the start.
    """

    chunk_bytes = 16 << 20

    def __init__(
        self, path: Path, backlog: int | None = 200, start: int = 0, backlog_bytes: int = 4 << 20
    ) -> None:
        self.path = path
        self.offset = start
        self._backlog: int | None = backlog
        self._backlog_bytes = backlog_bytes

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
            if self._backlog is not None:
                self.offset = _start_of_last_lines(
                    handle, self.offset, size, self._backlog, self._backlog_bytes
                )
                self._backlog = None
            handle.seek(self.offset)
            chunk = handle.read(min(size - self.offset, self.chunk_bytes))
        end = chunk.rfind(b"\n")
        if end < 0 and len(chunk) == self.chunk_bytes:  # one line longer than a chunk: cut it there
            end = len(chunk) - 1
        elif end < 0:  # only a partial line so far: wait for its end
            return []
        self.offset += end + 1
        return chunk[: end + 1].decode("utf-8", errors="replace").splitlines()


def _start_of_last_lines(handle: BinaryIO, start: int, size: int, lines: int, max_bytes: int) -> int:
    """Offset of the first of the last `lines` complete lines in [start, size), at most `max_bytes` back."""
    floor = max(start, size - max_bytes)
    position, newlines, last_complete = size, 0, None
    while position > floor:
        block_start = max(floor, position - (64 << 10))
        handle.seek(block_start)
        block = handle.read(position - block_start)
        index = len(block)
        while (index := block.rfind(b"\n", 0, index)) >= 0:
            if last_complete is None:
                last_complete = block_start + index  # the end of the last complete line
                continue
            newlines += 1
            if newlines == lines:
                return block_start + index + 1
        position = block_start
    if floor == start:
        return start
    handle.seek(floor)  # cut at max_bytes: begin at the first whole line after the cut
    first_end = handle.read(size - floor).find(b"\n")
    return floor + first_end + 1 if first_end >= 0 else size


def finite(value: Any) -> Any:
    """NaN/inf -> None, recursively, so that the browser's JSON.parse accepts the value."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def parse_event(line: str) -> dict[str, Any] | None:
    """One events.jsonl line as a dict with a "type"; None for blank or broken lines."""
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(event, dict) or "type" not in event:
        return None
    return event


class LossSeries:
    """Loss and learning rate by step from the progress events of events.jsonl from byte `start` on.

    Read incrementally (each `update()` reads only what was appended) into flat arrays, so a run of a
    million steps costs 24 MB, not a dict of objects. A step at or below the last one starts a later
    run's series from that step on: the later run's values win.
    """

    def __init__(self, path: Path, start: int = 0) -> None:
        self.path, self.start = path, start
        self._tail = LineTail(path, backlog=None, start=start)
        self.steps, self.loss, self.lr = array("q"), array("d"), array("d")
        self._lock = threading.Lock()

    def update(self) -> None:
        """Read the progress events appended since the last call (call it off the event loop)."""
        with self._lock:
            while lines := self._tail.read_new():
                self._add(lines)

    def _add(self, lines: list[str]) -> None:
        lines = [line for line in lines if '"progress"' in line]  # a cheap filter before parsing
        try:  # one parse of many lines costs less than half of one parse per line
            events = json.loads("[" + ",".join(lines) + "]")
        except (json.JSONDecodeError, RecursionError):  # a broken line among them: one by one, skipping it
            events = [parse_event(line) for line in lines]
        for event in events:
            if not isinstance(event, dict) or event.get("type") != "progress" or event.get("loss") is None:
                continue
            try:
                step, loss = int(event["step"]), float(event["loss"])
                lr = float(event["lr"]) if event.get("lr") is not None else math.nan
            except (KeyError, TypeError, ValueError, OverflowError):
                continue
            if self.steps and step <= self.steps[-1]:
                keep = bisect.bisect_left(self.steps, step)
                del self.steps[keep:], self.loss[keep:], self.lr[keep:]
            self.steps.append(step)
            self.loss.append(loss)
            self.lr.append(lr)

    def points(self, limit: int = 1000) -> dict[str, list[Any]]:
        """{"steps", "loss", "lr", "total"}: at most `limit` points, each the mean loss of an equal run of
        steps (the last step of the run, its last lr); NaN and inf become None."""
        with self._lock:
            steps = np.frombuffer(self.steps, dtype=np.int64).copy()
            loss = np.frombuffer(self.loss, dtype=np.float64).copy()
            lr = np.frombuffer(self.lr, dtype=np.float64).copy()
        total = len(steps)
        if total > limit > 0:
            starts = (np.arange(limit) * total) // limit
            ends = np.append(starts[1:], total) - 1
            finite = np.isfinite(loss)
            sums = np.add.reduceat(np.where(finite, loss, 0.0), starts)
            counts = np.add.reduceat(finite.astype(np.int64), starts)
            with np.errstate(invalid="ignore", divide="ignore"):
                loss = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            steps, lr = steps[ends], lr[ends]
        return {
            "steps": steps.tolist(),
            "loss": [v if math.isfinite(v) else None for v in loss.tolist()],
            "lr": [v if math.isfinite(v) else None for v in lr.tolist()],
            "total": total,
        }


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
