"""One event bus: the progress bar, the log, trackers, webhooks and the web UI all subscribe to it.

An event is a type name and a flat dict of JSON-friendly values. Types used by the trainer:
start, log, warning, skipped, cache, progress, validation, checkpoint, error, finished.
Nothing deep in the code prints; it emits.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Subscriber = Callable[[str, dict[str, Any]], None]


class EventBus:
    """Fan events out to subscribers; a failing subscriber is reported once and then dropped."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event_type: str, data: dict[str, Any] | None = None) -> None:
        data = dict(data or {})
        data.setdefault("time", time.time())
        for subscriber in list(self._subscribers):
            try:
                subscriber(event_type, data)
            except Exception as exc:  # a broken tracker must not stop training
                self._subscribers.remove(subscriber)
                self.emit(
                    "warning", {"message": f"event subscriber {subscriber!r} failed and was removed: {exc}"}
                )

    __call__ = emit

    def close(self) -> None:
        for subscriber in self._subscribers:
            close = getattr(subscriber, "close", None)
            if close:
                close()


_warning_sinks: list[Subscriber] = []


def warn(message: str, **data: Any) -> None:
    """A warning from deep code: a `warning` event on the bus of the run under way (`warnings_to`), so
    events.jsonl, the web UI, webhooks and the console see it; a `[warning]` line on stderr when no run
    is listening (a library call outside `difftune train`)."""
    if _warning_sinks:
        _warning_sinks[-1]("warning", {"message": message, **data})
    else:
        print(f"[warning] {message}", file=sys.stderr, flush=True)


@contextmanager
def warnings_to(emit: Subscriber) -> Iterator[None]:
    """Route `warn` to `emit` (a bus's emit) while the block runs."""
    _warning_sinks.append(emit)
    try:
        yield
    finally:
        _warning_sinks.remove(emit)


class JsonlLog:
    """Appends every event to output_dir/events.jsonl (the web UI and the loss plot read it)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        self._file.write(json.dumps({"type": event_type, **data}, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleReporter:
    """Progress bar (loss, lr, it/s, ETA) on stderr, and one line for each notable event."""

    # the command prints the error itself; previews are many per sample and shown by the web UI;
    # library lines are the libraries' own logging, kept for the log (--verbose prints them as they come)
    _quiet_types = {"progress", "cache_progress", "start", "error", "validation_preview", "library"}

    def __init__(self, total_steps: int | None = None, stream=None, enable_bar: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.total_steps = total_steps
        self.enable_bar = enable_bar
        self._bar = None

    def _ensure_bar(self, initial: int) -> None:
        if self._bar is None and self.enable_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total_steps, initial=initial, desc="training", file=self.stream, dynamic_ncols=True
            )

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type == "start":
            self.total_steps = data.get("total_steps", self.total_steps)
            self._ensure_bar(int(data.get("first_step", 0)))
            return
        if event_type == "progress":
            if not self.enable_bar:
                return
            self._ensure_bar(int(data["step"]) - 1)
            self._bar.set_postfix(loss=f"{data['loss']:.4f}", lr=f"{data['lr']:.2e}", refresh=False)
            self._bar.update(int(data["step"]) - self._bar.n)
            return
        if event_type in self._quiet_types:
            return
        message = data.get("message") or ", ".join(f"{k}={v}" for k, v in data.items() if k != "time")
        line = f"[{event_type}] {message}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class TensorboardWriter:
    """Scalars of progress (loss, lr) and eval events for tensorboard."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type not in ("progress", "eval"):
            return
        step = int(data["step"])
        for key, value in data.items():
            if key not in ("step", "time") and isinstance(value, (int, float)):
                self._writer.add_scalar(
                    f"{event_type}/{key}" if event_type != "progress" else f"train/{key}", value, step
                )

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Scalars to Weights & Biases when wandb is installed."""

    def __init__(self, project: str, run_name: str | None, config: dict[str, Any], log_dir: Path) -> None:
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=project, name=run_name, config=config, dir=str(log_dir))

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type in ("progress", "eval"):
            values = {
                f"{event_type}/{k}": v
                for k, v in data.items()
                if k not in ("step", "time") and isinstance(v, (int, float))
            }
            self._wandb.log(values, step=int(data["step"]))
        elif event_type == "validation" and data.get("paths"):
            images = [self._wandb.Image(p) for p in data["paths"] if str(p).endswith(".png")]
            if images:
                self._wandb.log({"validation": images}, step=int(data["step"]))

    def close(self) -> None:
        self._run.finish()


def read_events(path: Path, event_type: str | None = None) -> list[dict[str, Any]]:
    """Events from an events.jsonl, optionally of one type; a torn last line is ignored."""
    events = []
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event_type is None or event.get("type") == event_type:
            events.append(event)
    return events
