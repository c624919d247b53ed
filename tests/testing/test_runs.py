"""write_tiny_run writes, for every registered family and kind of flavour, files the config loader takes."""

import json

import pytest

from difftune.config import load_config
from difftune.families import get_family, registry
from difftune.testing.runs import tiny_side, write_tiny_run


def _first_flavour_of_each_kind() -> list[tuple[str, str]]:
    """(family, flavour) for the first flavour of each kind (t2i, i2i, t2v, i2v) of each registered family."""
    pairs = []
    for spec in registry.FAMILIES.values():
        firsts: dict[str, str] = {}
        for name, flavour in spec.flavours.items():
            firsts.setdefault(flavour.kind, name)
        pairs += [(spec.name, name) for name in firsts.values()]
    return pairs


CONDITIONING = {"t2i": "none", "t2v": "none", "i2i": "prompt_image", "i2v": "first_frame"}


@pytest.mark.parametrize(("family", "flavour"), _first_flavour_of_each_kind())
def test_a_tiny_run_of_each_family_loads_without_warnings_and_follows_its_row(tmp_path, family, flavour):
    spec = registry.spec(family)
    kind = spec.flavours[flavour].kind
    (tmp_path / "media").mkdir()
    path = write_tiny_run(
        tmp_path, tmp_path / "model", tmp_path / "media", model_family=family, model_flavour=flavour
    )
    assert path == tmp_path / "config" / "config.json"

    loaded = load_config(path)
    assert loaded.warnings == []
    assert loaded.train.model_family == family and loaded.train.model_flavour == flavour
    assert loaded.train.pretrained_model_name_or_path == str(tmp_path / "model")
    training = next(d for d in loaded.datasets if d.id == "images")
    assert training.resolution == tiny_side(family) and tiny_side(family) % spec.pixel_multiple == 0
    width, height = (int(side) for side in loaded.train.validation_resolution.split("x"))
    assert width % spec.pixel_multiple == 0 and height % spec.pixel_multiple == 0
    if spec.is_video:  # clips of two latent frames
        assert training.dataset_type == "video"
        assert training.video.num_frames == training.video.min_frames == spec.frames_per_latent + 1
        assert spec.frame_count_problem(loaded.train.validation_num_video_frames) is None
    else:
        assert training.dataset_type == "image" and training.video is None
    sources = [d for d in loaded.datasets if d.dataset_type == "conditioning"]
    if kind == "i2i":
        assert [d.id for d in sources] == [training.conditioning_data]
        assert sources[0].instance_data_dir == str(tmp_path / "media")
    else:
        assert sources == [] and not training.conditioning_data
    assert get_family(loaded.train).conditioning == CONDITIONING[kind]


def test_overrides_reach_the_files(tmp_path):
    (tmp_path / "media").mkdir()
    extra = {
        "id": "held",
        "type": "local",
        "dataset_type": "eval",
        "instance_data_dir": str(tmp_path / "media"),
    }
    path = write_tiny_run(
        tmp_path,
        tmp_path / "model",
        tmp_path / "media",
        dataset={"repeats": 0, "crop_style": "random"},
        text_embeds={"write_batch_size": 16},
        extra_backends=[extra],
        learning_rate=3e-3,
        max_train_steps=7,
    )
    loaded = load_config(path)
    assert loaded.warnings == []
    assert (loaded.train.learning_rate, loaded.train.max_train_steps) == (3e-3, 7)
    images, held = (next(d for d in loaded.all_datasets if d.id == name) for name in ("images", "held"))
    assert (images.repeats, images.crop_style, held.dataset_type) == (0, "random", "eval")
    assert loaded.text_embeds_dataset.write_batch_size == 16
    written = json.loads((tmp_path / "config" / "multidatabackend.json").read_text())
    assert [entry["id"] for entry in written] == ["images", "text-embeds", "held"]
