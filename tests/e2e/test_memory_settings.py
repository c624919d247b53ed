"""Memory settings go through `difftune train`'s path: quantised base, group offload."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftune.config import load_config
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train


@pytest.mark.parametrize(
    "settings",
    [
        {"base_model_precision": "int8-quanto"},
        {"base_model_precision": "int8-torchao"},
        {"enable_group_offload": True, "group_offload_type": "block_level"},
        {"gradient_checkpointing": True, "gradient_checkpointing_interval": 2},
    ],
    ids=["int8-quanto", "int8-torchao", "group-offload", "checkpointing-interval"],
)
def test_lora_trains_under_memory_settings(tmp_path, tiny_sdxl, image_folder, settings):
    config = write_tiny_run(
        tmp_path, tiny_sdxl, image_folder, max_train_steps=2, checkpointing_steps=0, **settings
    )
    result = train(load_config(config))
    assert result.global_step == 2
    weights = load_file(str(result.lora_path))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # the adapter learned


def test_quantised_full_training_is_refused_with_the_reason(tmp_path, tiny_sdxl, image_folder):
    config = write_tiny_run(
        tmp_path, tiny_sdxl, image_folder, model_type="full", base_model_precision="int8-quanto"
    )
    with pytest.raises(ValueError, match="no_change with model_type full"):
        train(load_config(config))


def test_a_fallback_warning_from_deep_inside_reaches_events_jsonl(
    tmp_path, tiny_sdxl, image_folder, monkeypatch
):
    from difftune.training import memory_quant

    monkeypatch.setattr(memory_quant, "_warned", set())  # warned once per process
    config = write_tiny_run(
        tmp_path,
        tiny_sdxl,
        image_folder,
        max_train_steps=1,
        checkpointing_steps=0,
        attention_mechanism="flash",
        mixed_precision="fp16",  # on the CPU: bf16, with a warning
    )
    loaded = load_config(config)
    train(loaded)
    events = [json.loads(line) for line in (Path(loaded.train.output_dir) / "events.jsonl").open()]
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert any("attention_mechanism 'flash'" in w and "keeping sdpa" in w for w in warnings), warnings
    if not torch.cuda.is_available():
        assert any("fp16 needs a GPU" in w for w in warnings), warnings
