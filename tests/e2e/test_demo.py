"""`difftune demo` runs the whole pipeline on a built-in tiny model for each family."""

import pytest

from difftune.cli import main


@pytest.mark.parametrize(
    "family", ["sdxl", "kandinsky5-image", pytest.param("kandinsky5-video", marks=pytest.mark.slow)]
)
def test_demo_trains_and_reports_its_outputs(tmp_path, capsys, family):
    assert main(["demo", "--family", family, "--workdir", str(tmp_path), "--steps", "4"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err  # quiet
    output_dir = tmp_path / "output" / family
    assert f"LoRA:        {output_dir / 'pytorch_lora_weights.safetensors'}" in out
    assert (output_dir / "pytorch_lora_weights.safetensors").stat().st_size > 0
    suffix = "mp4" if family == "kandinsky5-video" else "png"
    assert list((output_dir / "validation").glob(f"*/*.{suffix}"))
    assert (output_dir / "loss.png").exists()
    assert (tmp_path / "models" / family / "model_index.json").exists()
