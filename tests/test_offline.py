"""A model that cannot be downloaded is refused in seconds, naming the setting and the local-folder fix."""

import time

import pytest
from huggingface_hub import constants

from difftune import offline
from difftune.config.schema import TrainConfig
from difftune.training.crepa import load_vision_encoder
from difftune.training.setup import check_fetchable_models
from difftune.validation.clip_score import ClipScorer

NOT_CACHED = "difftune-tests/never-downloaded"


@pytest.fixture()
def hub_unreachable(monkeypatch):
    """The Hub's address points at a closed local port, as on a machine without network."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    offline._reachable.cache_clear()
    yield
    offline._reachable.cache_clear()


def test_an_unreachable_hub_fails_fast_and_names_the_setting(hub_unreachable):
    started = time.perf_counter()
    with pytest.raises(OSError) as error:
        offline.check_fetchable(NOT_CACHED, "crepa_model")
    assert time.perf_counter() - started < offline.PROBE_SECONDS + 2
    message = str(error.value)
    assert message.startswith(f"crepa_model names '{NOT_CACHED}'") and "does not answer" in message
    assert f"huggingface-cli download {NOT_CACHED} --local-dir DIR" in message


def test_offline_mode_is_reported_without_a_probe(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(offline, "_reachable", None)  # calling it would fail the test
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        offline.check_fetchable(NOT_CACHED, "pretrained_evaluation_model_name_or_path")


def test_local_folders_and_paths_are_left_to_the_loader(tmp_path, hub_unreachable):
    offline.check_fetchable(str(tmp_path), "crepa_model")  # exists
    offline.check_fetchable(str(tmp_path / "missing"), "crepa_model")  # the loader names the path


def test_the_clip_scorer_and_the_crepa_encoder_fail_fast(hub_unreachable):
    with pytest.raises(OSError, match="pretrained_evaluation_model_name_or_path names"):
        ClipScorer(NOT_CACHED)
    with pytest.raises(OSError, match="crepa_model names 'facebook/dinov2-small'"):
        load_vision_encoder("dinov2_vits14")


def test_a_run_checks_them_before_the_model_load(hub_unreachable):
    config = TrainConfig(
        model_family="kandinsky5-video",
        crepa_enabled=True,
        crepa_model="dinov2_vits14",
        evaluation_type="clip",
        pretrained_evaluation_model_name_or_path=NOT_CACHED,
    )
    with pytest.raises(OSError, match="crepa_model names 'facebook/dinov2-small'"):
        check_fetchable_models(config)
