"""Memory settings decided at load time: the quickstarts' int8-quanto + group offload recipe."""

import importlib.util

import pytest

from difftune.config import ConfigError, load_config

from .helpers import write_config

LOWEST_VRAM = {
    "model_family": "kandinsky5-image",
    "enable_group_offload": True,
    "group_offload_type": "block_level",
}


def test_int8_quanto_with_group_offload_trains_as_int8_torchao_and_says_so(workdir):
    loaded = load_config(write_config(workdir, {**LOWEST_VRAM, "base_model_precision": "int8-quanto"}))
    assert loaded.train.base_model_precision == "int8-torchao"
    assert any("int8-quanto" in w and "int8-torchao" in w for w in loaded.warnings)


def test_quanto_without_group_offload_is_kept(workdir):
    loaded = load_config(
        write_config(workdir, {"model_family": "sdxl", "base_model_precision": "int8-quanto"})
    )
    assert loaded.train.base_model_precision == "int8-quanto"


def test_int4_quanto_with_group_offload_is_refused_with_what_to_use(workdir):
    path = write_config(workdir, {**LOWEST_VRAM, "base_model_precision": "int4-quanto"})
    with pytest.raises(ConfigError, match="'base_model_precision' is 'int4-quanto'.*use 'int8-quanto'"):
        load_config(path)


def test_missing_torchao_is_reported_at_load_time(workdir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    path = write_config(workdir, {**LOWEST_VRAM, "base_model_precision": "int8-quanto"})
    with pytest.raises(ConfigError, match="pip install torchao"):
        load_config(path)
