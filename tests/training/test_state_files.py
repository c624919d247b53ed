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


def test_torchao_8bit_optimizer_state_resumes_exactly(tmp_path):
    import warnings

    from difftune.config.schema import TrainConfig
    from difftune.training.optim import build_optimizer

    pytest.importorskip("torchao.optim")
    config = TrainConfig(model_family="sdxl", optimizer="ao-adamw8bit", learning_rate=1e-2)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256)
        return model, build_optimizer(model.parameters(), config)

    def step(model, optimizer, seed):
        model(torch.randn(4, 256, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer = build()
        step(model, optimizer, 1)
        save_state(tmp_path, "optimizer", optimizer.state_dict())
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        step(model, optimizer, 2)

        resumed, resumed_optimizer = build()
        resumed.load_state_dict(weights)
        resumed_optimizer.load_state_dict(load_state(tmp_path, "optimizer"))
        assert type(resumed_optimizer.state_dict()["state"][0]["exp_avg"]).__name__ == "OptimState8bit"
        step(resumed, resumed_optimizer, 2)
    # torch.compile's note that torchao's state tensors have no stable hash: nothing a run can act on
    assert not [w for w in caught if "_stable_hash_for_caching" in str(w.message)]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_a_tensor_subclass_outside_the_known_ones_is_refused(tmp_path):
    class Custom(torch.Tensor):
        pass

    with pytest.raises(TypeError, match="Custom tensor cannot be stored"):
        save_state(tmp_path, "optimizer", {"x": torch.zeros(2).as_subclass(Custom)})
