"""LyCORIS adapters: attached from a lycoris_config file, saved in LyCORIS's layout, loaded back by its loader."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from difftune.config import ConfigError
from difftune.config.schema import TrainConfig
from difftune.families import get_family
from difftune.families.base import Components
from difftune.training.setup import prepare_denoiser, save_final_weights

# Per family: the classes the original tool's examples name, a tiny model and raw denoiser inputs.
TARGETS = {
    "sdxl": ["Attention", "FeedForward"],
    "kandinsky5-image": ["Kandinsky5Attention", "Kandinsky5FeedForward"],
    "kandinsky5-video": ["Kandinsky5Attention", "Kandinsky5FeedForward"],
}
ALGORITHMS = {
    # the original tool's documented LoKr example, with the family's class names
    "lokr": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 10},
    "loha": {"algo": "loha", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2},
    "locon": {"algo": "locon", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 4},
    "full": {"algo": "full", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1},
}


def lycoris_file(tmp_path, family, algo, **extra):
    targets = TARGETS[family]
    settings = {
        **ALGORITHMS[algo],
        "apply_preset": {"target_module": targets, "module_algo_map": {targets[1]: {"factor": 4}}}
        if algo == "lokr"
        else {"target_module": targets},
        **extra,
    }
    path = tmp_path / f"lycoris_{family}_{algo}.json"
    path.write_text(json.dumps(settings))
    return path


PIPELINES = {  # family -> its stock pipeline class
    "sdxl": "StableDiffusionXLPipeline",
    "kandinsky5-image": "Kandinsky5T2IPipeline",
    "kandinsky5-video": "Kandinsky5T2VPipeline",
}


@pytest.fixture(scope="module", params=list(PIPELINES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def stock(tiny_model):
    """stock(family) -> (the session's tiny model folder, its stock diffusers pipeline loaded once per module)."""
    import diffusers

    built = {}

    def get(family):
        if family not in built:
            folder = tiny_model(family)
            built[family] = folder, getattr(diffusers, PIPELINES[family]).from_pretrained(folder)
        return built[family]

    return get


@pytest.fixture()
def built(stock, family):
    """The family's tiny model and stock pipeline, built before the test (its set-up time)."""
    return stock(family)


def denoiser_of(pipeline):
    return pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer


def predict(family, denoiser):
    """The denoiser's output for fixed random inputs in the layout its pipeline uses."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if family == "sdxl":
            return denoiser(
                torch.randn(2, 4, 8, 8, generator=g),
                torch.tensor([50, 700]),
                encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
                added_cond_kwargs={
                    "text_embeds": torch.randn(2, 32, generator=g),
                    "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
                },
                return_dict=False,
            )[0]
        from difftune.testing.kandinsky5 import CLIP_DIM, QWEN_DIM

        frames = 1 if family == "kandinsky5-image" else 2
        return denoiser(
            hidden_states=torch.randn(1, frames, 4, 6, 16, generator=g),
            encoder_hidden_states=torch.randn(1, 5, QWEN_DIM, generator=g),
            pooled_projections=torch.randn(1, CLIP_DIM, generator=g),
            timestep=torch.tensor([600.0]),
            visual_rope_pos=[torch.arange(frames), torch.arange(2), torch.arange(3)],
            text_rope_pos=torch.arange(5),
            return_dict=False,
        )[0]


def trained_denoiser(stock, family, lycoris_config, **overrides):
    """A copy of the stock denoiser made trainable as a run does, its adapter weights set at random."""
    folder, pipeline = stock(family)
    config = TrainConfig(
        model_family=family,
        model_type="lycoris",
        pretrained_model_name_or_path=str(folder),
        lycoris_config=str(lycoris_config),
        gradient_checkpointing=False,
        **overrides,
    )
    components = Components(copy.deepcopy(denoiser_of(pipeline)), None, [], [], None)
    warnings = []
    denoiser = prepare_denoiser(
        get_family(config), components, config, torch.float32, emit=lambda kind, data: warnings.append(data)
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in denoiser.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=g) * 0.05)
    return config, denoiser.eval(), warnings


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_saved_file_loads_with_lycoris_onto_the_stock_denoiser_with_the_same_prediction(
    stock, built, tmp_path, family, algo
):
    from lycoris import create_lycoris_from_weights

    config, denoiser, warnings = trained_denoiser(stock, family, lycoris_file(tmp_path, family, algo))
    assert warnings == []
    trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith("lycoris.") and p.dtype == torch.float32 for n, p in trainable.items()
    )
    expected = predict(family, denoiser)

    path, _ = save_final_weights(get_family(config), denoiser, config, tmp_path / "out", None)
    saved = load_file(str(path))
    assert path.name == "pytorch_lora_weights.safetensors"
    assert saved and all(key.startswith("lycoris_") for key in saved)

    fresh = copy.deepcopy(denoiser_of(stock(family)[1]))
    base = predict(family, fresh)
    network, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    assert len(network.loras) == len(denoiser.get_submodule("lycoris").loras)
    network.apply_to()
    loaded = predict(family, fresh)
    assert (loaded - expected).abs().max() <= 1e-5
    assert (base - expected).abs().max() > 1e-3


def test_module_algo_map_overrides_the_algorithm_per_class(stock, tmp_path):
    path = lycoris_file(
        tmp_path,
        "sdxl",
        "locon",
        apply_preset={
            "target_module": ["Attention", "FeedForward"],
            "module_algo_map": {"FeedForward": {"algo": "loha"}},
        },
    )
    _, denoiser, _ = trained_denoiser(stock, "sdxl", path)
    kinds = {type(lora).__name__ for lora in denoiser.get_submodule("lycoris").loras}
    assert kinds == {"LoConModule", "LohaModule"}


def test_targets_that_match_nothing_are_refused_with_the_classes_that_exist(stock, tmp_path):
    path = lycoris_file(tmp_path, "kandinsky5-image", "lokr")
    with pytest.raises(ConfigError) as error:
        trained_denoiser(stock, "sdxl", path)
    message = str(error.value)
    assert str(path) in message and "target_module" in message and "Attention" in message


def test_a_target_the_denoiser_lacks_is_a_warning_when_others_match(stock, tmp_path):
    path = lycoris_file(
        tmp_path, "sdxl", "loha", apply_preset={"target_module": ["Attention", "Kandinsky5FeedForward"]}
    )
    _, _, warnings = trained_denoiser(stock, "sdxl", path)
    assert len(warnings) == 1 and "Kandinsky5FeedForward" in warnings[0]["message"]


def test_a_preset_does_not_leak_into_the_next_network(stock, tmp_path):
    first = lycoris_file(
        tmp_path,
        "sdxl",
        "locon",
        apply_preset={"target_module": ["Attention"], "module_algo_map": {"Attention": {"algo": "loha"}}},
    )
    trained_denoiser(stock, "sdxl", first)
    _, denoiser, _ = trained_denoiser(stock, "sdxl", lycoris_file(tmp_path, "sdxl", "locon"))
    assert {type(lora).__name__ for lora in denoiser.get_submodule("lycoris").loras} == {"LoConModule"}


def test_quantised_base_trains_in_bypass_mode(stock, tmp_path):
    pytest.importorskip("optimum.quanto")
    _, denoiser, _ = trained_denoiser(
        stock, "sdxl", lycoris_file(tmp_path, "sdxl", "lokr"), base_model_precision="int8-quanto"
    )
    loras = denoiser.get_submodule("lycoris").loras
    assert loras and all(lora.bypass_mode for lora in loras)
    denoiser.train()
    output = predict_with_grad(denoiser)
    output.square().mean().backward()
    assert all(p.grad is not None for p in denoiser.parameters() if p.requires_grad)


def predict_with_grad(denoiser):
    g = torch.Generator().manual_seed(3)
    return denoiser(
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 77, 64, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(1, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        },
        return_dict=False,
    )[0]


def test_validation_strength_scales_the_adapter_and_the_trained_multiplier_returns(stock, tmp_path):
    from difftune.training.lycoris import lycoris_strength

    _, denoiser, _ = trained_denoiser(stock, "sdxl", lycoris_file(tmp_path, "sdxl", "locon"))
    trained = predict("sdxl", denoiser)
    base = predict("sdxl", denoiser_of(stock("sdxl")[1]))
    with lycoris_strength(denoiser, 0.0):
        torch.testing.assert_close(predict("sdxl", denoiser), base)
    with lycoris_strength(denoiser, 0.5):
        half = predict("sdxl", denoiser)
    # LoCon is linear in its multiplier inside each layer; through the UNet the output lies between
    assert 0 < (half - base).abs().mean() < (trained - base).abs().mean()
    torch.testing.assert_close(predict("sdxl", denoiser), trained)


def test_full_weights_train_in_fp32_and_run_in_a_bf16_pipeline_without_autocast(stock, tmp_path):
    _, denoiser, _ = trained_denoiser(stock, "sdxl", lycoris_file(tmp_path, "sdxl", "full"))
    expected = predict("sdxl", denoiser)
    frozen = [p for p in denoiser.parameters() if not p.requires_grad]
    for parameter in frozen:
        parameter.data = parameter.data.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in denoiser.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        output = denoiser(
            torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16),
            torch.tensor([50, 700]),
            encoder_hidden_states=torch.randn(2, 77, 64, generator=g).to(torch.bfloat16),
            added_cond_kwargs={
                "text_embeds": torch.randn(2, 32, generator=g).to(torch.bfloat16),
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2).to(torch.bfloat16),
            },
            return_dict=False,
        )[0]
    assert output.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: the outputs agree to a few percent of their scale
    assert (output.float() - expected).abs().max() < 0.05 * expected.abs().max()
