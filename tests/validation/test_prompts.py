"""validation_prompt and user_prompt_library -> the (name, prompt) list."""

import json

import pytest

from difftune.config.schema import TrainConfig
from difftune.validation.prompts import validation_prompts


def config(**values) -> TrainConfig:
    return TrainConfig(model_family="sdxl", **values)


def test_validation_prompt_then_library_in_file_order(tmp_path):
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"cat": "a photo of a cat", "dog": {"prompt": "a dog", "seed": 3}}))
    prompts = validation_prompts(config(validation_prompt="a red circle", user_prompt_library=str(library)))
    assert prompts == [("validation", "a red circle"), ("cat", "a photo of a cat"), ("dog", "a dog")]
    assert validation_prompts(config()) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ('["a cat"]', "must hold an object"),
        ('{"cat": {"text": "a cat"}}', "entry 'cat' needs a prompt"),
        ('{"cat": ""}', "entry 'cat' needs a prompt"),
    ],
)
def test_bad_library_errors_name_the_file(tmp_path, content, message):
    library = tmp_path / "prompts.json"
    if content is not None:
        library.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        validation_prompts(config(user_prompt_library=str(library)))
    assert str(library) in str(error.value)
