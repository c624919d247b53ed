"""Every optimizer name the original tool documents loads as difftune's own or is refused with the nearest."""

import pytest

from difftune.config import ConfigError, load_config
from difftune.config.optimizers import NEAREST, SAME_OPTIMIZER, ours
from tests.config.helpers import write_config

SDXL = {"model_family": "sdxl", "model_type": "lora"}

# SimpleTuner 4.10.1: the `--optimizer` choices of its options page, the torch-* names of its optimizer
# table, and the names it has retired.
DOCUMENTED = """
adamw_bf16 ao-adamw8bit ao-adamw4bit ao-adamfp8 ao-adamwfp8 adamw_schedulefree adamw_schedulefree+aggressive
adamw_schedulefree+no_kahan optimi-stableadamw optimi-adamw optimi-lion optimi-radam optimi-ranger optimi-adan
optimi-adam optimi-sgd soap bnb-adagrad bnb-adagrad8bit bnb-adam bnb-adam8bit bnb-adamw bnb-adamw8bit
bnb-adamw-paged bnb-adamw8bit-paged bnb-lion bnb-lion8bit bnb-lion-paged bnb-lion8bit-paged bnb-ademamix
bnb-ademamix8bit bnb-ademamix-paged bnb-ademamix8bit-paged prodigy muon
torch-adam torch-adamw torch-sgd torch-radam torch-nadam torch-rmsprop torch-adagrad torch-adadelta
torch-adafactor torch-adamax torch-asgd torch-sparseadam
adamw8bit adafactor dadaptation
""".split()


def test_every_documented_name_is_ours_the_same_optimizer_or_has_a_nearest_one():
    unaccounted = [n for n in DOCUMENTED if n not in ours() and n not in SAME_OPTIMIZER and n not in NEAREST]
    assert unaccounted == []
    assert {nearest for nearest, _ in NEAREST.values()} <= set(ours())
    assert set(SAME_OPTIMIZER.values()) <= set(ours())


@pytest.mark.parametrize("spelling", ["torch-adamw", "Torch-AdamW"])
def test_torch_adamw_trains_with_torch_adamw(workdir, spelling):
    import torch

    from difftune.training.optim import build_optimizer

    train = load_config(write_config(workdir, {**SDXL, "optimizer": spelling})).train
    assert train.optimizer == "adamw"
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], train)
    assert type(optimizer) is torch.optim.AdamW


@pytest.mark.parametrize("name", sorted(n for n in NEAREST if n not in ours()))
def test_a_name_difftune_lacks_is_refused_with_the_nearest(workdir, name):
    path = write_config(workdir, {**SDXL, "optimizer": name})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    nearest = NEAREST[name][0]
    assert f"{path}: 'optimizer' is '{name}'" in message
    assert f'Set "optimizer": "{nearest}"' in message
    assert "must be one of" not in message  # one message, not a second one from the schema


def test_an_unknown_name_lists_the_valid_ones(workdir):
    with pytest.raises(ConfigError, match=r"'optimizer' is 'adamq', but it must be one of"):
        load_config(write_config(workdir, {**SDXL, "optimizer": "adamq"}))
