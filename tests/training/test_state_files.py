import random

import numpy as np
import pytest
import torch

from difftune.training.state_files import StateFileError, load_state, save_state


def test_nested_state_comes_back_with_its_types_and_values(tmp_path):
    base = torch.arange(6.0)
    state = {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": base[:3], "view": base[3:]}
        },  # int keys, shared memory
        "param_groups": [{"betas": (0.9, 0.999), "params": [0], "fused": None, "lr": 1e-4, "amsgrad": False}],
        "numpy": np.random.RandomState(5).get_state(),
        "python": random.Random(5).getstate(),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "__tensor__": "a key that looks like a marker",
        "inf": float("inf"),
    }
    names = save_state(tmp_path, "optimizer", state)
    assert names == ["optimizer.json", "optimizer.safetensors"]
    loaded = load_state(tmp_path, "optimizer")
    assert torch.equal(loaded["state"][0]["exp_avg"], base[:3]) and torch.equal(
        loaded["state"][0]["view"], base[3:]
    )
    assert loaded["state"][0]["step"].shape == () and loaded["state"][0]["step"].item() == 3.0
    assert loaded["param_groups"] == state["param_groups"] and isinstance(
        loaded["param_groups"][0]["betas"], tuple
    )
    assert loaded["bf16"].dtype == torch.bfloat16
    assert loaded["__tensor__"] == state["__tensor__"] and loaded["inf"] == float("inf")
    numpy_rng = np.random.RandomState()
    numpy_rng.set_state(loaded["numpy"])
    assert numpy_rng.rand() == np.random.RandomState(5).rand()
    python_rng = random.Random()
    python_rng.setstate(loaded["python"])
    assert python_rng.random() == random.Random(5).random()


def test_a_value_that_is_not_data_is_refused_at_save_with_its_place(tmp_path):
    with pytest.raises(TypeError, match=r"optimizer.param_groups\[0\].fn: a function"):
        save_state(tmp_path, "optimizer", {"param_groups": [{"fn": lambda: 0}]})


def test_damaged_state_files_raise_state_file_error_naming_the_file(tmp_path):
    save_state(tmp_path, "trainer_state", {"a": torch.zeros(2)})
    (tmp_path / "trainer_state.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(StateFileError, match="trainer_state.safetensors is damaged"):
        load_state(tmp_path, "trainer_state")
    (tmp_path / "trainer_state.json").write_text("[")
    with pytest.raises(StateFileError, match="trainer_state.json is not readable JSON"):
        load_state(tmp_path, "trainer_state")
    with pytest.raises(StateFileError, match="other.json is missing"):
        load_state(tmp_path, "other")
