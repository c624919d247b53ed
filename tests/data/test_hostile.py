"""Hostile and unlucky dataset folders: every bad file ends in a reported skip, never a traceback or a hang.

Each case adds one bad entry beside a good image; discovery and captions must keep the good image
alone and report the bad entry with a reason, within the time limit.
"""

import os

import pytest

from difftune.config.schema import DatasetConfig
from difftune.data.captions import load_captions
from difftune.data.discovery import discover
from tests.data.fakes import save_image
from tests.timeout import run_within


def _bad_name(folder):
    save_image(folder / os.fsdecode(b"bad\xff\xfename.png"), (32, 32))


def _binary_caption(folder):
    save_image(folder / "junk.png", (32, 32))
    (folder / "junk.txt").write_bytes(bytes(range(256)))


def _nul_caption(folder):
    save_image(folder / "nul.png", (32, 32))
    (folder / "nul.txt").write_bytes(b"a caption\x00\x00\x00")


def _empty_image(folder):
    (folder / "empty.png").write_bytes(b"")


def _pipe(folder):
    os.mkfifo(folder / "pipe.png")


def _self_link(folder):
    (folder / "self").symlink_to(".")


def _link_loop(folder):
    (folder / "first").symlink_to("second")
    (folder / "second").symlink_to("first")


def _link_to_root(folder):
    (folder / "root").symlink_to("/")


def _link_to_missing(folder):
    (folder / "gone.png").symlink_to("nowhere.png")


# (case, adds the bad entry, the name reported, words of the reason); None: left out without a report
CASES = [
    ("name-not-utf8", _bad_name, "bad\\xff\\xfename.png", "not valid UTF-8"),
    ("binary-caption", _binary_caption, "junk.txt", "not UTF-8 text"),
    ("nul-in-caption", _nul_caption, "nul.txt", "holds binary data"),
    ("empty-image", _empty_image, "empty.png", "unreadable image header"),
    ("pipe-named-png", _pipe, None, None),
    ("link-to-itself", _self_link, "self", "already in the dataset"),
    ("loop-of-two-links", _link_loop, "first", "broken symbolic link"),
    ("link-to-filesystem-root", _link_to_root, "root", "outside the dataset folder"),
    ("broken-link", _link_to_missing, "gone.png", "broken symbolic link"),
]


def _discover_and_caption(dataset, metadata_dir):
    found = discover(dataset, metadata_dir)
    captions = load_captions(dataset, found.samples, found.root)
    return found, captions


@pytest.mark.parametrize(("add_bad", "name", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_hostile_entry_is_skipped_and_reported(tmp_path, add_bad, name, reason):
    folder = tmp_path / "data"
    save_image(folder / "good.png", (32, 32))
    (folder / "good.txt").write_text("a good picture")
    add_bad(folder)
    dataset = DatasetConfig(id="set", instance_data_dir=str(folder), caption_strategy="textfile")
    found, captions = run_within(10, _discover_and_caption, dataset, tmp_path / "meta")
    kept = [s.relative_path for s, c in zip(found.samples, captions.per_sample) if c is not None]
    assert kept == ["good.png"]
    reported = {path.name: why for path, why in found.skipped + captions.unreadable}
    if name is None:
        assert reported == {}
    else:
        assert reason in reported[name]
        assert set(reported) == {name} or name == "first"  # both links of a loop are reported
