"""`difftune demo` runs the whole pipeline on a built-in tiny model for each family, and visibly learns."""

import pytest
import torch

from difftune.cli import main
from difftune.events import read_events
from difftune.testing.images import COLOURS

PANEL, GAP = 192, 8  # before_after.png: panels side by side


@pytest.mark.parametrize(
    "family", ["sdxl", "kandinsky5-image", pytest.param("kandinsky5-video", marks=pytest.mark.slow)]
)
def test_demo_trains_and_reports_its_outputs(tmp_path, capsys, family):
    assert main(["demo", "--family", family, "--workdir", str(tmp_path), "--steps", "4"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err  # quiet
    output_dir = tmp_path / "output" / family
    assert f"model:       {output_dir}" in out
    suffix = "mp4" if family == "kandinsky5-video" else "png"
    assert list((output_dir / "validation").glob(f"*/*.{suffix}"))
    assert (output_dir / "loss.png").exists()
    assert f"what to look at:\n  {output_dir / 'before_after.png'}" in out
    assert (output_dir / "before_after.png").exists()
    assert (tmp_path / "models" / family / "model_index.json").exists()


def test_a_lora_demo_writes_a_lora(tmp_path, capsys):
    args = ["demo", "--family", "sdxl", "--workdir", str(tmp_path), "--steps", "2", "--model-type", "lora"]
    assert main(args) == 0
    lora = tmp_path / "output" / "sdxl" / "pytorch_lora_weights.safetensors"
    assert f"LoRA:        {lora}" in capsys.readouterr().out
    assert lora.stat().st_size > 0


def _panels(path) -> list[torch.Tensor]:
    """The panels of before_after.png as (3, H, W) float tensors in [0, 1]."""
    from PIL import Image

    sheet = torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.float32) / 255
    width, height = Image.open(path).size
    sheet = sheet.T.reshape(3, height, width)
    return [sheet[:, :, x : x + PANEL] for x in range(0, width, PANEL + GAP)]


def _off_theme(panel: torch.Tensor) -> float:
    """Mean RGB distance of the panel's pixels to the nearer of the demo's two colours."""
    theme = torch.tensor([COLOURS["red"], COLOURS["blue"]], dtype=torch.float32) / 255
    return torch.cdist(panel.reshape(3, -1).T, theme).min(1).values.mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "kandinsky5-image", "kandinsky5-video"])
def test_the_default_demo_learns_its_images(tmp_path, family):
    assert main(["demo", "--family", family, "--workdir", str(tmp_path)]) == 0
    output_dir = tmp_path / "output" / family
    losses = [event["loss"] for event in read_events(output_dir / "events.jsonl", "progress")]
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])  # the loss falls by more than half
    *example, before, after = _panels(output_dir / "before_after.png")  # a video's has no training image
    # every training pixel is the circle's red or the background's blue; the trained sample's pixels
    # are much nearer those two colours than the untrained one's (measured: 0.45 to 0.56 of it)
    assert all(_off_theme(panel) < 0.01 for panel in example)
    assert _off_theme(after) < 0.75 * _off_theme(before)
