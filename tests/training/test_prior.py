"""Prior preservation: a regularisation batch trains toward the base model's own prediction."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from difftune.config import ConfigError, load_config
from difftune.config.schema import TrainConfig
from difftune.families import get_family
from difftune.families.base import Components
from difftune.training.features import TrainingFeatures
from difftune.training.prior import PriorPreservation
from difftune.training.setup import prepare_denoiser
from tests.config.helpers import IMAGES, TEXT, write_config


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    """The tiny SDXL folder and its UNet."""
    from diffusers import UNet2DConditionModel

    return tiny_sdxl, UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")


def _batch(regularisation):
    g = torch.Generator().manual_seed(4)
    sizes = torch.tensor([[64, 64], [64, 64]])
    return {
        "prompt_embeds": torch.randn(2, 77, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
        "original_sizes": sizes,
        "crop_coords": torch.zeros(2, 2, dtype=torch.long),
        "target_sizes": sizes,
        "regularisation": torch.tensor(regularisation),
    }


def _trained(sdxl, tmp_path, model_type, **settings):
    """The family and a copy of the UNet with an adapter whose weights are set at random (not neutral)."""
    folder, unet = sdxl
    lycoris = tmp_path / "lycoris.json"
    lycoris.write_text(
        json.dumps({"algo": "lokr", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1, "factor": 4})
    )
    config = TrainConfig(
        model_family="sdxl",
        model_type=model_type,
        pretrained_model_name_or_path=str(folder),
        lycoris_config=str(lycoris),
        gradient_checkpointing=False,
        lora_rank=4,
        **settings,
    )
    family = get_family(config)
    components = Components(copy.deepcopy(unet), None, [], [], None)
    denoiser = prepare_denoiser(family, components, config, torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in denoiser.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=g) * 0.05)
    return family, components, denoiser.eval()


@pytest.mark.parametrize("model_type", ["lora", "lycoris"])
def test_a_regularisation_batch_target_is_the_base_model_prediction(sdxl, tmp_path, model_type):
    family, components, denoiser = _trained(sdxl, tmp_path, model_type)
    base = Components(sdxl[1], None, [], [], None)
    g = torch.Generator().manual_seed(5)
    noisy, noise_target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([100, 800])
    batch = _batch([True, False])
    prior = PriorPreservation(family, components, denoiser, model_type, weight=0.5)

    target = prior.target(noisy, timesteps, batch, noise_target)

    with torch.no_grad():
        expected = family.model_forward(base, base.denoiser, noisy, timesteps, batch)
        trained = family.model_forward(components, denoiser, noisy, timesteps, batch)
    torch.testing.assert_close(target[0], expected[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(target[1], noise_target[1])  # a training row keeps its own target
    # the adapter is back on after the base prediction, and it does change the output
    assert not torch.allclose(trained[0], expected[0], atol=1e-3)
    assert prior.weights(batch, "cpu").tolist() == [0.5, 1.0]
    assert prior.weights(_batch([False, False]), "cpu") is None


def test_a_run_with_regularisation_data_gets_its_targets_and_weights_from_its_features(sdxl, tmp_path):
    family, components, denoiser = _trained(sdxl, tmp_path, "lora", prior_loss_weight=0.25)
    g = torch.Generator().manual_seed(5)
    noisy, noise_target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps, batch = torch.tensor([100, 800]), _batch([False, True])
    features = TrainingFeatures.build(family, components, None, family.config, None, "cpu", torch.Generator())
    features.attach(denoiser, SimpleNamespace(held_out_batches=[], regularisation_datasets={"men"}))

    target = features.target(noisy, timesteps, batch, noise_target)

    expected = PriorPreservation(family, components, denoiser, "lora", weight=0.25)
    torch.testing.assert_close(target, expected.target(noisy, timesteps, batch, noise_target))
    assert torch.equal(target[0], noise_target[0]) and not torch.equal(target[1], noise_target[1])
    assert features.sample_weights(batch, "cpu").tolist() == [1.0, 0.25]
    without = TrainingFeatures.build(family, components, None, family.config, None, "cpu", torch.Generator())
    without.attach(denoiser, SimpleNamespace(held_out_batches=[], regularisation_datasets=set()))
    assert without.target(noisy, timesteps, batch, noise_target) is noise_target
    assert without.sample_weights(batch, "cpu") is None


def test_regularisation_data_needs_an_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    regularisation = {**IMAGES, "id": "men", "is_regularization_data": True}
    path = write_config(
        tmp_path, {"model_family": "sdxl", "model_type": "full"}, [IMAGES, regularisation, TEXT]
    )
    with pytest.raises(ConfigError, match="full training has no adapter, so use model_type lora"):
        load_config(path)
    path = write_config(
        tmp_path, {"model_family": "sdxl", "model_type": "lora"}, [IMAGES, regularisation, TEXT]
    )
    assert [d.is_regularisation_data for d in load_config(path).datasets][:2] == [False, True]
