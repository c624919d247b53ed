"""Server-sent events for every open page at once: one reader of the run's files, a bounded backlog.

One task follows the current run's events.jsonl and job log (reading off the event loop) and the
job's state, and keeps the last `backlog` messages, already encoded, in memory, and besides them the
last `log_lines` lines of the job's log. A page that connects gets both, which are the lines a page
that watched the whole run holds (it keeps as many, as the reset tells it); one that reconnects
(EventSource sends Last-Event-ID) gets only what it missed.
When a new job starts, the backlog starts again with it, so a page never shows an older run's lines
as the current one's.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from difftune.server.jobs import JobRunner, job_state
from difftune.server.progress import LineTail, finite, parse_event

KEEP_ALIVE_SECONDS = 15.0


def encode(seq_id: str, data: dict[str, Any]) -> str:
    """One SSE message with its id."""
    return f"id: {seq_id}\ndata: {json.dumps(finite(data), default=str)}\n\n"


class EventHub:
    """Follows the run for all streams; `stream(last_event_id)` is one page's event stream."""

    def __init__(
        self,
        runner: JobRunner,
        output_dir: Callable[[], Path],
        poll_seconds: float = 0.25,
        backlog: int = 500,
        log_lines: int = 2000,
    ) -> None:
        self.runner, self.output_dir, self.poll_seconds = runner, output_dir, poll_seconds
        self.epoch = secrets.token_hex(4)  # ids of another server process never match ours
        self.messages: deque[tuple[int, str]] = deque(maxlen=backlog)
        self.log_messages: deque[tuple[int, str]] = deque(maxlen=log_lines)  # the joblog ones, kept longer
        self.seq = 0
        self.clients = 0
        self._run_key: tuple[Any, ...] | None = None
        self._events: LineTail | None = None
        self._log: LineTail | None = None
        self._state: dict[str, Any] | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._pending: list[dict[str, Any]] = []  # read but not yet published
        self._latest: tuple[int, str] = (-1, "")  # (seq before the last publish, its messages)
        self._reading = threading.Lock()

    # -- the one follower ------------------------------------------------------------------------
    def _read(self) -> list[dict[str, Any]]:
        """All messages read and not yet published (runs in a worker thread, one at a time).

        What is read is kept in `_pending` until published, so a follower cancelled while reading
        loses nothing: the next one publishes it.
        """
        with self._reading:
            self._pending += self._read_new()
            fresh, self._pending = self._pending, []
            return fresh

    def _read_new(self) -> list[dict[str, Any]]:
        """A reset when the run changed, the run's new events and log lines, then its state if changed.

        The state is taken before the files are read and sent after them: a page that shows a job as
        ended already has every line the job wrote, in the order the job wrote them.
        """
        job = self.runner.job
        state = job_state(job)  # of the same job the files below belong to
        try:
            events_path = self.output_dir() / "events.jsonl"
        except HTTPException:  # config.json unreadable while no job runs: look again next time
            return []
        key = (events_path, job.process.pid if job else None, job.started_at if job else None)
        fresh: list[dict[str, Any]] = []
        if key != self._run_key:  # a new run (or the first look): start over from its beginning
            self._run_key = key
            self._events = LineTail(events_path, self.messages.maxlen, start=job.events_offset if job else 0)
            self._log = (
                LineTail(job.log_path, self.log_messages.maxlen, start=job.log_offset) if job else None
            )
            self._state = None
            fresh.append(self._reset())
        fresh += [event for event in map(parse_event, self._events.read_new()) if event]
        if self._log is not None:
            fresh += [{"type": "joblog", "line": line} for line in self._log.read_new()]
        if state != self._state:
            self._state = state
            fresh.append({"type": "job", **state})
        return fresh

    def _publish(self, fresh: list[dict[str, Any]]) -> None:
        before, encoded = self.seq, []
        for data in fresh:
            if data["type"] == "reset":
                self.messages.clear()
                self.log_messages.clear()
            self.seq += 1
            encoded.append(encode(f"{self.epoch}-{self.seq}", data))
            self.messages.append((self.seq, encoded[-1]))
            if data["type"] == "joblog":
                self.log_messages.append((self.seq, encoded[-1]))
        # what every page that was up to date gets: joined once, not once per page
        self._latest = (before, "".join(encoded))
        wake, self._wake = self._wake, asyncio.Event()
        if wake is not None:
            wake.set()

    async def _follow(self) -> None:
        while self.clients > 0:
            fresh = await asyncio.to_thread(self._read)
            if fresh:
                self._publish(fresh)
            await asyncio.sleep(self.poll_seconds)

    def _ensure_following(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()  # an Event belongs to one loop
            self._task = loop.create_task(self._follow())

    # -- one page's stream ------------------------------------------------------------------------
    def _missed(self, last_seq: int) -> list[str]:
        if last_seq == self.seq:
            return []
        if last_seq and last_seq == self._latest[0]:
            return [self._latest[1]]
        kept = heapq.merge(self.log_messages, self.messages)  # both in order; a line may be in both
        return list({seq: message for seq, message in kept if seq > last_seq}.values())

    def _reset(self) -> dict[str, Any]:
        """A reset: the page clears the run and keeps at most this many log lines from now on."""
        return {"type": "reset", "log_lines": self.log_messages.maxlen}

    async def stream(
        self, last_event_id: str | None, max_seconds: float | None = None, backlog: int | None = None
    ) -> AsyncIterator[str]:
        """The messages after `last_event_id` (else a reset and the last `backlog` kept), then each new one.

        `max_seconds` ends the stream after that long (the browser's EventSource then reconnects).
        """
        epoch, _, seq = (last_event_id or "").partition("-")
        last_seq = int(seq) if epoch == self.epoch and seq.isdigit() else 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (max_seconds if max_seconds is not None else float("inf"))
        self.clients += 1
        try:
            self._ensure_following()
            yield "retry: 2000\n\n"
            if last_seq == 0:  # a new page (or one from before a restart): it starts clean, then the
                # job's state (which may have scrolled out of the backlog), then the backlog
                yield encode(f"{self.epoch}-0", self._reset()) + encode(
                    f"{self.epoch}-0", {"type": "job", **self.runner.state()}
                )
            while loop.time() < deadline:
                missed = self._missed(last_seq)
                if backlog is not None and last_seq == 0:
                    missed = missed[-backlog:] if backlog > 0 else []
                if missed:
                    last_seq = self.seq
                    yield "".join(missed)
                    continue  # more may have come while that was sent: look again before waiting
                wake = self._wake  # taken with no await since the look, so no wake-up is missed
                try:
                    async with asyncio.timeout(min(KEEP_ALIVE_SECONDS, deadline - loop.time())):
                        await wake.wait()
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self.clients -= 1
            if self.clients == 0 and self._task is not None:
                self._task.cancel()
