import io
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

from difftune.server.jobs import default_train_command


def wait_for(predicate, seconds=20.0, what="condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def set_config(workdir: Path, **values) -> None:
    path = workdir / "config" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_default_command_runs_difftune_train():
    assert default_train_command(Path("config/config.json"), False) == [
        sys.executable,
        "-m",
        "difftune",
        "train",
        "--config",
        "config/config.json",
    ]
    assert default_train_command(Path("c.json"), True)[-2:] == ["--resume_from_checkpoint", "latest"]


def test_job_runs_and_results_are_served(make_client, workdir):
    client = make_client()
    started = client.post("/api/job/start")
    assert started.status_code == 200 and started.json()["state"] == "running"
    assert started.json()["pid"] > 0
    busy = client.post("/api/job/start")
    assert busy.status_code == 409 and "already running" in busy.json()["detail"]
    state = wait_for(lambda: (s := client.get("/api/job").json())["state"] != "running" and s, what="job end")
    assert state == {**state, "state": "finished", "exit_code": 0}

    out = workdir / "out"
    assert "fresh start" in (out / "job.log").read_text()
    loss = client.get("/api/loss").json()
    assert loss == {"steps": [1, 2, 3], "loss": [1.0, 0.5, 1 / 3], "lr": [1e-4] * 3, "total": 3}
    gallery = client.get("/api/validation").json()["steps"]
    assert gallery == [
        {"step": 1, "files": [{"name": "sample_0.png", "kind": "image", "path": "validation/1/sample_0.png"}]}
    ]
    image = client.get("/api/output/file", params={"path": gallery[0]["files"][0]["path"]})
    assert Image.open(io.BytesIO(image.content)).size == (32, 24)
    assert client.get("/api/output/file", params={"path": "../config/config.json"}).status_code == 403

    # one job at a time, but a finished one does not block the next
    assert client.post("/api/job/resume").status_code == 200
    wait_for(lambda: client.get("/api/job").json()["state"] == "finished", what="resumed job end")
    assert "resuming from latest" in (out / "job.log").read_text()


def test_stop_ends_the_whole_process_group(make_client, workdir, tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setenv("FAKE_CHILD_PID_FILE", str(pid_file))
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.2")
    set_config(workdir, max_train_steps=1000)
    client = make_client()
    assert client.post("/api/job/start").status_code == 200
    wait_for(lambda: client.get("/api/loss").json()["steps"], what="first progress event")
    grandchild = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="grandchild pid"))
    stopped = client.post("/api/job/stop").json()
    assert stopped["state"] == "stopped" and stopped["exit_code"] == -15
    assert len(client.get("/api/loss").json()["steps"]) < 1000

    def gone():
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return True
        # a killed child may linger as a zombie of init until reaped: that counts as gone
        return Path(f"/proc/{grandchild}/stat").read_text().split(")")[-1].split()[0] == "Z"

    wait_for(gone, seconds=5, what="grandchild to be killed")
    assert client.post("/api/job/stop").json()["state"] == "stopped"  # stopping twice is harmless


def test_start_needs_a_valid_config(make_client, workdir):
    client = make_client()
    set_config(workdir, learning_rate=-1)
    refused = client.post("/api/job/start")
    assert refused.status_code == 422 and refused.json()["detail"][0]["key"] == "learning_rate"
    (workdir / "config" / "config.json").unlink()
    missing = client.post("/api/job/start")
    assert missing.status_code == 409 and "save the config first" in missing.json()["detail"]
    assert client.get("/api/job").json()["state"] == "idle"


def read_sse(response, until, limit=500):
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            if until(events) or len(events) >= limit:
                break
    return events


def test_event_stream_delivers_progress_and_log(make_client, workdir):
    client = make_client()
    set_config(workdir, max_train_steps=4)
    assert client.post("/api/job/start").status_code == 200

    def done(events):
        finished = any(e["type"] == "finished" for e in events)
        return finished and any(e["type"] == "joblog" and "step 4" in e["line"] for e in events)

    with client.stream("GET", "/api/events", params={"max_seconds": 30}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response, done)
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert progress[1]["loss"] == 0.5 and progress[0]["lr"] == 1e-4 and "eta_s" in progress[0]
    assert any(e["type"] == "validation" and e["step"] == 1 for e in events)
    assert any(e["type"] == "job" and e["state"] == "running" for e in events)
    assert any(e["type"] == "joblog" and "fake trainer" in e["line"] for e in events)


def test_event_stream_replays_recent_events_and_hides_nan(make_client, workdir):
    out = workdir / "out"
    out.mkdir()
    lines = [{"type": "progress", "step": s, "loss": 0.1 * s} for s in range(1, 11)]
    lines.append({"type": "progress", "step": 11, "loss": float("nan")})
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + "not json\n")
    client = make_client()
    with client.stream("GET", "/api/events", params={"backlog": 5, "max_seconds": 5}) as response:
        events = read_sse(response, lambda ev: any(e.get("step") == 11 for e in ev))
    # the last 5 messages: 4 events (a broken line is none), then the job's state, read before them
    assert [e["step"] for e in events if e["type"] == "progress"] == [8, 9, 10, 11]
    assert events[-1]["loss"] is None
    assert client.get("/api/loss").json()["loss"][-1] is None
