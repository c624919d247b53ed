import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.configure import run_wizard, vram_tier
from difftune.families import registry
from tests.families import extra_family


def scripted(answers):
    """An input_fn that replays `answers` and records the prompts; EOFError when they run out."""
    queue = list(answers)
    prompts = []

    def input_fn(prompt):
        prompts.append(prompt)
        if not queue:
            raise EOFError
        return queue.pop(0)

    return input_fn, prompts


def read_files(workdir: Path):
    config = json.loads((workdir / "config" / "config.json").read_text())
    datasets = json.loads((workdir / "config" / "multidatabackend.json").read_text())
    return config, datasets


# family, flavour, model_type, folder, captions, resolution, validation resolution, VRAM, steps, prompt, output
VIDEO_ANSWERS = [
    "3",
    "t2v-lite-sft-10s",
    "lora",
    "clips",
    "textfile",
    "",
    "",
    "12",
    "300",
    "a dog running",
    "out",
]


def test_defaults_give_sdxl_lora(tmp_path):
    input_fn, prompts = scripted([""] * 11)
    lines = []
    written = run_wizard(input_fn, lines.append, tmp_path)
    assert written == [tmp_path / "config/config.json", tmp_path / "config/multidatabackend.json"]
    config, datasets = read_files(tmp_path)
    assert config["model_family"] == "sdxl" and config["model_flavour"] == "base-1.0"
    assert config["model_type"] == "lora" and config["lora_rank"] == 16 and config["learning_rate"] == 1e-4
    assert config["validation_resolution"] == "1024x1024" and config["validation_guidance"] == 4.2
    assert config["gradient_checkpointing"] is True and "enable_group_offload" not in config  # 24 GB preset
    assert config["max_train_steps"] == 2000 and config["output_dir"] == "output/models"
    assert (
        datasets[0]["instance_data_dir"] == "datasets/my_images"
        and datasets[0]["caption_strategy"] == "textfile"
    )
    assert datasets[1]["dataset_type"] == "text_embeds" and datasets[1]["default"] is True
    # the defaults are shown in the questions
    assert (
        "choose 1-3 or a name [sdxl]: " in prompts
        and "Training resolution (pixels, short side) [1024]: " in prompts
    )
    assert any("does not exist yet" in line for line in lines)
    TrainConfig.model_validate(config)
    assert [DatasetConfig.model_validate(d).id for d in datasets] == ["my-images", "text-embeds"]


def test_video_family_with_little_vram(tmp_path):
    (tmp_path / "clips").mkdir()
    input_fn, _ = scripted(VIDEO_ANSWERS)
    lines = []
    run_wizard(input_fn, lines.append, tmp_path)
    config, datasets = read_files(tmp_path)
    assert config["model_family"] == "kandinsky5-video" and config["model_flavour"] == "t2v-lite-sft-10s"
    assert config["validation_guidance"] == 5.0 and config["flow_schedule_shift"] == 1.0
    assert config["validation_num_video_frames"] == 61 and config["validation_resolution"] == "512x768"
    assert config["enable_group_offload"] is True and config["base_model_precision"] == "int8-quanto"
    assert config["vae_enable_patch_conv"] is True and config["offload_during_startup"] is True
    assert config["validation_prompt"] == "a dog running" and config["max_train_steps"] == 300
    assert config["checkpointing_steps"] == 75 and config["validation_steps"] == 30
    video = datasets[0]
    assert (
        video["dataset_type"] == "video"
        and video["instance_data_dir"] == "clips"
        and video["resolution"] == 512
    )
    assert video["video"] == {
        "num_frames": 61,
        "min_frames": 61,
        "frame_rate": 24,
        "bucket_strategy": "aspect_ratio",
    }
    assert DatasetConfig.model_validate(video).video.num_frames == 61
    assert not any("does not exist yet" in line for line in lines)
    assert any("the 12 GB preset" in line and "int8-quanto" in line for line in lines)


def test_bad_answers_are_asked_again(tmp_path):
    answers = [
        "9",
        "kandinsky5-image",
        "t2i-nope",
        "",
        "everything",
        "full",
        "",
        "instanceprompt",
        "sks dog",
        "big",
        "768",
        "768xabc",
        "768x768,1024x768",
        "lots",
        "16GB",
        "0",
        "100",
        "",
        "",
    ]
    input_fn, _ = scripted(answers)
    lines = []
    run_wizard(input_fn, lines.append, tmp_path)
    config, datasets = read_files(tmp_path)
    assert config["model_family"] == "kandinsky5-image" and config["model_flavour"] == "t2i-lite-sft"
    assert config["model_type"] == "full" and config["learning_rate"] == 1e-5 and "lora_rank" not in config
    assert datasets[0]["caption_strategy"] == "instanceprompt" and datasets[0]["instance_prompt"] == "sks dog"
    assert datasets[0]["resolution"] == 768 and config["validation_resolution"] == "768x768,1024x768"
    assert config["base_model_precision"] == "int8-quanto" and config["max_train_steps"] == 100
    assert "  '9' is not one of: sdxl, kandinsky5-image, kandinsky5-video" in lines
    assert any(line.startswith("  'lots' is not valid") for line in lines)
    assert any(line.startswith("  '0' is not valid") for line in lines)


@pytest.mark.parametrize(
    ("gigabytes", "tier"),
    [(8, 12), (12, 12), (14, 12), (15.9, 16), (16, 16), (23.5, 24), (40, 24), (47.5, 48), (80, 48)],
)
def test_vram_tiers(gigabytes, tier):
    assert vram_tier(gigabytes) == tier


def test_existing_files_kept_unless_confirmed(tmp_path):
    config_path = tmp_path / "config" / "config.json"
    config_path.parent.mkdir()
    config_path.write_text('{"model_family": "sdxl", "mine": true}')
    input_fn, prompts = scripted(["", "sdxl"])
    lines = []
    assert run_wizard(input_fn, lines.append, tmp_path) == []
    assert prompts[0].endswith("already exists. Overwrite? [y/N]: ") and "config.json" in prompts[0]
    assert "Nothing written; existing files kept." in lines
    assert config_path.read_text() == '{"model_family": "sdxl", "mine": true}'
    assert not (tmp_path / "config" / "multidatabackend.json").exists()

    input_fn, _ = scripted(["yes"] + VIDEO_ANSWERS)
    assert run_wizard(input_fn, lambda line: None, tmp_path)
    assert read_files(tmp_path)[0]["model_family"] == "kandinsky5-video"


def test_the_wizard_offers_a_registered_family_from_its_registry_row(tmp_path, monkeypatch):
    row = registry.FamilySpec(
        name="newfam",
        title="A New Family",
        module="nowhere:NewFamily",
        tiny_model="nowhere:build",
        flavours={"v1": registry.Flavour("org/newfam-v1", "first release", "t2v")},
        default_flavour="v1",
        defaults={"validation_guidance": 3.5},
        pixel_multiple=16,
        frames_per_latent=4,
    )
    monkeypatch.setitem(registry.FAMILIES, row.name, row)
    lines = []
    input_fn, _ = scripted(["newfam", ""] + [""] * 9)
    assert run_wizard(input_fn, lines.append, tmp_path)
    config, datasets = read_files(tmp_path)
    assert any("A New Family" in line for line in lines) and any(
        "v1: first release" in line for line in lines
    )
    assert config["model_flavour"] == "v1" and config["validation_guidance"] == 3.5
    assert datasets[0]["dataset_type"] == "video"


def run_cli(workdir: Path, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "difftune", "configure", "--workdir", str(workdir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_reads_answers_from_stdin(tmp_path):
    done = run_cli(tmp_path, "\n".join(VIDEO_ANSWERS) + "\n")
    assert done.returncode == 0, done.stderr
    assert (
        "Validation prompt [a cat walking through a sunny garden, camera pans right]: a dog running"
        in done.stdout
    )
    assert read_files(tmp_path)[0]["model_flavour"] == "t2v-lite-sft-10s"


def test_cli_with_too_few_answers_writes_nothing(tmp_path):
    done = run_cli(tmp_path, "2\n\n")
    assert done.returncode == 1
    assert "the answers ended before the last question; nothing was written" in done.stderr
    assert not (tmp_path / "config").exists()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_wizard_in_a_real_terminal(tmp_path):
    socket = f"difftune-test-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket]
    command = f"{sys.executable} -m difftune configure --workdir {tmp_path}; echo WIZARD-EXIT=$?; sleep 30"
    env = {**os.environ, "TERM": "xterm"}
    subprocess.run(
        tmux + ["new-session", "-d", "-s", "wizard", "-x", "200", "-y", "60", command], check=True, env=env
    )

    def screen() -> str:
        return subprocess.run(
            tmux + ["capture-pane", "-p", "-t", "wizard", "-S", "-200"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def wait_for(text: str, seconds: float = 30) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            shown = screen()
            if text in shown:
                return shown
            time.sleep(0.1)
        raise AssertionError(f"'{text}' never appeared; the terminal shows:\n{screen()}")

    try:
        steps = [
            ("choose 1-3 or a name [sdxl]:", "2"),
            ("choose 1-4 or a name [t2i-lite-sft]:", ""),
            ("[lora]:", ""),
            ("Folder with your images [datasets/my_images]:", "photos"),
            ("choose 1-3 or a name [textfile]:", "filename"),
            ("short side) [1024]:", "512"),
            ("several) [512x512]:", ""),
            ("(12, 16, 24, 48+) [24]:", "48"),
            ("Training steps [2000]:", "50"),
            ("Validation prompt [A high quality portrait", "a lighthouse at dusk"),
            ("Output folder", ""),
        ]
        for prompt, answer in steps:
            wait_for(prompt)
            subprocess.run(tmux + ["send-keys", "-t", "wizard", answer, "Enter"], check=True)
        shown = wait_for("WIZARD-EXIT=")
        assert "WIZARD-EXIT=0" in shown and "none needed" in shown
        assert f"wrote {tmp_path}/config/config.json" in shown.replace("\n", "")
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)
    config, datasets = read_files(tmp_path)
    assert (
        config["model_family"] == "kandinsky5-image" and config["validation_prompt"] == "a lighthouse at dusk"
    )
    assert "enable_group_offload" not in config and datasets[0]["resolution"] == 512
    assert datasets[0]["caption_strategy"] == "filename" and datasets[0]["instance_data_dir"] == "photos"


def test_lycoris_writes_a_lycoris_config_that_the_loader_accepts(tmp_path, monkeypatch):
    from difftune.config import load_config

    input_fn, _ = scripted(["2", "", "lycoris"] + [""] * 8)
    written = run_wizard(input_fn, lambda line: None, tmp_path)
    assert tmp_path / "config/lycoris_config.json" in written
    config, _ = read_files(tmp_path)
    lycoris = json.loads((tmp_path / "config" / "lycoris_config.json").read_text())
    assert config["model_type"] == "lycoris" and config["lycoris_config"] == "config/lycoris_config.json"
    assert lycoris["algo"] == "lokr"
    assert lycoris["apply_preset"]["target_module"] == ["Kandinsky5Attention", "Kandinsky5FeedForward"]
    monkeypatch.chdir(tmp_path)
    assert load_config().train.model_type == "lycoris"


def test_the_lycoris_targets_and_quickstart_come_from_the_family_row(tmp_path, monkeypatch):
    row = replace(
        extra_family.SPEC,
        lycoris_targets=("Attention", "GEGLU"),
        quickstart=registry.Quickstart(resolution=512, memory={24: {"vae_enable_slicing": True}}),
    )
    monkeypatch.setitem(registry.FAMILIES, row.name, row)
    input_fn, prompts = scripted([row.name, "", "lycoris"] + [""] * 8)
    lines = []
    run_wizard(input_fn, lines.append, tmp_path)
    assert f"  4) {row.name}: {row.title}" in lines  # the wizard lists every registered row
    assert "Training resolution (pixels, short side) [512]: " in prompts
    config, datasets = read_files(tmp_path)
    assert config["model_family"] == row.name and config["vae_enable_slicing"] is True
    assert datasets[0]["resolution"] == 512
    lycoris = json.loads((tmp_path / "config" / "lycoris_config.json").read_text())
    assert lycoris["apply_preset"]["target_module"] == ["Attention", "GEGLU"]
    assert lycoris["apply_preset"]["module_algo_map"] == {
        "Attention": {"factor": 10},
        "GEGLU": {"factor": 10},
    }


def test_a_local_model_folder_is_accepted_in_the_model_question(tmp_path):
    model = tmp_path / "models" / "my-sdxl"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    lines = []
    input_fn, _ = scripted(["", str(model.parent), str(model)] + [""] * 9)
    run_wizard(input_fn, lines.append, tmp_path)
    assert any("has no model_index.json" in line for line in lines)  # a folder without it is asked again
    config, _ = read_files(tmp_path)
    assert config["pretrained_model_name_or_path"] == str(model.resolve())
    assert config["model_flavour"] == "base-1.0"


@pytest.mark.parametrize("family", list(registry.FAMILIES))
@pytest.mark.parametrize("model_type", ["lora", "lycoris", "full"])
def test_every_preset_the_wizard_writes_loads_without_a_problem(tmp_path, monkeypatch, family, model_type):
    from difftune.config import load_config

    monkeypatch.chdir(tmp_path)
    number = str(list(registry.FAMILIES).index(family) + 1)
    for gigabytes in ("12", "16", "24", "48"):
        overwrite = ["y"] if (tmp_path / "config" / "config.json").exists() else []
        # family, flavour, type, folder, captions, resolution, validation size, VRAM, steps, prompt, output
        answers = overwrite + [number, "", model_type, "", "", "", "", gigabytes, "", "", ""]
        input_fn, _ = scripted(answers)
        run_wizard(input_fn, lambda line: None, tmp_path)
        loaded = load_config()
        assert loaded.train.model_family == family and loaded.train.model_type == model_type
        assert not [w for w in loaded.warnings if "no samples will be made" in w]
