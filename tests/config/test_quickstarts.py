"""The config examples of the quickstart guides (seeds 000, 002, 004), copied verbatim, load unchanged.

Fragments that the guides show on their own (offload, quantisation, TREAD, previews) are merged into
the guide's base settings, the way a user adds them to config.json.
"""

import json

import pytest

from difftune.config import load_config, parse_cli_overrides
from tests.config.helpers import write_config

# -- 000: Kandinsky 5.0 Image ---------------------------------------------------------------------
K5_IMAGE_BASE = {  # "Você precisará modificar as seguintes variáveis"
    "model_type": "lora",
    "model_family": "kandinsky5-image",
    "model_flavour": "t2i-lite-sft",
    "output_dir": "output/k5",
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "validation_resolution": "1024x1024",
    "validation_guidance": 5.0,
    "flow_schedule_shift": 1.0,
    "offload_during_startup": True,
}
K5_IMAGE_FRAGMENTS = [
    """{
  "enable_group_offload": true,
  "group_offload_type": "block_level",
  "group_offload_blocks_per_group": 1,
  "group_offload_use_stream": true
}""",
    """{
  "user_prompt_library": "config/user_prompt_library.json"
}""",
    """{
  "base_model_precision": "int8-quanto",
  "text_encoder_1_precision": "no_change",
  "text_encoder_2_precision": "no_change",
  "lora_rank": 16,
  "base_model_default_dtype": "bf16"
}""",  # shown without its braces in the guide
    """{
  "tread_config": {
    "routes": [
      {
        "selection_ratio": 0.5,
        "start_layer_idx": 2,
        "end_layer_idx": -2
      }
    ]
  }
}""",
]
K5_IMAGE_DATASETS = """[
  {
    "id": "my-image-dataset",
    "type": "local",
    "dataset_type": "image",
    "instance_data_dir": "datasets/my_images",
    "caption_strategy": "textfile",
    "resolution": 1024,
    "crop": true,
    "crop_aspect": "square",
    "repeats": 10
  },
  {
    "id": "text-embeds",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": true,
    "cache_dir": "cache/text/kandinsky5",
    "disabled": false
  }
]"""

# -- 002: Kandinsky 5.0 Video ---------------------------------------------------------------------
K5_VIDEO_BASE = {  # "Configurações-chave para Kandinsky 5 Video"
    "model_type": "lora",
    "model_family": "kandinsky5-video",
    "model_flavour": "t2v-lite-sft-5s",
    "train_batch_size": 1,
    "validation_resolution": "512x768",
    "validation_num_video_frames": 61,
    "validation_guidance": 5.0,
    "frame_rate": 24,
    "offload_during_startup": True,
}
K5_VIDEO_FLAVOURS = [
    "t2v-lite-sft-5s",
    "t2v-lite-sft-10s",
    "t2v-pro-sft-5s-hd",
    "t2v-pro-sft-10s-hd",
    "i2v-lite-5s",
    "i2v-pro-sft-5s",
    "t2v-lite-pretrain-5s",
    "t2v-lite-pretrain-10s",
    "t2v-pro-pretrain-5s-hd",
    "t2v-pro-pretrain-10s-hd",
]
K5_VIDEO_FRAGMENTS = [K5_IMAGE_FRAGMENTS[0], K5_IMAGE_FRAGMENTS[3]]  # the same offload and TREAD blocks
K5_VIDEO_DATASETS = """[
  {
    "id": "my-video-dataset",
    "type": "local",
    "dataset_type": "video",
    "instance_data_dir": "datasets/videos",
    "caption_strategy": "textfile",
    "resolution": 512,
    "video": {
        "num_frames": 61,
        "min_frames": 61,
        "frame_rate": 24,
        "bucket_strategy": "aspect_ratio"
    },
    "repeats": 10
  },
  {
    "id": "text-embeds",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": true,
    "cache_dir": "cache/text/kandinsky5",
    "disabled": false
  }
]"""

# -- 004: Stable Diffusion XL ---------------------------------------------------------------------
SDXL_CONFIG = """{
  "model_type": "lora",
  "model_family": "sdxl",
  "model_flavour": "base-1.0",
  "output_dir": "/home/user/output/models",
  "validation_resolution": "1024x1024,1280x768",
  "validation_guidance": 3.4,
  "use_gradient_checkpointing": true,
  "learning_rate": 1e-4
}"""
SDXL_FRAGMENTS = [
    """{
  "base_model_precision": "int8-quanto",
  "text_encoder_1_precision": "no_change",
  "text_encoder_2_precision": "no_change",
  "optimizer": "optimi-lion"
}""",
    """{
  "validation_preview": true,
  "validation_preview_steps": 1
}""",
    '{"use_dora": true, "mixed_precision": "no", "attention_mechanism": "xformers"}',  # listed as key: value
]
SDXL_DATASETS = """[
  {
    "id": "pseudo-camera-10k-sdxl",
    "type": "local",
    "crop": true,
    "crop_aspect": "square",
    "crop_style": "random",
    "resolution": 1.0,
    "minimum_image_size": 0.25,
    "maximum_image_size": 1.0,
    "target_downsample_size": 1.0,
    "resolution_type": "area",
    "cache_dir_vae": "cache/vae/sdxl/pseudo-camera-10k",
    "instance_data_dir": "/home/user/simpletuner/datasets/pseudo-camera-10k",
    "disabled": false,
    "skip_file_discovery": "",
    "caption_strategy": "filename",
    "metadata_backend": "discovery"
  },
  {
    "id": "text-embeds",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": true,
    "cache_dir": "cache/text/sdxl/pseudo-camera-10k",
    "disabled": false,
    "write_batch_size": 128
  }
]"""


def _merged(base, fragments) -> dict:
    config = dict(base)
    for fragment in fragments:
        config.update(json.loads(fragment))
    return config


def test_kandinsky5_image_quickstart(workdir):
    loaded = load_config(write_config(workdir, _merged(K5_IMAGE_BASE, K5_IMAGE_FRAGMENTS), K5_IMAGE_DATASETS))
    train = loaded.train
    # the guide's lowest-VRAM recipe: optimum-quanto weights cannot follow group offload, so the same
    # width trains through torchao, and the run says so
    (warning,) = loaded.warnings
    assert "'int8-quanto' with 'enable_group_offload'" in warning and "int8-torchao" in warning
    assert (train.model_family, train.model_flavour) == ("kandinsky5-image", "t2i-lite-sft")
    assert train.enable_group_offload and train.group_offload_use_stream
    assert train.base_model_precision == "int8-torchao"
    assert train.user_prompt_library == "config/user_prompt_library.json"
    assert train.tread_config["routes"][0]["end_layer_idx"] == -2
    assert [d.id for d in loaded.datasets] == ["my-image-dataset", "text-embeds"]
    assert (
        loaded.datasets[0].repeats == 10 and loaded.text_embeds_dataset.cache_dir == "cache/text/kandinsky5"
    )


@pytest.mark.parametrize("fragment", K5_IMAGE_FRAGMENTS)
def test_kandinsky5_image_fragments_alone(workdir, fragment):
    config = {"model_family": "kandinsky5-image", **json.loads(fragment)}
    train = load_config(write_config(workdir, config, K5_IMAGE_DATASETS)).train
    assert train.validation_guidance == 5.0 and train.flow_schedule_shift == 1.0


@pytest.mark.parametrize("flavour", K5_VIDEO_FLAVOURS)
def test_kandinsky5_video_quickstart(workdir, flavour):
    config = {**_merged(K5_VIDEO_BASE, K5_VIDEO_FRAGMENTS), "model_flavour": flavour}
    path = write_config(workdir, config, K5_VIDEO_DATASETS)
    # the guide's OOM advice, given on the command line
    loaded = load_config(
        path, parse_cli_overrides(["--vae_enable_patch_conv=true", "--enable_group_offload"])
    )
    train = loaded.train
    (warning,) = loaded.warnings  # validation settings without a prompt, as in the guide
    assert "validation_num_video_frames" in warning and "no samples will be made" in warning
    assert train.model_flavour == flavour and train.framerate == 24
    assert train.vae_enable_patch_conv is True
    assert train.validation_num_video_frames == 61
    video = loaded.datasets[0].video
    assert (video.num_frames, video.min_frames, video.frame_rate, video.bucket_strategy) == (
        61,
        61,
        24,
        "aspect_ratio",
    )


@pytest.mark.parametrize("frames", [61, 49, 33])
def test_kandinsky5_video_frame_counts_from_the_guide(workdir, frames):
    config = {**K5_VIDEO_BASE, "validation_num_video_frames": frames}
    assert (
        load_config(write_config(workdir, config, K5_VIDEO_DATASETS)).train.validation_num_video_frames
        == frames
    )


def test_sdxl_quickstart(workdir):
    config = _merged(json.loads(SDXL_CONFIG), SDXL_FRAGMENTS)
    loaded = load_config(write_config(workdir, config, SDXL_DATASETS))
    train = loaded.train
    # the guide sets validation sizes and guidance but no prompt: the run says no samples will be made
    (warning,) = loaded.warnings
    assert "validation_resolution, validation_guidance" in warning and "no samples will be made" in warning
    assert train.validation_sizes == [(1024, 1024), (1280, 768)]
    assert train.validation_guidance == 3.4 and train.gradient_checkpointing is True
    assert train.optimizer == "optimi-lion" and train.validation_preview is True
    dataset = loaded.datasets[0]
    assert (dataset.resolution_type, dataset.resolution, dataset.minimum_image_size) == ("area", 1.0, 0.25)
    assert loaded.text_embeds_dataset.write_batch_size == 128


def test_sdxl_quickstart_config_as_written(workdir):
    loaded = load_config(write_config(workdir, SDXL_CONFIG, SDXL_DATASETS))
    assert loaded.train.learning_rate == pytest.approx(1e-4)
    assert loaded.train.output_dir == "/home/user/output/models"
