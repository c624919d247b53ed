"""Webhooks: post training events to Discord or to any HTTP endpoint, without ever blocking training.

`webhook_config` (a JSON file path, an inline JSON string, a dict or a list of dicts) names targets:

    {"webhook_url": "https://...", "webhook_type": "discord" | "raw", "message_prefix": "my-run",
     "log_level": "info", "ssl_no_verify": false, "events": ["start", "validation", "finished"]}

Message formats:
- discord: `{"content": "<prefix> <text>"}` as JSON; when images or videos come with the event, a
  multipart/form-data body with a `payload_json` part (the same JSON plus `attachments`) and one
  `files[i]` part per file, as Discord's execute-webhook endpoint accepts (at most 10 files a message).
- raw: `{"message_type", "message", "prefix", "timestamp", "data", "images"}` as JSON, where `data` is
  the event's own fields and `images` lists `{"path", "mime_type", "base64"}` for each file (base64 is
  null for files over 8 MiB, so the receiver reads the path instead).

Posting happens in one background thread fed by a bounded queue; when the queue is full the message is
dropped. Failures never raise: the first one of each target (and the first drop) is reported as a
`warning` event through the `warn` callable, from the trainer's thread on its next event.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import queue
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEBHOOK_TYPES = ("discord", "raw")
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# Event types that are posted, with their level (compared with a target's log_level).
EVENT_LEVELS = {
    "start": "info",
    "progress": "info",
    "validation": "info",
    "validation_preview": "info",
    "checkpoint": "info",
    "saved": "info",
    "finished": "info",
    "warning": "warning",
    "error": "error",
}
DISCORD_MAX_FILES = 10
DISCORD_MAX_CHARS = 2000
RAW_MAX_INLINE_BYTES = 8 * 1024 * 1024
_KNOWN_KEYS = {"webhook_url", "webhook_type", "message_prefix", "log_level", "ssl_no_verify", "events"}


class WebhookConfigError(ValueError):
    """A webhook_config that cannot be used; the message names the file or key and the fix."""


@dataclass(frozen=True)
class WebhookTarget:
    """One endpoint: where to post, in which format, and which events."""

    url: str
    webhook_type: str = "discord"
    message_prefix: str = ""
    log_level: str = "info"
    ssl_no_verify: bool = False
    events: frozenset[str] | None = None  # None: every event type in EVENT_LEVELS

    def wants(self, event_type: str) -> bool:
        """Whether this target receives events of this type (event filter and log level)."""
        if event_type not in EVENT_LEVELS:
            return False
        if self.events is not None and event_type not in self.events:
            return False
        return LOG_LEVELS[EVENT_LEVELS[event_type]] >= LOG_LEVELS[self.log_level]


def load_webhook_config(value: str | Path | dict[str, Any] | list[dict[str, Any]]) -> list[WebhookTarget]:
    """Targets from a webhook_config value: a JSON file path, an inline JSON string, a dict or a list."""
    source = "webhook_config"
    if isinstance(value, (str, Path)):
        text = str(value).strip()
        if text.startswith(("{", "[")):
            value = _parse_json(text, "webhook_config (inline JSON)")
        else:
            path = Path(text)
            if not path.is_file():
                raise WebhookConfigError(
                    f"webhook_config: file {path} does not exist; give the path of a "
                    "JSON file (relative to the working directory) or an inline object"
                )
            source = str(path)
            try:
                text = path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as exc:
                raise WebhookConfigError(
                    f"webhook_config: {path} is not a JSON text file (undecodable byte at offset "
                    f"{exc.start}); give the path of a UTF-8 JSON file"
                ) from None
            value = _parse_json(text, source)
    entries = [value] if isinstance(value, dict) else value
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise WebhookConfigError(
            f"{source}: expected an object or a list of objects with webhook_url, got {type(value).__name__}"
        )
    return [_target_from_dict(entry, f"{source}[{i}]") for i, entry in enumerate(entries)]


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WebhookConfigError(f"{source}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise WebhookConfigError(f"{source}: nested too deeply to be a webhook configuration") from None


def _target_from_dict(entry: dict[str, Any], where: str) -> WebhookTarget:
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        raise WebhookConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(_KNOWN_KEYS)}")
    url = entry.get("webhook_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise WebhookConfigError(f"{where}: webhook_url must be an http(s) URL, got {url!r}")
    webhook_type = str(entry.get("webhook_type", "discord")).lower()
    if webhook_type not in WEBHOOK_TYPES:
        raise WebhookConfigError(
            f"{where}: webhook_type {webhook_type!r} is not one of {list(WEBHOOK_TYPES)}"
        )
    log_level = str(entry.get("log_level", "info")).lower()
    if log_level not in LOG_LEVELS:
        raise WebhookConfigError(f"{where}: log_level {log_level!r} is not one of {list(LOG_LEVELS)}")
    events = entry.get("events")
    if events is not None:
        if isinstance(events, str):
            events = [events]
        unknown_events = sorted(set(events) - set(EVENT_LEVELS))
        if unknown_events:
            raise WebhookConfigError(
                f"{where}: events {unknown_events} are not posted; choose among {sorted(EVENT_LEVELS)}"
            )
        events = frozenset(events)
    ssl_no_verify = entry.get("ssl_no_verify", False)
    if isinstance(ssl_no_verify, str):
        ssl_no_verify = ssl_no_verify.strip().lower() in ("1", "true", "yes")
    return WebhookTarget(
        url=url,
        webhook_type=webhook_type,
        message_prefix=str(entry.get("message_prefix") or ""),
        log_level=log_level,
        ssl_no_verify=bool(ssl_no_verify),
        events=events,
    )


def format_message(event_type: str, data: dict[str, Any], total_steps: int | None = None) -> str:
    """One line of human-readable text for an event."""
    if event_type == "start":
        return (
            f"Training started: {data.get('family', '?')} {data.get('model_type', '?')}, "
            f"{data.get('samples', '?')} samples, steps {data.get('first_step', 0)} -> "
            f"{data.get('total_steps', '?')}"
        )
    if event_type == "progress":
        of_total = f"/{total_steps}" if total_steps else ""
        eta = data.get("eta_s")
        eta_text = f", ETA {_duration(eta)}" if isinstance(eta, (int, float)) else ""
        return (
            f"Step {data['step']}{of_total}: loss {data['loss']:.4f}, lr {data['lr']:.2e}, "
            f"{data.get('it_per_s', 0.0):.2f} it/s{eta_text}"
        )
    if event_type == "validation":
        return f"Validation at step {data.get('step')}: {len(data.get('paths') or [])} file(s)"
    if event_type == "validation_preview":
        return (
            f"Validation preview at step {data.get('step')}, "
            f"inference step {data.get('inference_step', data.get('preview_index'))}"
        )
    if event_type == "checkpoint":
        return f"Checkpoint saved at step {data.get('step')}: {data.get('path')}"
    if event_type == "saved":
        return f"Final weights saved at step {data.get('step')}: {data.get('path')}"
    if event_type == "finished":
        return f"Training finished at step {data.get('step')}"
    if event_type == "error":
        return f"Training failed: {data.get('message', '')}"
    return f"{event_type.capitalize()}: {data.get('message', '')}"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def event_files(event_type: str, data: dict[str, Any]) -> list[Path]:
    """Image or video files an event carries (validation paths, a preview's path) that exist."""
    if event_type == "validation":
        candidates = data.get("paths") or []
    elif event_type == "validation_preview":
        candidates = [data["path"]] if data.get("path") else []
    else:
        return []
    return [Path(p) for p in candidates if Path(p).is_file()]


def build_request(
    target: WebhookTarget, event_type: str, data: dict[str, Any], total_steps: int | None = None
) -> list[tuple[bytes, str]]:
    """The HTTP bodies (body, content type) to post for one event; Discord gets one per 10 files."""
    text = format_message(event_type, data, total_steps)
    files = event_files(event_type, data)
    if target.webhook_type == "raw":
        payload = {
            "message_type": event_type,
            "message": text,
            "prefix": target.message_prefix,
            "timestamp": data.get("time", time.time()),
            "data": {k: v for k, v in data.items() if k != "time"},
            "images": [_inline_file(path) for path in files],
        }
        return [(json.dumps(payload, default=str).encode("utf-8"), "application/json")]
    content = f"{target.message_prefix} {text}" if target.message_prefix else text
    content = content[:DISCORD_MAX_CHARS]
    if not files:
        return [(json.dumps({"content": content}).encode("utf-8"), "application/json")]
    bodies = []
    for start in range(0, len(files), DISCORD_MAX_FILES):
        chunk = files[start : start + DISCORD_MAX_FILES]
        payload = {
            "content": content if start == 0 else "",
            "attachments": [{"id": i, "filename": p.name} for i, p in enumerate(chunk)],
        }
        bodies.append(_multipart(payload, chunk))
    return bodies


def _inline_file(path: Path) -> dict[str, Any]:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    size = path.stat().st_size
    encoded = base64.b64encode(path.read_bytes()).decode("ascii") if size <= RAW_MAX_INLINE_BYTES else None
    return {"path": str(path), "mime_type": mime, "base64": encoded}


def _multipart(payload: dict[str, Any], files: Sequence[Path]) -> tuple[bytes, str]:
    boundary = f"difftune-{uuid.uuid4().hex}"
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="payload_json"\r\n'
            "Content-Type: application/json\r\n\r\n"
        ).encode()
        + json.dumps(payload).encode("utf-8")
        + b"\r\n"
    ]
    for i, path in enumerate(files):
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files[{i}]"; filename="{path.name}"\r\n'
            f"Content-Type: {mime}\r\n\r\n"
        ).encode()
        parts.append(head + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class WebhookSubscriber:
    """Event-bus subscriber that posts events to webhook targets from a background thread.

    `reporting_interval` (webhook_reporting_interval) keeps one progress message every N steps.
    `warn(event_type, data)` receives the warnings about failures (pass the bus's emit).
    """

    def __init__(
        self,
        targets: Sequence[WebhookTarget],
        reporting_interval: int = 10,
        warn: Callable[[str, dict[str, Any]], None] | None = None,
        timeout_s: float = 10.0,
        max_queued: int = 64,
    ) -> None:
        if reporting_interval < 1:
            raise ValueError(f"webhook_reporting_interval must be >= 1, got {reporting_interval}")
        self.targets = list(targets)
        self.reporting_interval = reporting_interval
        self.timeout_s = timeout_s
        self._warn = warn
        self._total_steps: int | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._pending_warnings: list[str] = []
        self._failed_targets: set[str] = set()
        self._dropped = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name="difftune-webhooks", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Messages dropped because the queue was full."""
        return self._dropped

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        self._flush_warnings()
        if self._closed:
            return
        if event_type == "start":
            self._total_steps = data.get("total_steps", self._total_steps)
        if event_type == "progress" and int(data.get("step", 0)) % self.reporting_interval != 0:
            return
        targets = [t for t in self.targets if t.wants(event_type)]
        if not targets:
            return
        try:
            self._queue.put_nowait((targets, event_type, dict(data), self._total_steps))
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                self._add_warning(
                    f"webhook queue is full (endpoint slow or down); dropping messages "
                    f"such as this {event_type} event"
                )

    def close(self, timeout_s: float | None = None) -> None:
        """Send what is queued (waiting at most `timeout_s`, default a few request timeouts), then stop."""
        if self._closed:
            return
        self._closed = True
        wait = timeout_s if timeout_s is not None else 3 * self.timeout_s
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=0.05)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._flush_warnings()

    # -- background thread ----------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            targets, event_type, data, total_steps = item
            for target in targets:
                try:
                    for body, content_type in build_request(target, event_type, data, total_steps):
                        self._post(target, body, content_type)
                except Exception as exc:  # network, HTTP or file errors: report once per target
                    if target.url not in self._failed_targets:
                        self._failed_targets.add(target.url)
                        self._add_warning(
                            f"webhook {_redact(target.url)} failed on a {event_type} "
                            f"message: {exc}; later failures of this webhook are not reported"
                        )

    def _post(self, target: WebhookTarget, body: bytes, content_type: str) -> None:
        request = urllib.request.Request(
            target.url,
            data=body,
            method="POST",
            headers={"Content-Type": content_type, "User-Agent": "difftune-webhook/1.0"},
        )
        context = None
        if target.ssl_no_verify and target.url.startswith("https://"):
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
            response.read()

    def _add_warning(self, message: str) -> None:
        with self._lock:
            self._pending_warnings.append(message)

    def _flush_warnings(self) -> None:
        with self._lock:
            pending, self._pending_warnings = self._pending_warnings, []
        if self._warn is not None:
            for message in pending:
                self._warn("warning", {"message": message})


def _redact(url: str) -> str:
    """The URL without its path (Discord webhook paths hold the secret token)."""
    parts = url.split("/")
    return "/".join(parts[:3]) + "/..." if len(parts) > 3 else url


def webhook_subscriber(
    config_value: str | dict[str, Any] | list[dict[str, Any]],
    reporting_interval: int,
    warn: Callable[[str, dict[str, Any]], None] | None = None,
) -> WebhookSubscriber:
    """A subscriber for a config's webhook_config and webhook_reporting_interval."""
    return WebhookSubscriber(load_webhook_config(config_value), reporting_interval, warn=warn)
