import copy
import errno
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from difftune.training import checkpoints, state_files
from difftune.training.checkpoint_paths import outside_output_dir_problem
from difftune.training.checkpoints import (
    CheckpointDiskFull,
    CheckpointError,
    TrainerState,
    checkpoint_dirs,
    read_checkpoint,
    resolve_resume,
    save_checkpoint,
    trainable_state,
    verify_checkpoint,
)
from difftune.training.distributed import apply_checkpoint, checkpoint_parts

OLD_LAYOUT = Path(__file__).parent / "data" / "checkpoint-3"


def _model_and_optim():
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler):
    loss = model(torch.ones(2, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _save_run(folder, model, optimizer, scheduler, state, total_limit=None):
    weights, optimizer_state = checkpoint_parts(model, optimizer)
    return save_checkpoint(folder, weights, optimizer_state, scheduler.state_dict(), state, total_limit)


def _load(path, model, optimizer, scheduler):
    return apply_checkpoint(read_checkpoint(path), model, optimizer, scheduler)


def _save(folder, step, total_limit=None):
    model, optimizer, scheduler = _model_and_optim()
    _step(model, optimizer, scheduler)
    return _save_run(folder, model, optimizer, scheduler, TrainerState(global_step=step), total_limit)


def test_checkpoint_round_trip_restores_weights_optimizer_schedule_rng_and_features(tmp_path):
    model, optimizer, scheduler = _model_and_optim()
    _step(model, optimizer, scheduler)
    generator = torch.Generator().manual_seed(3)
    shadow = {"weight": torch.randn(3, 4)}
    state = TrainerState(
        global_step=1,
        sampler={"epoch": 0, "batch_index": 5, "seed": 7},
        noise_generator=generator.get_state(),
        extra={"ema": {"decay": 0.99, "num_updates": 1, "shadow": shadow}},
    )
    path = _save_run(tmp_path, model, optimizer, scheduler, state)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    saved_weight = model.weight.detach().clone()
    saved_optimizer = copy.deepcopy(optimizer.state_dict())

    _step(model, optimizer, scheduler)
    assert not torch.equal(model.weight, saved_weight)
    restored = _load(path, model, optimizer, scheduler)
    assert torch.equal(model.weight, saved_weight)
    assert restored.global_step == 1 and restored.sampler == {"epoch": 0, "batch_index": 5, "seed": 7}
    assert torch.equal(restored.noise_generator, generator.get_state())
    assert torch.equal(restored.extra["ema"]["shadow"]["weight"], shadow["weight"])
    assert restored.extra["ema"]["decay"] == 0.99
    # torch, numpy and python RNG restored
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert scheduler.last_epoch == 1
    loaded = optimizer.state_dict()
    assert loaded["param_groups"] == saved_optimizer["param_groups"]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(loaded["state"][0][key], saved_optimizer["state"][0][key])
    assert "bias" not in trainable_state(model)


def _assert_same_state(model, optimizer, scheduler, other_model, other_optimizer, other_scheduler):
    assert model.state_dict().keys() == other_model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, other_model.state_dict()[key]), key
    saved, loaded = optimizer.state_dict(), other_optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"] and loaded["state"].keys() == saved["state"].keys()
    for index, values in saved["state"].items():
        assert values.keys() == loaded["state"][index].keys()
        assert all(torch.equal(values[key], loaded["state"][index][key]) for key in values)
    assert scheduler.state_dict() == other_scheduler.state_dict()


def test_read_and_apply_give_a_fresh_model_and_optimizer_exactly_the_saved_state(tmp_path):
    model, optimizer, scheduler = _model_and_optim()
    for _ in range(2):
        _step(model, optimizer, scheduler)
    path = _save_run(tmp_path, model, optimizer, scheduler, TrainerState(global_step=2))
    torch.manual_seed(1)  # another initialisation, and an optimizer that has not stepped
    fresh, fresh_optimizer, fresh_scheduler = _model_and_optim()
    fresh.bias.data.copy_(model.bias)  # frozen: not in the checkpoint
    assert not torch.equal(fresh.weight, model.weight)
    assert _load(path, fresh, fresh_optimizer, fresh_scheduler).global_step == 2
    _assert_same_state(model, optimizer, scheduler, fresh, fresh_optimizer, fresh_scheduler)
    # and both train on identically
    _step(model, optimizer, scheduler)
    _step(fresh, fresh_optimizer, fresh_scheduler)
    _assert_same_state(model, optimizer, scheduler, fresh, fresh_optimizer, fresh_scheduler)


def _old_layout_run():
    """The run tests/training/data/checkpoint-3 was saved from, by the code before read_checkpoint existed.

    It was written by save_checkpoint(folder, trainable_state(model), optimizer, scheduler, state) at
    step 3 with state = TrainerState(3, sampler={"epoch": 1, "batch_index": 2, "seed": 7},
    noise_generator=torch.Generator().manual_seed(5).get_state(), extra={"ema": {"decay": 0.99,
    "num_updates": 3, "shadow": {"weight": torch.arange(12.0).view(3, 4)}}}) right after seeding
    torch, numpy and random with 11.
    """
    torch.manual_seed(0)
    model, optimizer, scheduler = _model_and_optim()
    for _ in range(3):
        _step(model, optimizer, scheduler)
    return model, optimizer, scheduler


def test_a_checkpoint_written_by_the_earlier_code_reads_and_resumes(tmp_path):
    assert verify_checkpoint(OLD_LAYOUT) is None
    model, optimizer, scheduler = _old_layout_run()
    torch.manual_seed(1)
    fresh, fresh_optimizer, fresh_scheduler = _model_and_optim()
    fresh.bias.data.copy_(model.bias)
    state = _load(OLD_LAYOUT, fresh, fresh_optimizer, fresh_scheduler)
    # float maths on another machine may round the three AdamW steps differently
    torch.testing.assert_close(fresh.weight, model.weight)
    torch.testing.assert_close(fresh_optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert state.global_step == 3 and state.sampler == {"epoch": 1, "batch_index": 2, "seed": 7}
    assert torch.equal(state.noise_generator, torch.Generator().manual_seed(5).get_state())
    assert torch.equal(state.extra["ema"]["shadow"]["weight"], torch.arange(12.0).view(3, 4))
    restored = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    assert torch.equal(restored[0], torch.rand(3)) and np.array_equal(restored[1], np.random.rand(3))
    assert restored[2] == random.random()
    # saved again by today's code, it holds the same bytes for everything but the RNG states
    again = _save_run(tmp_path, fresh, fresh_optimizer, fresh_scheduler, state)
    for name in (
        "trainable.safetensors",
        *(f"{n}.{e}" for n in ("optimizer", "lr_scheduler") for e in ("json", "safetensors")),
    ):
        assert (again / name).read_bytes() == (OLD_LAYOUT / name).read_bytes(), name


def test_a_checkpoint_of_another_model_or_optimizer_is_refused_with_the_reason(tmp_path):
    path = _save(tmp_path, 2)
    other = torch.nn.Linear(4, 5)
    optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="checkpoint-2: checkpoint holds weights this model does not"):
        _load(path, torch.nn.Sequential(other), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, abs))
    model, _, scheduler = _model_and_optim()
    two_groups = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer or learning-rate schedule does not fit"):
        _load(path, model, two_groups, scheduler)


def test_a_checkpoint_holds_only_safetensors_and_json(tmp_path):
    path = _save(tmp_path, 2)
    suffixes = {p.suffix for p in path.iterdir()}
    assert suffixes == {".safetensors", ".json"}
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}


class _Marker:
    """Unpickling this creates a file: the proof that a loader ran code from a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_in_a_checkpoint_folder_are_never_loaded(tmp_path):
    path = _save(tmp_path, 2)
    marker = tmp_path / "code-ran"
    for name in ("optimizer.pt", "lr_scheduler.pt", "trainer_state.pt"):
        (path / name).write_bytes(pickle.dumps(_Marker(marker)))
    model, optimizer, scheduler = _model_and_optim()
    _load(resolve_resume(tmp_path, "latest"), model, optimizer, scheduler)
    assert not marker.exists()


def test_an_old_pickled_checkpoint_is_refused_with_a_reason(tmp_path):
    old = tmp_path / "checkpoint-5"
    old.mkdir()
    (old / "complete.json").write_text('{"global_step": 5}')
    (old / "optimizer.pt").write_bytes(pickle.dumps({}))
    with pytest.raises(CheckpointError, match="checkpoint-5.*could run code"):
        resolve_resume(tmp_path, "latest")


def test_incomplete_checkpoint_is_ignored_and_limit_prunes(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step, total_limit=2)
    (tmp_path / "checkpoint-8").mkdir()  # a folder without a manifest is never complete
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-6"
    assert resolve_resume(tmp_path / "empty", "latest") is None


def test_resume_from_a_missing_path_names_the_choices(tmp_path):
    _save(tmp_path, 3)
    with pytest.raises(CheckpointError, match="checkpoint-29.*checkpoint-3"):
        resolve_resume(tmp_path, "checkpoint-29")


def test_a_checkpoint_outside_output_dir_needs_the_explicit_setting(tmp_path):
    elsewhere = _save(tmp_path / "dataset", 2)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "checkpoint-2").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="outside output_dir.*allow_resume_outside_output_dir"):
        resolve_resume(output_dir, str(elsewhere))
    with pytest.raises(CheckpointError, match="allow_resume_outside_output_dir"):
        resolve_resume(output_dir, "checkpoint-2")  # a link does not get around it
    with pytest.raises(CheckpointError, match="links outside output_dir"):
        resolve_resume(output_dir, "latest")
    assert resolve_resume(output_dir, str(elsewhere), allow_outside=True) == elsewhere
    assert resolve_resume(output_dir, "latest", allow_outside=True).name == "checkpoint-2"
    assert "allow_resume_outside_output_dir" in outside_output_dir_problem(output_dir, str(elsewhere), False)
    assert outside_output_dir_problem(output_dir, "checkpoint-4", False) is None
    assert outside_output_dir_problem(output_dir, "../dataset/checkpoint-2", False) is not None


def _truncate(path):
    data = (path / "trainable.safetensors").read_bytes()
    (path / "trainable.safetensors").write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (path / "optimizer.safetensors").write_bytes(bytes(data))


def _garbage_state(path):
    (path / "trainer_state.json").write_text("{not json")


def _garbage_manifest(path):
    (path / "manifest.json").write_text('{"files": [1, 2')


def _interrupted_write(path):
    # what a kill during the write leaves: the temporary folder, and no checkpoint-6 at all
    path.rename(path.with_name(f".{path.name}.tmp"))


DAMAGE = {
    "truncated file": (_truncate, "trainable.safetensors is .* bytes"),
    "missing file": (lambda p: (p / "lr_scheduler.json").unlink(), "lr_scheduler.json is missing"),
    "flipped bytes": (_flip, "optimizer.safetensors does not match its sha256"),
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    "garbage JSON": (_garbage_state, r"trainer_state.json is \d+ bytes"),
    "garbage manifest": (_garbage_manifest, "manifest.json is not a readable manifest"),
    "tmp folder": (_interrupted_write, None),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
    damage_fn, reason = DAMAGE[damage]
    _save(tmp_path, 4)
    damage_fn(_save(tmp_path, 6))
    events = []
    path = resolve_resume(tmp_path, "latest", emit=lambda kind, data: events.append((kind, data)))
    assert path.name == "checkpoint-4"
    if reason is not None:
        assert verify_checkpoint(tmp_path / "checkpoint-6") is not None
        assert [kind for kind, _ in events] == ["warning"]
        assert "checkpoint-6" in events[0][1]["message"]
        assert __import__("re").search(reason, events[0][1]["message"])
    model, optimizer, scheduler = _model_and_optim()
    assert _load(path, model, optimizer, scheduler).global_step == 4


@pytest.mark.parametrize(
    "damage", [d for d in DAMAGE if DAMAGE[d][1]], ids=[d for d in DAMAGE if DAMAGE[d][1]]
)
def test_without_an_intact_checkpoint_resume_ends_in_a_clear_message(tmp_path, damage):
    damage_fn, reason = DAMAGE[damage]
    damage_fn(_save(tmp_path, 6))
    with pytest.raises(CheckpointError, match=f"no intact checkpoint.*checkpoint-6: {reason}"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(CheckpointError, match="checkpoint-6 is damaged"):
        resolve_resume(tmp_path, "checkpoint-6")


def test_a_kill_during_pruning_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if path.name.endswith(".pruning") and path.exists():
            (path / "trainer_state.json").unlink()  # part of the folder is gone ...
            raise KeyboardInterrupt  # ... when the process dies
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 6, total_limit=2)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert all(verify_checkpoint(p) is None for p in checkpoint_dirs(tmp_path))
    _save(tmp_path, 8, total_limit=2)  # the next save clears what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]


def test_a_full_disk_removes_the_partial_checkpoint_and_says_how_much_was_needed(tmp_path, monkeypatch):
    _save(tmp_path, 2)

    def disk_full(path, tensors, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_files, "write_tensors", disk_full)
    with pytest.raises(
        CheckpointDiskFull, match=r"no space left on device while writing checkpoint 4 .*about \d+ MB"
    ):
        _save(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert verify_checkpoint(tmp_path / "checkpoint-2") is None


def test_the_safetensors_writers_disk_full_error_is_recognised():
    from difftune.storage import is_disk_full

    text = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    assert is_disk_full(RuntimeError(text)) and is_disk_full(OSError(errno.ENOSPC, "full"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_config_loading_refuses_a_resume_path_outside_output_dir(tmp_path, monkeypatch):
    from difftune.config import ConfigError, load_config
    from tests.config.helpers import write_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets" / "checkpoint-1").mkdir(parents=True)
    settings = {
        "model_family": "sdxl",
        "output_dir": "out",
        "resume_from_checkpoint": "datasets/checkpoint-1",
    }
    with pytest.raises(
        ConfigError, match="'resume_from_checkpoint' is 'datasets/checkpoint-1'.*outside output_dir"
    ):
        load_config(write_config(tmp_path, settings))
    allowed = load_config(write_config(tmp_path, {**settings, "allow_resume_outside_output_dir": True}))
    assert allowed.train.allow_resume_outside_output_dir
    assert load_config(write_config(tmp_path, {**settings, "resume_from_checkpoint": "checkpoint-1"}))
