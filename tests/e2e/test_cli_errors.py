"""How `difftune train` ends when a run fails: one line on the console, the traceback in the log."""

from difftune.cli import main
from difftune.events import read_events
from difftune.testing.runs import write_tiny_run


def _failing_optimizer(*_args, **_kwargs):
    raise RuntimeError("the optimizer could not be built")


def test_an_internal_error_is_one_line_with_exit_1_and_its_traceback_in_the_log(
    tmp_path, tiny_sdxl, image_folder, monkeypatch, capsys
):
    config = write_tiny_run(tmp_path, tiny_sdxl, image_folder)
    monkeypatch.setattr("difftune.training.loop.build_optimizer", _failing_optimizer)
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    log = tmp_path / "out" / "events.jsonl"
    assert last.startswith("difftune: internal error: RuntimeError: the optimizer could not be built — ")
    assert str(log) in last and "--debug" in last
    assert "Traceback" not in err
    (error,) = read_events(log, "error")
    assert "Traceback" in error["traceback"] and "_failing_optimizer" in error["traceback"]

    assert main(["train", "--config", str(config), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_user_error_during_the_run_is_one_line_with_exit_2(tmp_path, tiny_sdxl, image_folder, capsys):
    config = write_tiny_run(tmp_path, tiny_sdxl, image_folder, train_batch_size=64)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("difftune: ") and "64" in last and "Traceback" not in err


def test_an_empty_dataset_is_reported_before_the_model_loads(tmp_path, capsys):
    empty = tmp_path / "images"
    empty.mkdir()
    config = write_tiny_run(tmp_path, tmp_path / "no-model-here", empty)  # loading it would fail
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "dataset 'images'" in err and "holds no image files" in err and "no-model-here" not in err
