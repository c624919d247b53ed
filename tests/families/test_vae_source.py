"""pretrained_vae_model_name_or_path may name a VAE or a whole model, whose VAE is its `vae` subfolder."""

import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.errors import ConfigError
from difftune.families.sdxl import SDXLFamily
from difftune.families.vae_source import load_vae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second model folder whose vae/ holds a VAE with other weights than the base model's."""
    from difftune.testing.sdxl import tiny_sdxl_vae

    folder = tmp_path_factory.mktemp("other") / "model"
    tiny_sdxl_vae(seed=5).save_pretrained(folder / "vae")
    return folder


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("given", ["model", "vae"])
def test_a_whole_model_folder_or_its_vae_folder_gives_that_vae(tiny_sdxl, other_model, given):
    from diffusers import AutoencoderKL

    source = other_model if given == "model" else other_model / "vae"
    config = TrainConfig(
        model_family="sdxl",
        pretrained_model_name_or_path=str(tiny_sdxl),
        pretrained_vae_model_name_or_path=str(source),
    )
    vae = SDXLFamily(config).load(CPU, torch.float32).vae
    expected = AutoencoderKL.from_pretrained(other_model / "vae")
    base = AutoencoderKL.from_pretrained(tiny_sdxl / "vae")
    assert _same_weights(vae, expected) and not _same_weights(vae, base)


def test_a_folder_without_a_vae_names_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConfigError, match=r"'pretrained_vae_model_name_or_path' is '.*empty'.*vae/config.json"
    ):
        load_vae(object, str(tmp_path / "empty"))


class _HubModel:
    """A Hub repository holding a whole model: no config.json at its root, the VAE under vae/."""

    asked: list = []

    @classmethod
    def from_pretrained(cls, source, subfolder=None, **kwargs):
        cls.asked.append(subfolder)
        if subfolder != "vae":
            raise OSError(f"{source} does not appear to have a file named config.json")
        return ("vae of", source, kwargs)


def test_a_hub_id_of_a_whole_model_is_tried_at_its_root_then_in_vae():
    assert load_vae(_HubModel, "someone/whole-model", torch_dtype=torch.float16) == (
        "vae of",
        "someone/whole-model",
        {"torch_dtype": torch.float16},
    )
    assert _HubModel.asked == [None, "vae"]
