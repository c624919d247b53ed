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


def test_update_follows_the_ema_formula_with_its_warm_up():
    model = _model()
    start = model[1].weight.detach().clone()
    ema = EMAModel(model, decay=0.9)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    assert ema.current_decay() == pytest.approx(1 / 10)  # min(0.9, (1 + 0) / (10 + 0))
    ema.update(model)
    expected = 0.1 * start + 0.9 * (start + 1.0)
    torch.testing.assert_close(ema.shadow["1.weight"], expected)
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    ema.update(model)  # d = 2 / 11
    torch.testing.assert_close(ema.shadow["1.weight"], 2 / 11 * expected + 9 / 11 * 2.0)
    assert ema.num_updates == 2
    ema.num_updates = 1000  # (1 + n) / (10 + n) > 0.9: the configured decay from then on
    assert ema.current_decay() == 0.9


def test_warm_up_forgets_the_untrained_start():
    """With a constant 0.995, 0.995 ** 200 = 37 % of the start would remain after 200 updates."""
    model = _model()
    with torch.no_grad():
        model[1].weight.zero_()
    ema = EMAModel(model, decay=0.995)
    with torch.no_grad():
        model[1].weight.fill_(1.0)
    for _ in range(200):
        ema.update(model)
    share_of_start = 1.0 - ema.shadow["1.weight"]
    assert share_of_start.abs().max() < 1e-6


def _features(**settings):
    from difftune.config.schema import TrainConfig
    from difftune.training.features import TrainingFeatures

    model = _model()
    config = TrainConfig(model_family="sdxl", use_ema=True, **settings)
    return model, TrainingFeatures(config=config, family=None, ema=EMAModel(model, config.ema_decay))


def test_ema_update_interval_updates_every_nth_optimizer_step():
    model, features = _features(ema_update_interval=3)
    for step in range(1, 8):
        features.after_optimizer_step(model, step)
    assert features.ema.num_updates == 2  # steps 3 and 6
    model, features = _features()
    for step in range(1, 8):
        features.after_optimizer_step(model, step)
    assert features.ema.num_updates == 7


@pytest.mark.parametrize(
    ("mode", "passes"),
    [
        ("none", [("", "trained")]),
        ("ema_only", [("", "ema")]),
        ("comparison", [("", "trained"), ("-ema", "ema")]),
    ],
)
def test_ema_validation_chooses_the_weights_of_each_validation_pass(mode, passes):
    model, features = _features(ema_validation=mode, ema_decay=0.5)
    with torch.no_grad():
        model[1].weight.fill_(4.0)
    features.ema.update(model)
    trained = model[1].weight.detach().clone()
    seen = []
    for suffix, weights in features.validation_weights(model):
        with weights:
            same = torch.equal(model[1].weight, trained)
            seen.append((suffix, "trained" if same else "ema"))
            if not same:
                torch.testing.assert_close(model[1].weight, features.ema.shadow["1.weight"])
    assert seen == passes
    torch.testing.assert_close(model[1].weight, trained)


def test_ema_settings_are_checked_when_the_config_loads():
    from pydantic import ValidationError

    from difftune.config.schema import TrainConfig

    assert TrainConfig(model_family="sdxl").ema_validation == "comparison"  # the original tool's default
    with pytest.raises(ValidationError, match="ema_validation"):
        TrainConfig(model_family="sdxl", ema_validation="both")
    with pytest.raises(ValidationError, match="ema_update_interval"):
        TrainConfig(model_family="sdxl", ema_update_interval=0)


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
