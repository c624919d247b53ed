"""The web UI under load: /api/job with many open event streams, /api/loss with a big events.jsonl.

A server process (uvicorn, loopback, a free port) serves a scratch folder whose events.jsonl is
filled to --events-mb with progress events; while the run "trains" (a progress event appended every
50 ms), this process opens --streams event streams and reads them, then times /api/job one request
after another, and /api/loss (the first call parses the whole file; later calls read only what was
appended). The reference, in the same run, is /api/job with no stream open. Every client talks to
127.0.0.1 only; the run is bounded by --max-seconds and stops the server itself.

    python bench/server_load.py --quick       # 100 streams, 10 MB of events
    python bench/server_load.py               # 500 streams, 92 MB of events (the goal: p99 < 100 ms)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

SERVER = """
import sys, uvicorn
from difftune.server.app import create_app
uvicorn.run(create_app(sys.argv[1], None), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_events(path: Path, megabytes: float) -> int:
    """An events.jsonl of about `megabytes` of progress events (with a log line now and then); its steps."""
    target, step, written = megabytes * 1e6, 0, 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            step += 1
            line = json.dumps(
                {"type": "progress", "step": step, "loss": 1.0 / step**0.5, "lr": 1e-4, "time": 1.7e9 + step}
            )
            if step % 50 == 0:
                line += "\n" + json.dumps({"type": "log", "message": f"step {step}: all well", "time": 1.7e9})
            handle.write(line + "\n")
            written += len(line) + 1
    return step


def keep_training(path: Path, first_step: int, stop: threading.Event) -> None:
    """Append one progress event every 50 ms, as a run would, until `stop`."""
    step = first_step
    with path.open("a", encoding="utf-8") as handle:
        while not stop.wait(0.05):
            step += 1
            handle.write(json.dumps({"type": "progress", "step": step, "loss": 0.1, "lr": 1e-4}) + "\n")
            handle.flush()


async def get(reader, writer, port: int, target: str) -> bytes:
    """One GET over a kept-alive connection; the body."""
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


async def time_requests(port: int, target: str, count: int, deadline: float) -> list[float]:
    """Seconds of each of `count` sequential GETs of `target` (fewer if `deadline` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            await get(reader, writer, port, target)
            times.append(time.perf_counter() - started)
    finally:
        writer.close()
    return times


async def open_stream(port: int, received: list[int], ready: asyncio.Event, stop: asyncio.Event) -> None:
    """One page's event stream: read and count bytes until `stop`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    ready.set()
    try:
        while not stop.is_set():
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.5)
            except TimeoutError:
                continue
            if not chunk:
                break
            received[0] += len(chunk)
    finally:
        writer.close()


async def hold_streams(port: int, streams: int, max_seconds: float) -> None:
    """The stream holder (a process of its own, so that reading the streams does not delay the timed
    requests): open `streams` event streams, say "open SECONDS", read them until a line comes on stdin
    (or max_seconds pass), then say "bytes_per_s RATE" for the time in between."""
    loop = asyncio.get_running_loop()
    stop, received = asyncio.Event(), [0]
    readies = [asyncio.Event() for _ in range(streams)]
    opened = time.perf_counter()
    tasks = []
    for ready in readies:  # a few at a time, as pages would arrive
        tasks.append(asyncio.create_task(open_stream(port, received, ready, stop)))
        if len(tasks) % 50 == 0:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), max_seconds)
    print(f"open {time.perf_counter() - opened}", flush=True)
    first, started = received[0], time.perf_counter()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), max_seconds)
    except TimeoutError:
        pass
    rate = (received[0] - first) / (time.perf_counter() - started)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"bytes_per_s {rate}", flush=True)


def measure(port: int, streams: int, job_requests: int, loss_requests: int, deadline: float) -> dict:
    figures: dict[str, float] = {}
    idle = asyncio.run(time_requests(port, "/api/job", job_requests, deadline))
    cold_loss = asyncio.run(time_requests(port, "/api/loss", 1, deadline))
    figures["loss_first_ms"] = 1000 * cold_loss[0]

    seconds = str(max(1.0, deadline - time.monotonic()))
    holder = subprocess.Popen(
        [sys.executable, __file__, "--hold", str(port), str(streams), seconds],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        figures["streams_open_s"] = float(holder.stdout.readline().split()[1])
        time.sleep(1.0)  # every stream past its backlog
        loaded = asyncio.run(time_requests(port, "/api/job", job_requests, deadline))
        loss = asyncio.run(time_requests(port, "/api/loss", loss_requests, deadline))
        holder.stdin.write("stop\n")
        holder.stdin.flush()
        figures["stream_bytes_per_s"] = float(holder.stdout.readline().split()[1])
    finally:
        holder.stdin.close()  # an empty line for the holder: it closes its streams and ends
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()

    if not (idle and loaded and loss):
        raise SystemExit(f"--max-seconds passed before the requests were answered: {figures}")
    figures["job_idle_p50_ms"] = common.median_ms(idle)
    figures["job_idle_p99_ms"] = p99_ms(idle)
    figures["job_p50_ms"] = common.median_ms(loaded)
    figures["job_p99_ms"] = p99_ms(loaded)
    figures["job_p99_ratio"] = figures["job_p99_ms"] / max(figures["job_idle_p99_ms"], 1e-3)
    figures["loss_p50_ms"] = common.median_ms(loss)
    figures["loss_p99_ms"] = p99_ms(loss)
    return figures


def p99_ms(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    if sys.argv[1:2] == ["--hold"]:  # the stream holder process, started by measure()
        port, streams, seconds = sys.argv[2:5]
        asyncio.run(hold_streams(int(port), int(streams), float(seconds)))
        return
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=None, help="open event streams (500; --quick 100)")
    parser.add_argument("--events-mb", type=float, default=None, help="size of events.jsonl (92; --quick 10)")
    parser.add_argument("--job-requests", type=int, default=300)
    parser.add_argument("--loss-requests", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=300, help="stop measuring after this long")
    args = parser.parse_args()
    streams = min(args.streams or (100 if args.quick else 500), 2000)
    megabytes = min(args.events_mb or (10 if args.quick else 92), 500)

    with tempfile.TemporaryDirectory(prefix="difftune-bench-server-") as scratch:
        workdir = Path(scratch)
        (workdir / "config").mkdir()
        (workdir / "config" / "config.json").write_text(
            json.dumps({"model_family": "sdxl", "output_dir": "out"})
        )
        (workdir / "out").mkdir()
        events = workdir / "out" / "events.jsonl"
        last_step = write_events(events, megabytes)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(workdir), str(port)], env=env)
        stop_training = threading.Event()
        trainer = threading.Thread(target=keep_training, args=(events, last_step, stop_training), daemon=True)
        try:
            deadline = time.monotonic() + args.max_seconds
            while True:  # wait for the server to listen
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.1)
            trainer.start()
            figures = measure(port, streams, args.job_requests, args.loss_requests, deadline)
        finally:
            stop_training.set()
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
    notes = {
        "streams": streams,
        "events_mb": megabytes,
        "progress_events": last_step,
        "goal": "job_p99_ms < 100 with 500 streams",
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    figures = {key: round(value, 2) for key, value in figures.items()}
    # one results file per size, so that a run is compared with a run like it
    common.report(f"server_load_{streams}streams_{megabytes:g}mb", figures, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
