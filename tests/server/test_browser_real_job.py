"""The web UI drives a real `difftune train` job on a tiny model, from the config form to the gallery."""

import json

import pytest

from .test_browser import CHROMIUM, CHROMIUM_ARGS, pytestmark, server  # noqa: F401  (fixture, skip rule)


@pytest.fixture()
def train_command():
    from difftune.server.app import default_train_command

    return default_train_command


@pytest.fixture()
def workdir(tmp_path):
    from difftune.testing.images import make_image_dataset

    make_image_dataset(tmp_path / "datasets" / "shapes", n=4)
    (tmp_path / "config").mkdir()
    backends = [
        {
            "id": "shapes",
            "type": "local",
            "instance_data_dir": "datasets/shapes",
            "caption_strategy": "textfile",
            "resolution": 64,
            "resolution_type": "pixel_area",
            "crop": True,
            "crop_aspect": "square",
            "cache_dir_vae": "cache/vae",
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": "cache/text",
        },
    ]
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    return tmp_path


@pytest.mark.slow
def test_form_to_first_validation_image_of_a_real_tiny_job(server, workdir, tiny_sdxl):  # noqa: F811  (fixture)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_selector("body[data-ready=true]", timeout=15000)
            form = page.locator("#config-form")
            form.locator('[data-key="model_family"]').select_option("sdxl")
            form.locator('[data-key="model_type"]').select_option("lora")
            form.locator('[data-key="pretrained_model_name_or_path"]').fill(str(tiny_sdxl))
            form.locator('[data-key="output_dir"]').fill("out")
            form.locator('[data-key="max_train_steps"]').fill("2")
            form.locator('[data-key="train_batch_size"]').fill("2")
            form.locator('[data-key="learning_rate"]').fill("0.001")
            form.locator('[data-key="mixed_precision"]').select_option("no")
            form.locator('[data-key="report_to"]').select_option("none")
            form.locator('[data-key="validation_prompt"]').fill("a red circle")
            form.locator('[data-key="validation_resolution"]').fill("64x64")
            form.locator('[data-key="validation_num_inference_steps"]').fill("2")
            page.click("#config-save")
            page.wait_for_function(
                "() => document.querySelector('#config-status').textContent.startsWith('saved')"
            )

            page.click("#tabs button[data-tab=training]")
            page.click("#job-start")
            page.wait_for_function(
                "() => document.querySelector('#job-badge').textContent === 'finished'", timeout=240000
            )
            assert page.inner_text("#stat-step") == "2 / 2"
            page.click("#tabs button[data-tab=gallery]")
            page.wait_for_selector("#gallery figure img", timeout=20000)
            page.wait_for_function("() => document.querySelector('#gallery figure img').naturalWidth === 64")
            assert "validation-64x64.png" in page.inner_text("#gallery figcaption")
        finally:
            browser.close()
    assert (workdir / "out" / "pytorch_lora_weights.safetensors").exists()
