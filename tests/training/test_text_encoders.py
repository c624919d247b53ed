"""train_text_encoder: LoRA on both SDXL text encoders, trained with gradients from the step's captions."""

import pytest
import torch

from difftune.config import ConfigError
from difftune.config.schema import TrainConfig
from difftune.families import get_family
from difftune.training.features import TrainingFeatures
from difftune.training.text_encoders import TextEncoderTraining, check_text_encoder_training


def test_captions_are_encoded_with_gradients_into_the_encoders_lora_at_their_own_lr(tiny_sdxl):
    config = TrainConfig(
        model_family="sdxl",
        model_type="lora",
        pretrained_model_name_or_path=str(tiny_sdxl),
        train_text_encoder=True,
        learning_rate=1e-4,
        text_encoder_lr=5e-5,
        lora_rank=4,
    )
    family = get_family(config)
    components = family.load(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        frozen = family.collate_prompts(family.encode_prompts(components, ["a red circle", ""]))
    training = TextEncoderTraining(family, components, config)
    parameters = training.parameters()
    assert parameters and all(p.dtype == torch.float32 for p in parameters)
    assert {id(p) for p in parameters} == {
        id(p) for e in components.text_encoders for p in e.parameters() if p.requires_grad
    }

    batch = training.encode({"captions": ["a red circle", ""], "prompt_embeds": None})
    # a fresh LoRA starts as the base encoders (B = 0), so the encoding equals the cached one
    torch.testing.assert_close(batch["prompt_embeds"], frozen["prompt_embeds"])
    (batch["prompt_embeds"].square().mean() + batch["pooled_prompt_embeds"].square().mean()).backward()
    for encoder in components.text_encoders:  # gradients reach each encoder's LoRA (the layers below
        grads = [p.grad for n, p in encoder.named_parameters() if "lora_B" in n]  # the penultimate one)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    training.add_to(optimizer, lr_scale=1.0)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 5e-5]
    layers = training.layers()
    assert len(layers) == 2 and all(any("lora_A" in k for k in layer) for layer in layers)


def test_the_text_encoders_lora_is_a_feature_whose_checkpoint_state_keeps_its_key(tiny_sdxl):
    config = TrainConfig(
        model_family="sdxl",
        model_type="lora",
        pretrained_model_name_or_path=str(tiny_sdxl),
        train_text_encoder=True,
        lora_rank=4,
    )
    family = get_family(config)

    def features() -> TrainingFeatures:
        components = family.load(torch.device("cpu"), torch.float32)
        return TrainingFeatures.build(family, components, None, config, None, "cpu", torch.Generator())

    trained = features()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in trained.text_encoders.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=g))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    trained.add_parameter_groups(optimizer, lr_scale=2.0)
    assert optimizer.param_groups[1]["lr"] == 2.0 * config.learning_rate
    state = trained.state_dict()
    assert list(state) == ["text_encoder_lora"]  # the key checkpoints of earlier runs hold

    resumed = features()
    resumed.load_state_dict(state)
    for before, after in zip(trained.text_encoders.layers(), resumed.text_encoders.layers()):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    batch = resumed.encode_batch({"captions": ["a red circle"], "prompt_embeds": None})
    assert batch["prompt_embeds"].requires_grad


def test_train_text_encoder_is_refused_where_it_is_not_built():
    for settings, message in (
        ({"model_family": "kandinsky5-image"}, "keeps its text encoders frozen"),
        ({"model_family": "sdxl", "model_type": "lycoris"}, "use model_type lora"),
        ({"model_family": "sdxl", "model_type": "full"}, "use model_type lora"),
    ):
        config = TrainConfig(train_text_encoder=True, **{"model_type": "lora", **settings})
        with pytest.raises(ConfigError, match=message):
            check_text_encoder_training(get_family(config), config)
