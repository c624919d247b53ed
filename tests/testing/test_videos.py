"""The generated video dataset the tests and the demo train on."""

from pathlib import Path

from difftune.data.video import probe_video
from difftune.testing.videos import make_video_dataset

CONTAINERS = [".mp4", ".webm", ".mkv", ".mov"]


def test_make_video_dataset_varies_size_rate_length_and_captions(tmp_path: Path) -> None:
    paths = make_video_dataset(tmp_path, 8, seed=1)
    assert len(paths) == 8 and {p.suffix for p in paths} == set(CONTAINERS)
    infos = [probe_video(p) for p in paths]
    assert all(17 <= info.num_frames <= 40 for info in infos)
    assert len({(i.width, i.height) for i in infos}) > 1 and len({round(i.fps) for i in infos}) > 1
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").split() for p in paths]
    assert all(captions) and len({len(c) for c in captions}) > 2
