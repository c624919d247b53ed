from pathlib import Path

import pytest


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    from difftune.testing.images import make_image_dataset

    folder = tmp_path / "images"
    make_image_dataset(folder, n=6, seed=0)
    return folder


@pytest.fixture()
def video_folder(tmp_path) -> Path:
    from difftune.testing.videos import make_video_dataset

    folder = tmp_path / "videos"
    make_video_dataset(folder, n=4, frames=(9, 12), sizes=((64, 48), (48, 64)), fps_choices=(24,), seed=0)
    return folder
