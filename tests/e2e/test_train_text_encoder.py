"""train_text_encoder in a real SDXL run: the saved file loads both encoders' LoRA into the stock pipeline."""

import pytest
import torch
from safetensors.torch import load_file

from difftune.config import load_config
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train


def _hidden_states(pipeline, text: str) -> list[torch.Tensor]:
    outputs = []
    for tokenizer, encoder in (
        (pipeline.tokenizer, pipeline.text_encoder),
        (pipeline.tokenizer_2, pipeline.text_encoder_2),
    ):
        ids = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            outputs.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
    return outputs


@pytest.mark.slow
def test_text_encoder_lora_is_saved_in_the_diffusers_layout_and_loads_in_the_stock_pipeline(
    tmp_path, tiny_sdxl, image_folder
):
    from diffusers import StableDiffusionXLPipeline

    config = write_tiny_run(
        tmp_path, tiny_sdxl, image_folder, train_text_encoder=True, text_encoder_lr=1e-2, max_train_steps=3
    )
    result = train(load_config(config))
    keys = load_file(str(result.lora_path)).keys()
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any(k.startswith("text_encoder_2.") for k in keys)

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = _hidden_states(pipeline, "a red circle")
    pipeline.load_lora_weights(str(result.lora_path.parent))
    after = _hidden_states(pipeline, "a red circle")
    for base, adapted in zip(before, after):
        assert not torch.allclose(base, adapted, atol=1e-4)  # both encoders carry the trained LoRA


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_text_encoder_weights_of_an_uninterrupted_one(
    tmp_path, tiny_sdxl, image_folder
):
    common = dict(train_text_encoder=True, text_encoder_lr=1e-2, max_train_steps=4, checkpointing_steps=2)
    whole = train(load_config(write_tiny_run(tmp_path / "whole", tiny_sdxl, image_folder, **common)))
    split = write_tiny_run(tmp_path / "split", tiny_sdxl, image_folder, **common)
    train(load_config(split), stop_after_steps=2)
    resumed = train(load_config(split, {"resume_from_checkpoint": "latest"}))
    expected, got = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert expected.keys() == got.keys()
    for key in (k for k in expected if k.startswith("text_encoder")):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
