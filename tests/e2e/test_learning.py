"""Training learns what the data shows: the stock pipeline, sampled with the saved LoRA, moves toward
the training set's colour, and a set of another colour moves it the other way.

Samples are compared in latent space (the pipelines' output_type="latent") with the mean cached
latent of each dataset, so the check does not depend on the VAE decoder; a wrong target sign,
timestep scale or noise convention between training and sampling fails it. It needs latents that
depend on colour: the tiny VAEs are built to reproduce colours (difftune.testing.vae).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftune.config import load_config
from difftune.testing.images import make_solid_colour_dataset
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train

PROMPT = "a plain picture"
COLOURS = {"red": (230, 30, 30), "blue": (30, 60, 230)}
VIDEO_FRAMES = 5  # two latent frames
RUN = {
    "validation_disable": True,
    "max_train_steps": 40,
    "checkpointing_steps": 0,
    "learning_rate": 3e-3,
    "lora_rank": 8,
    "train_batch_size": 2,
}


def _train_on(tmp_path: Path, model_dir: Path, family: str, colour: str) -> tuple[Path, torch.Tensor]:
    """Train a LoRA on solid `colour`; returns the LoRA's folder and the dataset's mean latent per channel."""
    frames = VIDEO_FRAMES if family == "kandinsky5-video" else None
    folder = tmp_path / colour / "data"
    make_solid_colour_dataset(folder, COLOURS[colour], n=2, caption=PROMPT, frames=frames)
    dataset = {"repeats": 3}
    if frames:
        dataset.update(
            dataset_type="video", video={"num_frames": frames, "min_frames": frames, "frame_rate": 8}
        )
    workdir = tmp_path / colour
    config = write_tiny_run(workdir, model_dir, folder, model_family=family, dataset=dataset, **RUN)
    result = train(load_config(config))
    cached = [
        load_file(str(path))["latents"].float() for path in (workdir / "cache" / "vae").rglob("*.safetensors")
    ]
    assert cached, "no cached latents"
    channel_means = torch.stack([latent.flatten(1).mean(1) for latent in cached]).mean(0)  # (C,)
    return result.lora_path.parent, channel_means


def _sample(family: str, model_dir: Path, lora_dir: Path | None) -> torch.Tensor:
    """The stock pipeline's latent at seed 0, without guidance; returns its mean per channel (C,)."""
    import diffusers

    pipeline_class = {
        "sdxl": diffusers.StableDiffusionXLPipeline,
        "kandinsky5-image": diffusers.Kandinsky5T2IPipeline,
        "kandinsky5-video": diffusers.Kandinsky5T2VPipeline,
    }[family]
    pipeline = pipeline_class.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipeline.load_lora_weights(str(lora_dir))
    kwargs = dict(
        prompt=PROMPT, height=64, width=64, num_inference_steps=12, guidance_scale=1.0, output_type="latent"
    )
    if family == "kandinsky5-image":
        pipeline.resolutions = [*pipeline.resolutions, (64, 64)]
    if family == "kandinsky5-video":
        kwargs["num_frames"] = VIDEO_FRAMES
    with torch.no_grad():
        output = pipeline(generator=torch.Generator().manual_seed(0), **kwargs)
    if family == "sdxl":
        return output.images[0].flatten(1).mean(1)  # (C, h, w)
    latents = output.image if family == "kandinsky5-image" else output.frames
    return latents[0].reshape(-1, latents.shape[-1]).mean(0)  # channels-last (T, h, w, C)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, model",
    [("sdxl", "tiny_sdxl"), ("kandinsky5-image", "tiny_k5_image"), ("kandinsky5-video", "tiny_k5_video")],
)
def test_a_lora_moves_the_stock_pipeline_toward_its_training_colour(tmp_path, request, family, model):
    model_dir = request.getfixturevalue(model)
    red_lora, red = _train_on(tmp_path, model_dir, family, "red")
    blue_lora, blue = _train_on(tmp_path, model_dir, family, "blue")
    base = _sample(family, model_dir, None)
    with_red, with_blue = _sample(family, model_dir, red_lora), _sample(family, model_dir, blue_lora)
    assert (with_red - red).norm() < (base - red).norm()
    assert (with_blue - blue).norm() < (base - blue).norm()
    # the two adapters pull the same sample apart, each toward its own colour
    assert (with_red - red).norm() < (with_blue - red).norm()
    assert (with_blue - blue).norm() < (with_red - blue).norm()
