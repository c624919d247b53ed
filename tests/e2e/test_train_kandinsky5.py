"""End to end: difftune trains the tiny Kandinsky 5 Image and Video models through the same path as a real run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftune.config import load_config
from difftune.events import read_events
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train
from difftune.training.state_files import load_state

K5_RUN = {
    "validation_resolution": "64x64",
    "validation_num_inference_steps": 2,
    "max_train_steps": 3,
    "checkpointing_steps": 0,
    "learning_rate": 1e-3,
}


@pytest.fixture(scope="session")
def tiny_k5_i2i(tiny_model) -> Path:
    return tiny_model("kandinsky5-image", i2i=True)


@pytest.fixture(scope="session")
def tiny_k5_i2v(tiny_model) -> Path:
    return tiny_model("kandinsky5-video", i2v=True)


def _lora_trained(path: Path) -> dict[str, torch.Tensor]:
    """The saved LoRA, checked to have transformer keys and up-projections moved off zero."""
    weights = load_file(str(path))
    assert weights and all(key.startswith("transformer.") for key in weights)
    ups = [value for key, value in weights.items() if "lora_B" in key]
    assert ups and any(value.abs().max() > 0 for value in ups)
    return weights


def test_t2i_lora_run_writes_a_lora_the_pipeline_loads_and_validation_images(
    tmp_path, tiny_k5_image, image_folder
):
    from diffusers import Kandinsky5T2IPipeline

    config = write_tiny_run(tmp_path, tiny_k5_image, image_folder, model_family="kandinsky5-image", **K5_RUN)
    result = train(load_config(config))
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    _lora_trained(result.lora_path)
    pipeline = Kandinsky5T2IPipeline.from_pretrained(tiny_k5_image)
    pipeline.load_lora_weights(str(result.lora_path.parent))
    assert any("lora" in name for name, _ in pipeline.transformer.named_parameters())
    assert [p.suffix for p in result.validation_paths] == [".png"] and result.validation_paths[0].exists()


def test_full_training_saves_a_transformer_that_diffusers_loads(tmp_path, tiny_k5_image, image_folder):
    from diffusers import Kandinsky5Transformer3DModel

    settings = {**K5_RUN, "max_train_steps": 2, "learning_rate": 1e-4, "validation_disable": True}
    config = write_tiny_run(
        tmp_path, tiny_k5_image, image_folder, model_family="kandinsky5-image", model_type="full", **settings
    )
    result = train(load_config(config))
    trained = Kandinsky5Transformer3DModel.from_pretrained(result.model_path)
    original = Kandinsky5Transformer3DModel.from_pretrained(tiny_k5_image, subfolder="transformer")
    changed = [
        name
        for (name, a), (_, b) in zip(trained.named_parameters(), original.named_parameters())
        if not torch.equal(a, b)
    ]
    assert len(changed) > 10


def test_i2i_lora_trains_on_pairs_with_a_conditioning_dataset(tmp_path, tiny_k5_i2i, image_folder):
    from difftune.testing.images import make_image_dataset

    sources = tmp_path / "sources"
    made = make_image_dataset(sources, n=6, seed=5)
    made[-1].unlink()  # one target without a source: skipped and reported
    config = write_tiny_run(
        tmp_path,
        tiny_k5_i2i,
        image_folder,
        conditioning_dir=sources,
        model_family="kandinsky5-image",
        model_flavour="i2i-lite-sft",
        **K5_RUN,
    )
    result = train(load_config(config))
    assert result.global_step == 3
    _lora_trained(result.lora_path)
    # validation runs the I2I pipeline on the first conditioning image
    assert result.validation_paths and all(p.suffix == ".png" and p.exists() for p in result.validation_paths)
    skipped = read_events(tmp_path / "out" / "events.jsonl", "skipped")
    assert [Path(e["path"]).stem for e in skipped] == [made[-1].stem]
    assert "no conditioning image" in skipped[0]["reason"]
    assert len(list((tmp_path / "cache" / "conditioning").glob("*.safetensors"))) == 5


def test_i2i_without_a_conditioning_dataset_is_a_clear_error(tmp_path, tiny_k5_i2i, image_folder):
    config = write_tiny_run(
        tmp_path,
        tiny_k5_i2i,
        image_folder,
        model_family="kandinsky5-image",
        model_flavour="i2i-lite-sft",
        validation_disable=True,
        **K5_RUN,
    )
    backends = config.parent / "multidatabackend.json"  # as if the user left the sources out
    written = json.loads(backends.read_text())
    for entry in written:
        entry.pop("conditioning_data", None)
    backends.write_text(json.dumps([e for e in written if e.get("dataset_type") != "conditioning"]))
    with pytest.raises(ValueError, match='"dataset_type": "conditioning"'):
        train(load_config(config))


def test_tread_routing_trains_kandinsky5_image(tmp_path, tiny_k5_image, image_folder):
    routes = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}]}
    config = write_tiny_run(
        tmp_path,
        tiny_k5_image,
        image_folder,
        model_family="kandinsky5-image",
        tread_config=routes,
        validation_disable=True,
        **K5_RUN,
    )
    result = train(load_config(config))
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    _lora_trained(result.lora_path)


def test_t2v_lora_trains_on_synthetic_videos_and_writes_a_validation_video(
    tmp_path, tiny_k5_video, video_folder
):
    config = write_tiny_run(
        tmp_path,
        tiny_k5_video,
        video_folder,
        model_family="kandinsky5-video",
        **K5_RUN,
    )
    result = train(load_config(config))
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    _lora_trained(result.lora_path)
    assert [p.suffix for p in result.validation_paths] == [".mp4"] and result.validation_paths[
        0
    ].stat().st_size > 0
    # latents of 5-frame clips at 64x64: (16, 2, 8, 8), one file per video
    latent_files = list((tmp_path / "cache" / "vae").glob("*.safetensors"))
    assert len(latent_files) == 4
    assert load_file(str(latent_files[0]))["latents"].shape == (16, 2, 8, 8)
    log = [e for e in read_events(tmp_path / "out" / "events.jsonl", "log") if e.get("dataset") == "images"]
    assert log and log[0]["samples"] == 4


def test_i2v_lora_trains_with_first_frame_conditioning(tmp_path, tiny_k5_i2v, video_folder):
    config = write_tiny_run(
        tmp_path,
        tiny_k5_i2v,
        video_folder,
        model_family="kandinsky5-video",
        model_flavour="i2v-lite-5s",
        validation_disable=True,
        **K5_RUN,
    )
    result = train(load_config(config))
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    _lora_trained(result.lora_path)
    # clip latents and first-frame latents, one each per video
    latents = [load_file(str(p))["latents"] for p in (tmp_path / "cache" / "vae").glob("*.safetensors")]
    assert sorted(tuple(t.shape) for t in latents) == [(16, 1, 8, 8)] * 4 + [(16, 2, 8, 8)] * 4
    resolved = json.loads((tmp_path / "out" / "config.resolved.json").read_text())
    assert "i2v" in json.dumps(resolved)


def _tiny_dino(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    Dinov2Model(config).save_pretrained(folder)
    return folder


def test_t2v_with_crepa_trains_its_projector_through_the_run(tmp_path, tiny_k5_video, video_folder):
    dino = _tiny_dino(tmp_path / "dinov2-tiny")
    settings = {**K5_RUN, "checkpointing_steps": 3}
    config = write_tiny_run(
        tmp_path,
        tiny_k5_video,
        video_folder,
        model_family="kandinsky5-video",
        validation_disable=True,
        crepa_enabled=True,
        crepa_block_index=1,
        crepa_model=str(dino),
        crepa_encoder_image_size=56,
        **settings,
    )
    result = train(load_config(config))
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    plain_config = write_tiny_run(
        tmp_path / "plain",
        tiny_k5_video,
        video_folder,
        model_family="kandinsky5-video",
        validation_disable=True,
        **settings,
    )
    plain = train(load_config(plain_config))
    # the same seed and batches: only CREPA's term (-crepa_lambda * alignment) makes the losses differ
    assert plain.losses != pytest.approx(result.losses, abs=1e-7)
    saved = load_state(tmp_path / "out" / "checkpoint-3", "trainer_state")
    projector = saved["extra"]["crepa"]
    assert projector and any(torch.is_tensor(v) and v.abs().sum() > 0 for v in _tensors(projector))


@pytest.mark.slow
def test_t2v_with_crepa_resumed_ends_with_the_weights_and_losses_of_an_uninterrupted_run(
    tmp_path, tiny_k5_video, video_folder
):
    settings = dict(
        K5_RUN,
        model_family="kandinsky5-video",
        validation_disable=True,
        checkpointing_steps=2,
        crepa_enabled=True,
        crepa_block_index=1,
        crepa_model=str(_tiny_dino(tmp_path / "dinov2-tiny")),
        crepa_encoder_image_size=56,
    )
    whole = train(load_config(write_tiny_run(tmp_path / "whole", tiny_k5_video, video_folder, **settings)))
    split = write_tiny_run(tmp_path / "split", tiny_k5_video, video_folder, **settings)
    assert train(load_config(split), stop_after_steps=2).interrupted
    resumed = train(load_config(split, {"resume_from_checkpoint": "latest"}))
    assert resumed.global_step == whole.global_step == 3
    # CREPA's term is in the loss: with a fresh projector or fresh Adam moments the last step would differ
    assert whole.losses[2:] == pytest.approx(resumed.losses, abs=1e-6)
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def _tensors(state):
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
