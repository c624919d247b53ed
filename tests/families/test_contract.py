"""What every family promises, checked on its tiny model: each registry row, and a fourth family added
the way a new one is (tests/families/extra_family.py: one module, one row, one tiny model)."""

from __future__ import annotations

import pytest
import torch

from difftune.config import ConfigError
from difftune.config.schema import TrainConfig
from difftune.families import get_family, registry
from difftune.families.base import GenerationRequest, SampleGeometry
from difftune.training.adapters import attach_lora, lora_state_dict
from difftune.training.losses import per_sample_loss
from difftune.training.tread import apply_tread
from tests.families import extra_family

FAMILIES = [*registry.FAMILIES, extra_family.SPEC.name]
CPU = torch.device("cpu")
SIZE = 64
PROMPTS = ["a red circle", "a blue square on a white background"]
ROUTE = {"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": -1}
# two samples: one cropped from a larger, taller source, one trained at its own size
GEOMETRY = [
    SampleGeometry((96, 80), (16, 8), (SIZE, SIZE)),
    SampleGeometry((SIZE, SIZE), (0, 0), (SIZE, SIZE)),
]


@pytest.fixture(params=FAMILIES)
def family_name(request, monkeypatch):
    monkeypatch.setitem(registry.FAMILIES, extra_family.SPEC.name, extra_family.SPEC)
    return request.param


def make_family(name: str, tiny_model, **settings):
    values = {"lora_rank": 4, "seed": 0, "validation_resolution": f"{SIZE}x{SIZE}", **settings}
    config = TrainConfig(model_family=name, pretrained_model_name_or_path=str(tiny_model(name)), **values)
    return get_family(config)


def pixels_for(family, count: int = 2) -> torch.Tensor:
    """Random pixels in [-1, 1]: (B, 3, H, W), or (B, 3, T, H, W) with two latent frames for video."""
    generator = torch.Generator().manual_seed(0)
    frames = (family.spec.frames_per_latent + 1,) if family.is_video else ()
    return torch.rand(count, 3, *frames, SIZE, SIZE, generator=generator) * 2 - 1


def batch_for(family, components) -> dict:
    """What the data pipeline gives a step: collated prompts, latents and each sample's sizes."""
    batch = family.collate_prompts(family.encode_prompts(components, PROMPTS))
    batch["latents"] = family.encode_pixels(components, pixels_for(family))
    batch.update(family.batch_extras(GEOMETRY))
    return batch


class ReadingBatch(dict):
    """A batch that notes which of its entries are read."""

    def __init__(self, entries: dict):
        super().__init__(entries)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_model_forward_takes_the_extras_the_family_declares(family_name, tiny_model, tiny_components):
    family = make_family(family_name, tiny_model)
    components = tiny_components(family_name)
    extras = family.batch_extras(GEOMETRY)
    assert all(len(value) == len(GEOMETRY) for value in extras.values())  # one row per sample
    batch = ReadingBatch(batch_for(family, components))
    timesteps = family.objective(components).sample_timesteps(2, torch.Generator().manual_seed(0), CPU)
    with torch.no_grad():
        prediction = family.model_forward(components, components.denoiser, batch["latents"], timesteps, batch)
        assert set(extras) <= batch.read, f"declared but never read: {set(extras) - batch.read}"
        if extras:  # what a family declares conditions its prediction
            other = [SampleGeometry((128, 96), (24, 0), (SIZE, SIZE))] * len(GEOMETRY)
            moved = {**batch, **family.batch_extras(other)}
            changed = family.model_forward(
                components, components.denoiser, batch["latents"], timesteps, moved
            )
            assert not torch.allclose(prediction, changed)


def loss_of(family, components, objective, batch, noise, timesteps) -> torch.Tensor:
    latents = batch["latents"]
    noisy = objective.add_noise(latents, noise, timesteps)
    prediction = family.model_forward(components, components.denoiser, noisy, timesteps, batch)
    target = objective.target(latents, noise, timesteps)
    return per_sample_loss(prediction, target, family.loss_mask(batch, latents)).mean()


def test_tiny_model_loads_with_frozen_encoders(family_name, tiny_model):
    family = make_family(family_name, tiny_model)
    components = family.load(CPU, torch.float32)
    frozen = [components.vae, *components.text_encoders]
    assert all(not p.requires_grad for module in frozen for p in module.parameters())
    assert sum(p.numel() for p in components.denoiser.parameters()) < 5_000_000


def test_prompt_pixel_and_prediction_shapes(family_name, tiny_model, tiny_components):
    family = make_family(family_name, tiny_model)
    components = tiny_components(family_name)
    embeds = family.encode_prompts(components, PROMPTS)
    assert len(embeds) == len(PROMPTS) and all(embed.keys() == embeds[0].keys() for embed in embeds)
    pixels = pixels_for(family)
    latents = family.encode_pixels(components, pixels)
    assert latents.shape[0] == 2 and latents.shape[-2:] == (SIZE // 8, SIZE // 8)
    assert family.decode_latents(components, latents).shape == pixels.shape
    batch = batch_for(family, components)
    timesteps = family.objective(components).sample_timesteps(2, torch.Generator().manual_seed(0), CPU)
    with torch.no_grad():
        prediction = family.model_forward(components, components.denoiser, batch["latents"], timesteps, batch)
    assert prediction.shape == batch["latents"].shape


def test_one_lora_step_lowers_the_loss_and_the_saved_adapter_loads_in_the_stock_pipeline(
    family_name, tiny_model, tiny_components, tmp_path
):
    family = make_family(family_name, tiny_model)
    components = tiny_components(family_name, fresh_denoiser=True)
    attach_lora(components.denoiser, family, family.config)
    objective = family.objective(components)
    batch = batch_for(family, components)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(batch["latents"].shape, generator=generator)
    timesteps = objective.sample_timesteps(2, generator, CPU)
    trainable = [p for p in components.denoiser.parameters() if p.requires_grad]
    before = loss_of(family, components, objective, batch, noise, timesteps)
    before.backward()
    # A gradient step sized to lower the loss by ~1% to first order; the second-order term is far smaller.
    squared = sum(float((p.grad**2).sum()) for p in trainable)
    with torch.no_grad():
        for p in trainable:
            p -= 0.01 * float(before.detach()) / squared * p.grad
        after = loss_of(family, components, objective, batch, noise, timesteps)
    assert float(after) < float(before.detach())

    family.save_lora(tmp_path, lora_state_dict(components.denoiser))
    stock = tiny_components(family_name, fresh_denoiser=True)  # as loaded, without the adapter
    family.pipeline(stock, stock.denoiser).load_lora_weights(tmp_path)
    with torch.no_grad():
        noisy = objective.add_noise(batch["latents"], noise, timesteps)
        trained = family.model_forward(components, components.denoiser, noisy, timesteps, batch)
        loaded = family.model_forward(stock, stock.denoiser, noisy, timesteps, batch)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_generate_returns_the_asked_size(family_name, tiny_model, tiny_components, tmp_path):
    family = make_family(family_name, tiny_model)
    components = tiny_components(family_name)
    pipeline = family.pipeline(components, components.denoiser)
    frames = family.spec.frames_per_latent + 1 if family.is_video else None
    request = GenerationRequest("a red circle", SIZE, SIZE // 2, 1, 2.0, torch.Generator(), num_frames=frames)
    sample = family.generate(pipeline, request)
    first = sample[0][0] if family.is_video else sample[0]
    assert first.size == (SIZE, SIZE // 2)
    assert family.save_sample(sample, tmp_path / "sample").is_file()


def test_a_family_that_trains_its_text_encoders_names_each_for_the_comfyui_export(
    family_name, tiny_model, tiny_components
):
    family = make_family(family_name, tiny_model)
    trained = len(tiny_components(family_name).text_encoders) if family.text_encoder_lora_targets() else 0
    assert len(family.kohya_text_encoders()) == trained
    assert len({encoder.name for encoder in family.kohya_text_encoders().values()}) == trained


def test_check_refuses_a_validation_size_off_the_pixel_grid(family_name, tiny_model):
    family = make_family(family_name, tiny_model)
    off = 2 * family.validation_pixel_multiple + 1
    with pytest.raises(ConfigError, match=f"'{off}x{SIZE}'.*multiples of {family.validation_pixel_multiple}"):
        make_family(family_name, tiny_model, validation_resolution=f"{off}x{SIZE}").check([])
    assert isinstance(family.check([]), list)


def test_tread_routes_tokens_while_training_or_is_refused_at_load(family_name, tiny_model, tiny_components):
    family = make_family(family_name, tiny_model, tread_config={"routes": [ROUTE]})
    block = family.routable_block()
    if block is None:
        with pytest.raises(ConfigError, match=f"'tread_config' is .*{family.name}.*remove tread_config"):
            family.check([])
        return
    assert isinstance(family.check([]), list)
    components = tiny_components(family_name, fresh_denoiser=True)
    denoiser = components.denoiser.train()
    batch = batch_for(family, components)
    timesteps = family.objective(components).sample_timesteps(2, torch.Generator().manual_seed(0), CPU)

    def predict() -> torch.Tensor:
        return family.model_forward(components, denoiser, batch["latents"], timesteps, batch)

    plain = predict().detach()
    blocks = family.transformer_blocks(denoiser)
    with apply_tread(denoiser, blocks, block, family.config.tread_config, torch.Generator().manual_seed(0)):
        routed = predict().detach()
        with torch.no_grad():  # validation: every token through every block
            unrouted = predict()
    assert routed.shape == plain.shape and torch.isfinite(routed).all()
    assert not torch.allclose(routed, plain)
    torch.testing.assert_close(unrouted, plain, atol=0, rtol=0)


def test_token_grid_cell_holds_the_token_of_that_latent_patch_or_crepa_is_refused_at_load(
    family_name, tiny_model, tiny_components
):
    family = make_family(family_name, tiny_model, crepa_enabled=True)
    grid = family.token_grid()
    if grid is None:
        with pytest.raises(
            ConfigError, match=f"'crepa_enabled' is True, but {family.name}.*remove crepa_enabled"
        ):
            family.check([])
        return
    assert isinstance(family.check([]), list)
    components = tiny_components(family_name, fresh_denoiser=True)
    denoiser = components.denoiser
    batch = batch_for(family, components)
    timesteps = family.objective(components).sample_timesteps(2, torch.Generator().manual_seed(0), CPU)

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return family.model_forward(components, denoiser, batch["latents"], timesteps, batch)

    # The last block's token at grid cell (last frame, first row, last column) is pushed; the output
    # layer works token by token, so only that cell's latent patch may change.
    layouts, grids = [], []

    def push_one_cell(module, args, output):
        to_grid = layouts[-1]
        grids.append(to_grid(output))
        positions = torch.arange(output.shape[1], dtype=output.dtype).expand(output.shape[0], -1)
        token = int(to_grid(positions.unsqueeze(-1))[0, -1, 0, -1, 0])
        pushed = output.clone()
        pushed[:, token] += torch.linspace(-10.0, 10.0, output.shape[-1])  # not a constant: norms remove that
        return pushed

    plain = predict()
    blocks = family.transformer_blocks(denoiser)
    hooks = [
        denoiser.register_forward_pre_hook(
            lambda module, args, kwargs: layouts.append(grid.layout_of_call(module, args, kwargs)),
            with_kwargs=True,
        ),
        blocks[-1].register_forward_hook(push_one_cell),
    ]
    pushed = predict()
    for hook in hooks:
        hook.remove()

    frames, height, width = grids[0].shape[1:4]
    assert sum(g.shape[0] for g in grids) == 2
    assert all(g.shape[1:] == (frames, height, width, grid.hidden_size(denoiser)) for g in grids)
    change = (pushed - plain).abs().sum(dim=1)  # (B, [T,] H, W)
    if change.ndim == 3:
        change = change.unsqueeze(1)
    patch = (change.shape[1] // frames, change.shape[2] // height, change.shape[3] // width)
    assert (change.shape[1] % frames, change.shape[2] % height, change.shape[3] % width) == (0, 0, 0)
    inside = torch.zeros_like(change, dtype=torch.bool)
    inside[:, -patch[0] :, : patch[1], -patch[2] :] = True
    # other tokens' outputs are computed from their own rows only: unchanged up to float rounding
    assert change[inside].min() > 1e-3 and change[~inside].max() <= 1e-5 * change[inside].min()
