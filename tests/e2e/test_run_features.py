"""EMA, eval loss and webhooks switched on through config.json in a real run."""

import pytest
from PIL import Image
from safetensors.torch import load_file

from difftune.config import load_config
from difftune.events import read_events
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train

from ..test_webhooks import Receiver


def test_ema_eval_loss_and_webhooks_in_one_run(tmp_path, tiny_sdxl, image_folder):
    receiver = Receiver()
    try:
        config = write_tiny_run(
            tmp_path,
            tiny_sdxl,
            image_folder,
            max_train_steps=4,
            checkpointing_steps=2,
            validation_steps=2,
            use_ema=True,
            ema_decay=0.5,
            eval_steps_interval=2,
            eval_batches=1,
            webhook_config={"webhook_url": receiver.url, "webhook_type": "raw"},
            webhook_reporting_interval=2,
        )
        result = train(load_config(config))
    finally:
        receiver.stop()
    out = tmp_path / "out"
    evals = read_events(out / "events.jsonl", "eval")
    assert [e["step"] for e in evals] == [2, 4] and all(e["eval_loss"] > 0 for e in evals)
    assert (out / "eval_loss.png").exists()

    ema = load_file(str(out / "ema" / "pytorch_lora_weights.safetensors"))
    final = load_file(str(result.lora_path))
    assert ema.keys() == final.keys()
    assert any(not ema[k].equal(final[k]) for k in ema)  # the average differs from the last weights
    # ema_validation "comparison" (the default): every validation image also with the averaged weights
    images = sorted(p.name for p in (out / "validation" / "2").glob("*.png"))
    trained = [name for name in images if not name.endswith("-ema.png")]
    assert trained and images == sorted(trained + [name.replace(".png", "-ema.png") for name in trained])

    kinds = [body.get("message_type") for body in receiver.json_bodies()]
    assert "finished" in kinds and "validation" in kinds


@pytest.mark.parametrize("family", ["sdxl", "kandinsky5-image"])
def test_validation_previews_decode_intermediate_latents(tmp_path, tiny_model, image_folder, family):
    config = write_tiny_run(
        tmp_path,
        tiny_model(family),
        image_folder,
        model_family=family,
        max_train_steps=1,
        checkpointing_steps=0,
        validation_preview=True,
        validation_preview_steps=1,
        validation_num_inference_steps=3,
    )
    train(load_config(config))
    previews = read_events(tmp_path / "out" / "events.jsonl", "validation_preview")
    assert [e["preview_index"] for e in previews] == [1, 2, 3]
    for event in previews:
        with Image.open(event["path"]) as image:
            assert image.size == (64, 64)


@pytest.mark.slow
def test_loss_type_timestep_bias_and_input_perturbation_reach_the_training_step(
    tmp_path, tiny_sdxl, image_folder, monkeypatch
):
    def first_loss(name, **settings):
        config = write_tiny_run(
            tmp_path / name, tiny_sdxl, image_folder, max_train_steps=1, validation_disable=True, **settings
        )
        return train(load_config(config)).losses[0]

    from difftune.families.sdxl import SDXLFamily

    drawn: list[float] = []
    model_forward = SDXLFamily.model_forward

    def recording(self, components, denoiser, noisy, timesteps, batch):
        drawn.extend(timesteps.tolist())
        return model_forward(self, components, denoiser, noisy, timesteps, batch)

    monkeypatch.setattr(SDXLFamily, "model_forward", recording)

    plain = first_loss("plain")
    assert first_loss("again") == pytest.approx(plain, rel=1e-5)
    assert first_loss("huber", loss_type="huber", huber_schedule="constant") != pytest.approx(plain, rel=1e-3)
    assert first_loss("perturbed", input_perturbation=0.5) != pytest.approx(plain, rel=1e-3)
    # a tiny random UNet's loss hardly depends on the timestep, so the bias is checked where it acts:
    # the timesteps the denoiser is called with move to the last quarter of the schedule
    # (a batch of 6: without the bias a quarter of the draws land there, with it 94 %)
    drawn.clear()
    first_loss("bias", timestep_bias_strategy="later", timestep_bias_multiplier=50.0, train_batch_size=6)
    assert len(drawn) == 6 and sum(t >= 750 for t in drawn) >= 5


@pytest.mark.slow
def test_a_schedule_free_run_validates_and_saves_its_averaged_weights(tmp_path, tiny_sdxl, image_folder):
    config = write_tiny_run(
        tmp_path,
        tiny_sdxl,
        image_folder,
        max_train_steps=2,
        validation_steps=1,
        optimizer="adamw_schedulefree",
    )
    result = train(load_config(config))
    assert result.lora_path.exists() and len(result.validation_paths) >= 2
