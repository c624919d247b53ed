from difftune.server.progress import LineTail, loss_series, validation_gallery


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


def test_loss_series_later_run_wins_and_skips_other_events(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"type": "progress", "step": 2, "loss": 0.9, "lr": 0.1}\n'
        '{"type": "log", "message": "x"}\n'
        '{"type": "progress", "step": 1, "loss": 1.0, "lr": 0.1}\n'
        '{"type": "progress", "step": 2, "loss": 0.5, "lr": 0.2}\n'
        '{"type": "progress", "step": 3}\n'
        "garbage\n"
    )
    assert loss_series(path) == {"steps": [1, 2], "loss": [1.0, 0.5], "lr": [0.1, 0.2]}
    assert loss_series(tmp_path / "missing.jsonl") == {"steps": [], "loss": [], "lr": []}


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
