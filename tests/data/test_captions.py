import json

import pytest

from difftune.config.schema import DatasetConfig
from difftune.data.captions import caption_from_filename, load_captions, pick_caption
from difftune.data.discovery import discover
from difftune.data.errors import DataError
from tests.data.fakes import save_image


def _captions(tmp_path, **kwargs):
    dataset = DatasetConfig(id="set", instance_data_dir=str(tmp_path / "data"), **kwargs)
    found = discover(dataset, tmp_path / "meta")
    return found, load_captions(dataset, found.samples, found.root)


@pytest.mark.parametrize(
    ("name", "caption"),
    [
        ("a_red_ball.jpg", "a red ball"),
        ("a_red_ball-1.png", "a red ball"),
        ("a red ball (2).png", "a red ball"),
        ("a_red_circle_on_a_blue_background_7.jpg", "a red circle on a blue background"),
        ("dog-12 (3).jpg", "dog"),
        ("42.png", "42"),
    ],
)
def test_caption_from_filename(name, caption):
    assert caption_from_filename(name) == caption


def test_textfile_lines_are_captions_and_one_is_chosen_per_epoch(tmp_path):
    save_image(tmp_path / "data" / "cat.png", (16, 16))
    (tmp_path / "data" / "cat.txt").write_text("a cat\n\n  a small cat  \n")
    _, captions = _captions(tmp_path, caption_strategy="textfile")
    assert captions.per_sample == [["a cat", "a small cat"]]
    picks = [
        pick_caption(captions.per_sample[0], seed=3, epoch=e, relative_path="cat.png") for e in range(40)
    ]
    assert set(picks) == {"a cat", "a small cat"}
    assert picks == [pick_caption(captions.per_sample[0], 3, e, "cat.png") for e in range(40)]


def test_missing_textfile_falls_back_to_filename_and_is_reported_once(tmp_path):
    save_image(tmp_path / "data" / "with.png", (16, 16))
    (tmp_path / "data" / "with.txt").write_text("has a caption")
    save_image(tmp_path / "data" / "blue_sky-2.png", (16, 16))
    save_image(tmp_path / "data" / "green_field.png", (16, 16))
    found, captions = _captions(tmp_path, caption_strategy="textfile")
    by_name = {s.relative_path: c for s, c in zip(found.samples, captions.per_sample)}
    assert by_name == {
        "with.png": ["has a caption"],
        "blue_sky-2.png": ["blue sky"],
        "green_field.png": ["green field"],
    }
    message = captions.fallback_message("set", "textfile")
    assert (
        message.startswith("dataset 'set': 2 of 3 file(s) have no .txt file")
        and "file names are used" in message
    )


def test_instanceprompt_and_prepend(tmp_path):
    save_image(tmp_path / "data" / "x_photo.png", (16, 16))
    _, captions = _captions(tmp_path, caption_strategy="instanceprompt", instance_prompt="sks dog")
    assert captions.per_sample == [["sks dog"]]
    _, prepended = _captions(
        tmp_path, caption_strategy="filename", instance_prompt="sks", prepend_instance_prompt=True
    )
    assert prepended.per_sample == [["sks x photo"]]


def test_jsonl_and_csv_metadata(tmp_path):
    save_image(tmp_path / "data" / "one.png", (16, 16))
    save_image(tmp_path / "data" / "sub" / "two.png", (16, 16))
    save_image(tmp_path / "data" / "three_x.png", (16, 16))
    rows = [
        {"file_name": "one.png", "caption": "first"},
        {"file_name": "sub/two.png", "text": ["second", "2nd"]},
    ]
    (tmp_path / "data" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    found, captions = _captions(tmp_path, caption_strategy="jsonl")
    by_name = {s.relative_path: c for s, c in zip(found.samples, captions.per_sample)}
    assert by_name == {"one.png": ["first"], "sub/two.png": ["second", "2nd"], "three_x.png": ["three x"]}
    assert captions.fallbacks == [tmp_path / "data" / "three_x.png"]

    (tmp_path / "caps.csv").write_text('file_name,caption\none.png,"csv, first"\ntwo.png,csv second\n')
    found, captions = _captions(tmp_path, caption_strategy="csv", metadata_file=str(tmp_path / "caps.csv"))
    by_name = {s.relative_path: c for s, c in zip(found.samples, captions.per_sample)}
    assert by_name["one.png"] == ["csv, first"] and by_name["sub/two.png"] == ["csv second"]


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    save_image(tmp_path / "data" / "one.png", (16, 16))
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "one.png", "caption": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 2 is not valid JSON"):
        _captions(tmp_path, caption_strategy="jsonl")
    with pytest.raises(DataError, match="metadata_file .*missing.jsonl not found"):
        _captions(tmp_path, caption_strategy="jsonl", metadata_file="missing.jsonl")


def test_a_binary_caption_file_leaves_its_sample_out_with_the_reason(tmp_path):
    save_image(tmp_path / "data" / "good.png", (16, 16))
    (tmp_path / "data" / "good.txt").write_text("a good caption")
    save_image(tmp_path / "data" / "junk.png", (16, 16))
    (tmp_path / "data" / "junk.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    save_image(tmp_path / "data" / "nul.png", (16, 16))
    (tmp_path / "data" / "nul.txt").write_bytes(b"text\x00with a NUL")
    _, captions = _captions(tmp_path, caption_strategy="textfile")
    assert captions.per_sample == [["a good caption"], None, None]
    reasons = {path.name: reason for path, reason in captions.unreadable}
    assert "junk.txt is not UTF-8 text" in reasons["junk.txt"]
    assert "nul.txt holds binary data" in reasons["nul.txt"]


def test_a_utf16_caption_file_with_a_byte_order_mark_is_read(tmp_path):
    save_image(tmp_path / "data" / "cat.png", (16, 16))
    (tmp_path / "data" / "cat.txt").write_bytes("une chatte\n".encode("utf-16"))
    _, captions = _captions(tmp_path, caption_strategy="textfile")
    assert captions.per_sample == [["une chatte"]]


@pytest.mark.parametrize("strategy", ["jsonl", "csv"])
def test_a_binary_metadata_file_names_the_file(tmp_path, strategy):
    save_image(tmp_path / "data" / "cat.png", (16, 16))
    (tmp_path / "data" / f"metadata.{strategy}").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01")
    with pytest.raises(DataError, match=rf"metadata\.{strategy} is not UTF-8 text"):
        _captions(tmp_path, caption_strategy=strategy)


def test_only_instance_prompt_replaces_every_caption(tmp_path):
    save_image(tmp_path / "data" / "x_photo.png", (16, 16))
    (tmp_path / "data" / "x_photo.txt").write_text("a photo of x")
    _, captions = _captions(
        tmp_path, caption_strategy="textfile", instance_prompt="sks", only_instance_prompt=True
    )
    assert captions.per_sample == [["sks"]]


def test_caption_shuffle_adds_repeatable_variants_keeping_the_first_tags(tmp_path):
    save_image(tmp_path / "data" / "dog.png", (16, 16))
    (tmp_path / "data" / "dog.txt").write_text("dog, running, park, sunny day, grass")
    block = {"enable": True, "count": 3, "position_start": 1, "seed": 7}
    _, captions = _captions(tmp_path, caption_strategy="textfile", caption_shuffle=block)
    (variants,) = captions.per_sample
    assert variants[0] == "dog, running, park, sunny day, grass" and len(variants) == 4
    for variant in variants[1:]:
        tags = variant.split(", ")
        assert tags[0] == "dog" and sorted(tags[1:]) == ["grass", "park", "running", "sunny day"]
    assert len(set(variants)) > 1
    _, again = _captions(tmp_path, caption_strategy="textfile", caption_shuffle=block)
    assert again.per_sample == captions.per_sample
    _, other_seed = _captions(tmp_path, caption_strategy="textfile", caption_shuffle={**block, "seed": 8})
    assert other_seed.per_sample != captions.per_sample
    _, without = _captions(
        tmp_path, caption_strategy="textfile", caption_shuffle={**block, "include_original": False}
    )
    assert len(without.per_sample[0]) == 3
    _, plain = _captions(tmp_path, caption_strategy="textfile", caption_shuffle=False)
    assert plain.per_sample == [["dog, running, park, sunny day, grass"]]
