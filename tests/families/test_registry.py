import subprocess
import sys

import pytest

from difftune.config import ConfigError, flavour_hub_id
from difftune.config.schema import TrainConfig
from difftune.families import family_class, registry


@pytest.mark.parametrize("spec", list(registry.FAMILIES.values()), ids=lambda spec: spec.name)
def test_every_row_names_its_class_valid_defaults_and_a_default_flavour(spec):
    assert family_class(spec.name).spec is spec
    assert set(spec.defaults) <= set(TrainConfig.model_fields)
    assert spec.default_flavour in spec.flavours
    assert all(flavour.description and "/" in flavour.hub_id for flavour in spec.flavours.values())


def test_flavour_hub_ids_and_errors_that_name_the_nearest_choice():
    assert flavour_hub_id("sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert flavour_hub_id("kandinsky5_image", "i2i-lite-pretrain") == (
        "kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain-Diffusers"
    )
    assert flavour_hub_id("kandinsky5-video", "t2v-pro-pretrain-10s-hd") == (
        "kandinskylab/Kandinsky-5.0-T2V-Pro-pretrain-10s-Diffusers"
    )
    with pytest.raises(ConfigError, match="did you mean 't2i-lite-sft'"):
        flavour_hub_id("kandinsky5-image", "t2i-lite-stf")
    with pytest.raises(ConfigError, match="did you mean 'sdxl'.*sdxl, kandinsky5-image, kandinsky5-video"):
        flavour_hub_id("sdx1")


def test_frame_counts_follow_the_rows_temporal_compression():
    video = registry.KANDINSKY5_VIDEO
    assert video.frame_count_problem(61) is None and registry.SDXL.frame_count_problem(7) is None
    assert "use 57 or 61" in video.frame_count_problem(60)


def test_the_registry_loads_without_torch():
    code = "import sys, difftune.families.registry, difftune.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
