"""`difftune train` prints only difftune's own lines; the libraries' output goes to the run's log."""

import re
import subprocess
import sys

import pytest

from difftune.events import read_events
from difftune.testing.runs import write_tiny_run

# What difftune itself prints: event lines, the progress bar, the closing line.
OWN_LINE = re.compile(
    r"^(\[(log|warning|cache|skipped|checkpoint|validation_start|validation|saved|eval|finished)\] |training: |finished at step )"
)


def _console_lines(tmp_path, tiny_sdxl, image_folder, *flags: str) -> list[str]:
    config = write_tiny_run(
        tmp_path,
        tiny_sdxl,
        image_folder,
        max_train_steps=2,
        validation_steps=1,
        validation_preview=True,
        validation_preview_steps=1,
    )
    done = subprocess.run(
        [sys.executable, "-m", "difftune", "train", "--config", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return [line.strip() for line in re.split(r"[\r\n]", done.stdout + done.stderr) if line.strip()]


def test_a_run_prints_only_difftunes_own_lines(tmp_path, tiny_sdxl, image_folder):
    lines = _console_lines(tmp_path, tiny_sdxl, image_folder)
    assert [line for line in lines if not OWN_LINE.match(line)] == []
    assert any(line.startswith("[validation]") for line in lines)
    assert not any("preview" in line for line in lines)  # previews are events, not console lines
    log = read_events(tmp_path / "out" / "events.jsonl")
    assert len([e for e in log if e["type"] == "validation_preview"]) == 2 * 2  # two validations


@pytest.mark.slow
def test_verbose_shows_the_libraries_output_again(tmp_path, tiny_sdxl, image_folder):
    lines = _console_lines(tmp_path, tiny_sdxl, image_folder, "--verbose")
    assert any(line.startswith("Loading weights") for line in lines)


def test_warnings_of_the_libraries_go_to_the_log_and_difftunes_own_stay_on_the_console(tmp_path, capsys):
    import warnings

    from difftune.console import library_output
    from difftune.training import memory

    log = tmp_path / "events.jsonl"
    with library_output(log):
        warnings.warn_explicit("a library's notice", UserWarning, "/site-packages/lib/x.py", 1)
        warnings.warn_explicit("a setting of difftune that was not honoured", UserWarning, memory.__file__, 1)
    err = capsys.readouterr().err
    assert "[warning] a setting of difftune that was not honoured" in err and "notice" not in err
    (event,) = read_events(log, "library")
    assert "UserWarning: a library's notice" in event["message"]
