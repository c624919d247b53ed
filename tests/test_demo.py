"""The demo's config files: what `difftune demo` trains with (tests/e2e/test_demo.py runs it)."""

import pytest

from difftune.config import load_config
from difftune.demo import write_demo_config
from difftune.families import registry


@pytest.mark.parametrize("family", list(registry.FAMILIES))
def test_demo_configs_load(tmp_path, family):
    loaded = load_config(write_demo_config(tmp_path, family, tmp_path / "models" / family, steps=4))
    assert loaded.train.model_family == family and loaded.train.max_train_steps == 4
    assert loaded.warnings == []
    assert loaded.text_embeds_dataset.id == "text-embeds"
