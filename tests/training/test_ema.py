import pytest
import torch

from difftune.training.ema import EMAModel


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen base: not averaged
    return model


def test_only_trainable_parameters_are_tracked():
    ema = EMAModel(_model())
    assert sorted(ema.shadow) == ["1.bias", "1.weight"]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ema.shadow.values())


def test_update_follows_the_ema_formula():
    model = _model()
    start = model[1].weight.detach().clone()
    ema = EMAModel(model, decay=0.9)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * start + 0.1 * (start + 1.0)
    torch.testing.assert_close(ema.shadow["1.weight"], expected)
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["1.weight"], 0.9 * expected + 0.1 * 2.0)
    assert ema.num_updates == 2


def test_copy_to_and_averaged_context_restore_the_trained_weights():
    model = _model()
    ema = EMAModel(model, decay=0.5)
    with torch.no_grad():
        model[1].weight.fill_(4.0)
    ema.update(model)
    trained = model[1].weight.detach().clone()
    frozen = model[0].weight.detach().clone()
    with ema.averaged(model) as swapped:
        torch.testing.assert_close(swapped[1].weight, ema.shadow["1.weight"])
        assert not torch.equal(swapped[1].weight, trained)
    torch.testing.assert_close(model[1].weight, trained)
    torch.testing.assert_close(model[0].weight, frozen)
    ema.copy_to(model)
    torch.testing.assert_close(model[1].weight, ema.shadow["1.weight"])


def test_state_dict_round_trip():
    model = _model()
    ema = EMAModel(model, decay=0.8)
    with torch.no_grad():
        model[1].bias.fill_(3.0)
    ema.update(model)
    state = ema.state_dict()
    restored = EMAModel(_model(), decay=0.1)
    restored.load_state_dict(state)
    assert restored.decay == 0.8 and restored.num_updates == 1
    torch.testing.assert_close(restored.shadow["1.bias"], ema.shadow["1.bias"])
    with pytest.raises(KeyError, match="unexpected"):
        restored.load_state_dict({**state, "shadow": {**state["shadow"], "2.weight": torch.zeros(1)}})


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="ema_decay must be in"):
        EMAModel(_model(), decay=1.0)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        EMAModel(frozen)
    assert EMAModel(_model(), device="accelerator").device.type == "cpu"
