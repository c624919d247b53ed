"""The training job the web UI starts: one child process at a time, in its own process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (config path, resume?) -> argv of the training process
TrainCommand = Callable[[Path, bool], list[str]]


def default_train_command(config_path: Path, resume: bool) -> list[str]:
    """`python -m difftune train --config PATH [--resume_from_checkpoint latest]`."""
    argv = [sys.executable, "-m", "difftune", "train", "--config", str(config_path)]
    return argv + (["--resume_from_checkpoint", "latest"] if resume else [])


class JobBusy(RuntimeError):
    """A job is already running."""


@dataclass
class Job:
    """One training process; `log_offset` and `events_offset` are where its own part of job.log and
    events.jsonl begin (both files keep earlier runs above it)."""

    argv: list[str]
    output_dir: Path
    log_path: Path
    process: subprocess.Popen
    log_offset: int = 0
    events_offset: int = 0
    started_at: float = field(default_factory=time.time)
    stopped: bool = False
    exit_code: int | None = None
    reason: str | None = None  # why a failed job failed: its last `difftune: ...` line


class JobRunner:
    """Starts, stops and reports the training process; its stdout and stderr go to output_dir/job.log."""

    def __init__(self, workdir: Path, train_command: TrainCommand = default_train_command) -> None:
        self.workdir = workdir
        self.train_command = train_command
        self.job: Job | None = None
        self._lock = threading.Lock()

    def start(self, config_path: Path, output_dir: Path, resume: bool = False) -> dict[str, Any]:
        """Run the train command; raises JobBusy if one is running."""
        with self._lock:
            if self.job is not None and self.job.exit_code is None:
                raise JobBusy(f"a job is already running (pid {self.job.process.pid}); stop it first")
            output_dir.mkdir(parents=True, exist_ok=True)
            log_path = output_dir / "job.log"
            events_path = output_dir / "events.jsonl"
            events_offset = events_path.stat().st_size if events_path.exists() else 0
            argv = self.train_command(config_path, resume)
            with log_path.open("ab") as log:
                log_offset = log.tell()
                log.write(f"$ {' '.join(argv)}\n".encode())
                log.flush()
                # start_new_session: the job and its workers (dataloader, compile) form one process
                # group, so stop() reaches all of them.
                process = subprocess.Popen(
                    argv,
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            job = Job(
                argv=argv,
                output_dir=output_dir,
                log_path=log_path,
                process=process,
                log_offset=log_offset,
                events_offset=events_offset,
            )
            self.job = job
        threading.Thread(target=self._reap, args=(job,), daemon=True).start()
        return self.state()

    def _reap(self, job: Job) -> None:
        code = job.process.wait()
        with job.log_path.open("ab") as log:
            log.write(f"[job exited with code {code}]\n".encode())
        if code != 0 and not job.stopped:
            job.reason = failure_reason(job.log_path, job.log_offset, code)
        job.exit_code = code

    def stop(self, grace_seconds: float = 10.0) -> dict[str, Any]:
        """SIGTERM the job's process group; SIGKILL it if it has not ended after `grace_seconds`."""
        job = self.job
        if job is None or job.exit_code is not None:
            return self.state()
        job.stopped = True
        self._signal(job, signal.SIGTERM)
        try:
            job.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self._signal(job, signal.SIGKILL)
            job.process.wait()
        deadline = time.monotonic() + 2.0
        while job.exit_code is None and time.monotonic() < deadline:  # let _reap record it
            time.sleep(0.01)
        return self.state()

    @staticmethod
    def _signal(job: Job, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(job.process.pid, sig)

    def state(self) -> dict[str, Any]:
        """The current job's state: see `job_state`."""
        return job_state(self.job)


def job_state(job: Job | None) -> dict[str, Any]:
    """{"state": idle|running|finished|failed|stopped, "pid", "exit_code", "command", ...} of `job`.

    A job's exit code is set only after its last line is in job.log, so whoever reads this state and
    then the log has every line the job wrote.
    """
    if job is None:
        return {"state": "idle", "pid": None, "exit_code": None, "command": None}
    if job.exit_code is None:
        name = "running"
    elif job.stopped:
        name = "stopped"
    else:
        name = "finished" if job.exit_code == 0 else "failed"
    return {
        "state": name,
        "pid": job.process.pid,
        "exit_code": job.exit_code,
        "command": job.argv,
        "started_at": job.started_at,
        "output_dir": str(job.output_dir),
        "log": str(job.log_path),
        "reason": job.reason,
    }


def failure_reason(log_path: Path, start: int, code: int, tail_bytes: int = 64 << 10) -> str:
    """The last `difftune: ...` line the job printed (its error message), else its last line of output."""
    with log_path.open("rb") as log:
        log.seek(max(start, log.seek(0, os.SEEK_END) - tail_bytes))
        lines = log.read().decode("utf-8", errors="replace").splitlines()
    lines = [line.strip() for line in lines if line.strip() and not line.startswith("[job exited")]
    for line in reversed(lines):
        if line.startswith("difftune: "):
            return line.removeprefix("difftune: ")
    last = lines[-1] if lines and not lines[-1].startswith("$ ") else "no output"
    return f"exit code {code}: {last}"
