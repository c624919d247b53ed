import json
import math
from pathlib import Path

from difftune.server.progress import LineTail, LossSeries, validation_gallery


def test_line_tail_returns_only_complete_new_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = LineTail(path, backlog=2)
    assert tail.read_new() == []  # no file yet
    path.write_text("a\nb\nc\n")
    assert tail.read_new() == ["b", "c"]  # backlog: only the last 2 at first
    with path.open("a") as handle:
        handle.write("d\npart")
    assert tail.read_new() == ["d"]
    with path.open("a") as handle:
        handle.write("ial\n")
    assert tail.read_new() == ["partial"]
    path.write_text("new\n")  # rewritten shorter: read again from the start
    assert tail.read_new() == ["new"]


def test_line_tail_backlog_reads_only_the_end_of_a_big_file(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(f"line {i}\n" for i in range(100_000)) + "partial")
    reads = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        real_read = handle.read
        handle.read = lambda n=-1: reads.append(len(data := real_read(n))) or data
        return handle

    monkeypatch.setattr(Path, "open", counting_open)
    tail = LineTail(path, backlog=3)
    assert tail.read_new() == ["line 99997", "line 99998", "line 99999"]
    assert sum(reads) < 200_000  # one 64 KiB block back and the tail, not the file's 1 MB
    assert LineTail(path, backlog=3, backlog_bytes=30).read_new() == ["line 99998", "line 99999"]


def test_line_tail_starts_at_an_offset_and_reads_in_chunks(tmp_path):
    path = tmp_path / "job.log"
    path.write_text("old run\n")
    start = path.stat().st_size
    with path.open("a") as handle:
        handle.write("".join(f"new {i}\n" for i in range(50)))
    tail = LineTail(path, backlog=None, start=start)
    tail.chunk_bytes = 64
    lines = []
    while chunk := tail.read_new():
        lines += chunk
    assert lines == [f"new {i}" for i in range(50)]


def progress(step, loss, lr=0.1):
    return json.dumps({"type": "progress", "step": step, "loss": loss, "lr": lr}) + "\n"


def test_loss_series_later_run_wins_and_skips_other_events(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(
        progress(2, 0.9)
        + '{"type": "log", "message": "x"}\n'
        + progress(1, 1.0)
        + progress(2, 0.5, 0.2)
        + '{"type": "progress", "step": 3}\n'
        + '{"type": "progress", "step": 4, "loss": \n'
        + "garbage\n"
    )
    series = LossSeries(path)
    series.update()
    assert series.points() == {"steps": [1, 2], "loss": [1.0, 0.5], "lr": [0.1, 0.2], "total": 2}
    with path.open("a") as handle:  # a resumed run rewrites from step 2 on
        handle.write(progress(3, 0.4) + progress(2, 0.45, None) + progress(3, float("nan")))
    series.update()
    assert series.points() == {
        "steps": [1, 2, 3],
        "loss": [1.0, 0.45, None],
        "lr": [0.1, None, 0.1],
        "total": 3,
    }
    missing = LossSeries(tmp_path / "missing.jsonl")
    missing.update()
    assert missing.points() == {"steps": [], "loss": [], "lr": [], "total": 0}


def test_loss_series_from_an_offset_is_one_run(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(progress(1, 5.0) + progress(2, 4.0))
    series = LossSeries(path, start=path.stat().st_size)
    with path.open("a") as handle:
        handle.write(progress(1, 1.0))
    series.update()
    assert series.points()["steps"] == [1] and series.points()["loss"] == [1.0]


def test_loss_series_downsampled_to_bucket_means(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("".join(progress(step, float(step)) for step in range(1, 10_001)))
    series = LossSeries(path)
    series.update()
    points = series.points(limit=100)
    assert points["total"] == 10_000 and len(points["steps"]) == 100
    # each point is the mean of 100 consecutive steps, placed at the last of them
    assert points["steps"][:2] == [100, 200] and points["steps"][-1] == 10_000
    assert (
        points["loss"][0] == sum(range(1, 101)) / 100 and points["loss"][-1] == sum(range(9901, 10_001)) / 100
    )
    with path.open("a") as handle:
        handle.write(progress(10_001, float("inf")))
    series.update()
    assert all(v is None or math.isfinite(v) for v in series.points(limit=7)["loss"])


def test_gallery_lists_media_by_step_newest_first(tmp_path):
    for step, names in {
        "10": ["b.png", "a.mp4", "notes.txt"],
        "200": ["x.webp"],
        "final": ["y.png"],
        "5": [],
    }.items():
        folder = tmp_path / "validation" / step
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"x")
    gallery = validation_gallery(tmp_path)
    assert [entry["step"] for entry in gallery] == [200, 10]
    assert [(f["name"], f["kind"]) for f in gallery[1]["files"]] == [("a.mp4", "video"), ("b.png", "image")]
    assert gallery[0]["files"][0]["path"] == "validation/200/x.webp"
    assert validation_gallery(tmp_path / "nothing") == []
