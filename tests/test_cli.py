"""The command line: help for every command without reading a config, the version, one-line errors."""

import subprocess
import sys

import pytest

from difftune import __version__
from difftune.cli import main


@pytest.mark.parametrize("command", ["train", "demo", "configure", "server"])
def test_each_command_explains_what_it_reads_writes_and_shows_an_example(
    command, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # no config here: help must not look for one
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: difftune {command}")
    assert "--workdir" in out or "--config" in out
    assert "example:" in out and f"difftune {command}" in out.split("example:")[1]
    assert "writes" in out or "reads and writes" in out


def test_train_help_in_a_folder_without_config_does_not_try_to_load_one(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "difftune", "train", "-h"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "config/config.json" in done.stdout and "--max_train_steps" in done.stdout
    assert done.stderr == ""


def test_version_prints_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"difftune {__version__}"


def test_a_missing_config_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difftune: ") and "config/config.json" in err and "difftune configure" in err
    assert "Traceback" not in err


def test_a_bad_option_of_a_subcommand_is_a_usage_error(capsys):
    assert main(["demo", "--family", "flux"]) == 2
    assert "invalid choice: 'flux'" in capsys.readouterr().err
