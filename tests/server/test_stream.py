"""The event streams: one reader for all pages, a bounded backlog, nothing twice, the current run only."""

import asyncio
import json
import threading
from pathlib import Path

from difftune.server import stream as stream_module
from difftune.server.jobs import JobRunner
from difftune.server.stream import EventHub

from .test_jobs import read_sse, set_config, wait_for


def progress(step):
    return json.dumps({"type": "progress", "step": step, "loss": 1.0 / step}) + "\n"


def test_reconnect_gets_only_what_it_missed(make_client, workdir):
    out = workdir / "out"
    out.mkdir()
    events_path = out / "events.jsonl"
    events_path.write_text("".join(progress(s) for s in range(1, 4)))
    client = make_client()
    last_id = None
    with client.stream("GET", "/api/events", params={"max_seconds": 5}) as response:
        seen_step_3 = False
        for line in response.iter_lines():
            last_id = line[4:] if line.startswith("id: ") else last_id
            if line.startswith("data: "):
                seen_step_3 = seen_step_3 or json.loads(line[6:]).get("step") == 3
                if seen_step_3 and json.loads(line[6:])["type"] == "job":  # the state, sent after the events
                    break
    with events_path.open("a") as handle:
        handle.write(progress(4) + progress(5))
    headers = {"Last-Event-ID": last_id}
    with client.stream("GET", "/api/events", params={"max_seconds": 5}, headers=headers) as response:
        events = read_sse(response, lambda ev: any(e.get("step") == 5 for e in ev))
    assert [e["type"] for e in events] == ["progress", "progress"]  # no reset, no replay
    assert [e["step"] for e in events] == [4, 5]

    # an id from another server process is a new page: a reset, then the backlog
    headers = {"Last-Event-ID": "0000-3"}
    with client.stream("GET", "/api/events", params={"max_seconds": 5}, headers=headers) as response:
        events = read_sse(response, lambda ev: any(e.get("step") == 5 for e in ev))
    assert events[0]["type"] == "reset" and [e["step"] for e in events if "step" in e] == [1, 2, 3, 4, 5]


def test_a_new_job_replays_only_its_own_run(make_client, workdir, monkeypatch):
    client = make_client()
    set_config(workdir, max_train_steps=3)
    client.post("/api/job/start")
    wait_for(lambda: client.get("/api/job").json()["state"] == "finished", what="first job")
    monkeypatch.setenv("FAKE_FAIL_AT_STEP", "1")
    monkeypatch.setenv("FAKE_FAIL_MESSAGE", "config.json: 'learning_rate' is too large")
    client.post("/api/job/start")
    state = wait_for(lambda: (s := client.get("/api/job").json())["state"] != "running" and s, what="second")
    assert state["state"] == "failed" and state["reason"] == "config.json: 'learning_rate' is too large"

    def ended(events):
        return any(e["type"] == "joblog" and "exited" in e["line"] for e in events)

    with client.stream("GET", "/api/events", params={"max_seconds": 5}) as response:
        events = read_sse(response, ended)
    log = [e["line"] for e in events if e["type"] == "joblog"]
    assert sum(line.startswith("$ ") for line in log) == 1  # one run's command line, not two
    assert [e["step"] for e in events if e["type"] == "progress"] == [1]  # not the first run's 1, 2, 3
    assert "step 3 loss" not in "\n".join(log)
    # the loss series is the current run's
    assert client.get("/api/loss").json()["steps"] == [1]


def test_an_ended_job_is_announced_after_its_last_line(workdir, train_command, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_AT_STEP", "0")
    runner = JobRunner(workdir, train_command)
    runner.start(Path("config/config.json"), workdir / "out")
    wait_for(lambda: runner.job.exit_code is not None, what="the job to fail")
    hub = EventHub(runner, lambda: workdir / "out", poll_seconds=0.01)

    async def one_read():  # the job ended before the first read, so one read finds all of it
        async for chunk in hub.stream(None, max_seconds=0.3):
            if '"failed"' in chunk and "[job exited" in chunk:
                return chunk
        return ""

    text = asyncio.run(one_read())
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] if e["type"] != "joblog" else e["line"][:4] for e in events]
    assert kinds[0] == "reset" and kinds[-1] == "job" and events[-1]["state"] == "failed", kinds
    assert kinds[-2] == "[job" and kinds.count("job") == 1  # a page that shows "failed" has every line


def test_a_new_page_gets_the_log_lines_a_page_that_watched_holds(workdir, train_command):
    set_config(workdir, max_train_steps=40)  # 40 progress events push the log lines out of the backlog
    runner = JobRunner(workdir, train_command)
    runner.start(Path("config/config.json"), workdir / "out")
    wait_for(lambda: runner.job.exit_code is not None, what="the job to end")
    hub = EventHub(runner, lambda: workdir / "out", poll_seconds=0.01, backlog=10, log_lines=30)

    async def page():
        chunks = []
        async for chunk in hub.stream(None, max_seconds=0.5):
            chunks.append(chunk)
        return "".join(chunks)

    events = [json.loads(line[6:]) for line in asyncio.run(page()).splitlines() if line.startswith("data: ")]
    assert events[0] == {"type": "reset", "log_lines": 30}  # a page keeps as many lines as are replayed
    log = (workdir / "out" / "job.log").read_text().splitlines()
    assert [e["line"] for e in events if e["type"] == "joblog"] == log[-30:]
    assert events[-1]["state"] == "finished" and len(hub.messages) == 10  # the other messages stay bounded


def test_all_pages_share_one_reader(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "events.jsonl").write_text(progress(1))
    reads = []
    original = stream_module.LineTail.read_new
    monkeypatch.setattr(stream_module.LineTail, "read_new", lambda self: reads.append(1) or original(self))
    hub = EventHub(JobRunner(tmp_path), lambda: out, poll_seconds=0.05)

    async def page(received):
        async for chunk in hub.stream(None, max_seconds=1.0):
            received.append(chunk)

    async def main():
        received = [[] for _ in range(200)]
        pages = [asyncio.ensure_future(page(r)) for r in received]
        await asyncio.sleep(0.3)
        with (out / "events.jsonl").open("a") as handle:
            handle.write(progress(2))
        await asyncio.gather(*pages)
        return received

    received = asyncio.run(main())
    assert all('"step": 2' in "".join(r) and '"step": 1' in "".join(r) for r in received)
    assert len(reads) < 40  # about one read per poll (1 s / 0.05 s), not one per page and poll
    assert hub.clients == 0


def test_backlog_is_bounded(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "events.jsonl").write_text("".join(progress(s) for s in range(1, 5001)))
    hub = EventHub(JobRunner(tmp_path), lambda: out, poll_seconds=0.01, backlog=100)

    async def first_chunks():
        chunks = []
        async for chunk in hub.stream(None, max_seconds=0.5):
            chunks.append(chunk)
        return "".join(chunks)

    text = asyncio.run(first_chunks())
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:2]] == ["reset", "job"]  # a new page: clean, then the job's state
    # the last 100 messages: the last 99 events, then the job's state (read before them, sent after)
    assert [e["step"] for e in events if e["type"] == "progress"] == list(range(4902, 5001))
    assert events[-1]["type"] == "job" and len(hub.messages) == 100


def test_file_reads_happen_off_the_event_loop(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    threads = []
    original = stream_module.EventHub._read_new

    def record(self):
        threads.append(threading.current_thread() is threading.main_thread())
        return original(self)

    monkeypatch.setattr(stream_module.EventHub, "_read_new", record)
    hub = EventHub(JobRunner(tmp_path), lambda: Path(out), poll_seconds=0.05)

    async def run():
        async for _ in hub.stream(None, max_seconds=0.3):
            pass

    asyncio.run(run())
    assert threads and not any(threads)


def test_a_broken_config_file_pauses_the_stream_without_ending_it(make_client, workdir):
    out = workdir / "out"
    out.mkdir()
    (out / "events.jsonl").write_text(progress(1))
    config = workdir / "config" / "config.json"
    good = config.read_text()
    config.write_text('{"output_dir": "out",,}')  # no job runs, so the output folder comes from here
    client = make_client()

    threading.Timer(0.5, lambda: config.write_text(good)).start()
    with client.stream("GET", "/api/events", params={"max_seconds": 10}) as response:
        events = read_sse(response, lambda ev: any(e.get("step") == 1 for e in ev))
    assert [e["step"] for e in events if e["type"] == "progress"] == [1]
