from types import SimpleNamespace

import pytest
from PIL import Image

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.hub import model_card, push_to_hub, trigger_words


class FakeHfApi:
    """Records create_repo / create_commit calls instead of talking to the Hub."""

    def __init__(self, namespace: str = "alice") -> None:
        self.namespace = namespace
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        full = repo_id if "/" in repo_id else f"{self.namespace}/{repo_id}"
        return SimpleNamespace(repo_id=full, url=f"https://huggingface.co/{full}")

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", {"repo_id": repo_id, "operations": list(operations), **kwargs}))
        return SimpleNamespace(oid="abc")


def _config(tmp_path, **overrides) -> TrainConfig:
    values = {
        "model_family": "kandinsky5-image",
        "model_type": "lora",
        "output_dir": str(tmp_path),
        "pretrained_model_name_or_path": "kandinskylab/Kandinsky-5.0-T2I-Lite",
        "lora_rank": 8,
        "learning_rate": 1e-4,
        "max_train_steps": 500,
        "seed": 42,
        "validation_prompt": "a photo of sks dog",
    }
    return TrainConfig(**{**values, **overrides})


def _datasets(tmp_path) -> list[DatasetConfig]:
    return [
        DatasetConfig(
            id="dogs",
            instance_data_dir=str(tmp_path),
            caption_strategy="instanceprompt",
            instance_prompt="sks dog",
        ),
        DatasetConfig(id="more-dogs", instance_data_dir=str(tmp_path), instance_prompt="sks dog"),
        DatasetConfig(id="off", instance_data_dir=str(tmp_path), instance_prompt="unused", disabled=True),
        DatasetConfig(id="text", dataset_type="text_embeds", cache_dir=str(tmp_path)),
    ]


def _operations(api: FakeHfApi) -> dict[str, object]:
    (_, commit) = api.calls[1]
    return {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}


def test_push_lora_uploads_weights_card_and_images(tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    image = tmp_path / "validation" / "100" / "dog.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(image)
    api = FakeHfApi()
    repo_id = push_to_hub(
        tmp_path,
        "my-lora",
        _config(tmp_path),
        [("a dog on a beach", image)],
        token="hf_secret",
        api=api,
        datasets=_datasets(tmp_path),
    )
    assert repo_id == "alice/my-lora"
    assert api.calls[0] == (
        "create_repo",
        {"repo_id": "my-lora", "token": "hf_secret", "private": None, "repo_type": "model", "exist_ok": True},
    )
    name, commit = api.calls[1]
    assert name == "create_commit" and commit["repo_id"] == "alice/my-lora" and commit["token"] == "hf_secret"
    assert commit["commit_message"] == "difftune: kandinsky5-image lora weights and card"
    files = _operations(api)
    assert sorted(files) == ["README.md", "images/00_dog.png", "pytorch_lora_weights.safetensors"]
    assert files["pytorch_lora_weights.safetensors"] == str(tmp_path / "pytorch_lora_weights.safetensors")
    assert files["images/00_dog.png"] == str(image)
    card = files["README.md"].decode()
    assert card.startswith(
        '---\nbase_model: "kandinskylab/Kandinsky-5.0-T2I-Lite"\nlibrary_name: diffusers\n'
    )
    assert "tags:\n- diffusers\n- difftune\n- kandinsky5-image\n- text-to-image\n- lora\n" in card
    assert 'instance_prompt: "sks dog"\n' in card
    assert 'widget:\n- text: "a dog on a beach"\n  output:\n    url: images/00_dog.png\n---' in card
    assert "## Trigger words\n\nUse these in the prompt:\n\n- `sks dog`\n" in card
    assert "![a dog on a beach](images/00_dog.png)" in card
    assert "| lora_rank | 8 |" in card and "| learning_rate | 0.0001 |" in card and "| seed | 42 |" in card
    assert "| snr_gamma |" not in card  # unset settings are left out
    assert (
        'pipeline.load_lora_weights("alice/my-lora", weight_name="pytorch_lora_weights.safetensors")' in card
    )


def test_full_model_uploads_the_saved_folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"w")
    api = FakeHfApi()
    push_to_hub(tmp_path, "bob/full", _config(tmp_path, model_type="full"), [], api=api)
    files = _operations(api)
    assert sorted(files) == [
        "README.md",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]
    card = files["README.md"].decode()
    assert (
        "- lora" not in card and "widget:" not in card and "A fine-tuned model for kandinsky5-image" in card
    )


def test_missing_weights_and_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors does not exist"):
        push_to_hub(tmp_path, "a/b", _config(tmp_path), [], api=FakeHfApi())
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    with pytest.raises(FileNotFoundError, match="validation image .*nope.png does not exist"):
        push_to_hub(tmp_path, "a/b", _config(tmp_path), [tmp_path / "nope.png"], api=FakeHfApi())
    with pytest.raises(ValueError, match="hub_model_id"):
        push_to_hub(tmp_path, "", _config(tmp_path), [], api=FakeHfApi())


def test_trigger_words_and_local_base_model(tmp_path):
    assert trigger_words(_datasets(tmp_path)) == ["sks dog"]
    config = _config(tmp_path, pretrained_model_name_or_path=str(tmp_path))  # a local folder
    card = model_card(config, "a/b", [("", "images/00_x.png")])
    assert "base_model:" not in card and "![](images/00_x.png)" in card


def test_the_card_tags_what_the_flavour_generates_from_what(tmp_path):
    config = _config(
        tmp_path,
        model_family="kandinsky5-video",
        model_flavour="i2v-lite-5s",
        pretrained_model_name_or_path=None,
    )
    card = model_card(config, "a/b", [])
    assert "pipeline_tag: image-to-video" in card
    assert 'base_model: "kandinskylab/Kandinsky-5.0-I2V-Lite-5s-Diffusers"' in card
