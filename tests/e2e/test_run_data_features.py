"""Loss masks, regularisation data, an eval dataset and per-epoch random crops together in one real run."""

import shutil

import pytest
from PIL import Image

from difftune.config import load_config
from difftune.events import read_events
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train


@pytest.mark.slow
def test_masks_regularisation_and_held_out_eval_in_one_run(tmp_path, tiny_sdxl, image_folder):
    masks, regularisation, held = tmp_path / "masks", tmp_path / "men", tmp_path / "held"
    masks.mkdir()
    for image in (p for p in image_folder.iterdir() if p.suffix in (".png", ".jpg")):
        with Image.open(image) as opened:
            mask = Image.new("RGB", opened.size, (255, 255, 255))
        mask.paste((0, 0, 0), (0, 0, mask.size[0] // 2, mask.size[1]))
        mask.save(masks / f"{image.stem}.png")
    shutil.copytree(image_folder, regularisation)
    shutil.copytree(image_folder, held)
    common = {
        "type": "local",
        "caption_strategy": "textfile",
        "resolution": 64,
        "resolution_type": "pixel_area",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
    }
    config = write_tiny_run(
        tmp_path,
        tiny_sdxl,
        image_folder,
        extra_backends=[
            {
                "id": "masks",
                "dataset_type": "conditioning",
                "conditioning_type": "mask",
                "instance_data_dir": str(masks),
            },
            {
                **common,
                "id": "men",
                "instance_data_dir": str(regularisation),
                "is_regularisation_data": True,
                "cache_dir_vae": str(tmp_path / "cache" / "men"),
            },
            {
                **common,
                "id": "held",
                "dataset_type": "eval",
                "instance_data_dir": str(held),
                "cache_dir_vae": str(tmp_path / "cache" / "held"),
            },
        ],
        dataset={"conditioning_data": "masks", "crop_style": "random"},  # new windows in the second epoch
        max_train_steps=12,  # 9 batches an epoch
        eval_steps_interval=2,
        num_eval_images=2,
        prior_loss_weight=0.5,
    )
    result = train(load_config(config))
    assert result.global_step == 12 and result.lora_path.exists()
    evals = read_events(tmp_path / "out" / "events.jsonl", "eval")
    assert [e["step"] for e in evals] == [2, 4, 6, 8, 10, 12] and all(e["eval_loss"] > 0 for e in evals)
