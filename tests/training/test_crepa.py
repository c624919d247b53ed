import math

import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.families import kandinsky5 as k5
from difftune.training.crepa import Crepa, drop_vae_encoder, load_vision_encoder, neighbour_weights

LATENT_FRAMES = 3
GRID = k5.VisualTokenGrid()


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A tiny random Dinov2Model saved as a folder (patch 14, hidden 32)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    folder = tmp_path_factory.mktemp("dino") / "dinov2-tiny"
    Dinov2Model(config).save_pretrained(folder)
    return folder


def crepa_config(dino_folder, **overrides) -> TrainConfig:
    settings = {
        "model_family": "kandinsky5-video",
        "crepa_enabled": True,
        "crepa_block_index": 1,
        "crepa_model": str(dino_folder),
        "crepa_encoder_image_size": 56,
        **overrides,
    }
    return TrainConfig(**settings)


def tiny_transformer():
    from difftune.testing.kandinsky5 import tiny_kandinsky5_transformer

    return tiny_kandinsky5_transformer(seed=0).train()


def prompt_batch(lengths=(5, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    embeds = [
        {
            "prompt_embeds_qwen": torch.randn(n, 32, generator=gen),
            "prompt_embeds_clip": torch.randn(32, generator=gen),
        }
        for n in lengths
    ]
    return k5.collate_prompt_embeds(embeds)


def forward(transformer, batch, seed=0):
    """Run the transformer on fixed noisy latents (B, 3, 4, 6, 16) channels-last, as the family does."""
    gen = torch.Generator().manual_seed(seed)
    size = batch["prompt_embeds_clip"].shape[0]
    latents = torch.randn(size, LATENT_FRAMES, 4, 6, 16, generator=gen)
    return k5.transformer_forward(transformer, latents, torch.full((size,), 0.5), batch)


def clip_frames(batch_size=2, frames=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, 3, frames, 32, 48, generator=gen) * 2 - 1


def visual_crepa(dino_folder, transformer, **settings) -> Crepa:
    """CREPA on the tiny transformer's visual blocks, as a run builds it (a 64-wide projector)."""
    return Crepa(
        crepa_config(dino_folder, **settings),
        transformer,
        k5.find_visual_blocks(transformer),
        "cpu",
        token_grid=GRID,
        frames_per_latent=4,
        projector_width=64,
    )


def test_config_keys_and_defaults():
    config = TrainConfig(model_family="kandinsky5-video")
    assert (config.crepa_enabled, config.crepa_block_index, config.crepa_lambda) == (False, 8, 0.5)
    assert (config.crepa_adjacent_distance, config.crepa_adjacent_tau) == (1, 1.0)
    assert (config.crepa_model, config.crepa_encoder_image_size, config.crepa_drop_vae_encoder) == (
        "dinov2_vitg14",
        518,
        False,
    )


def test_neighbour_weights_decay_with_distance():
    weights = neighbour_weights(4, distance=2, tau=2.0)
    assert weights[1, 1] == 1 and weights[1, 2] == pytest.approx(math.exp(-0.5))
    assert weights[0, 2] == pytest.approx(math.exp(-1.0)) and weights[0, 3] == 0
    assert torch.equal(neighbour_weights(3, distance=0, tau=1.0), torch.eye(3))


def test_vision_encoder_loads_from_a_folder_and_names_are_checked(dino_folder):
    encoder = load_vision_encoder(str(dino_folder))
    assert type(encoder).__name__ == "Dinov2Model" and not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="crepa_model 'dinov3'.*dinov2_vits14"):
        load_vision_encoder("dinov3")


def test_loss_is_finite_trains_the_projector_and_decreases(dino_folder):
    transformer = tiny_transformer()
    transformer.requires_grad_(False)
    crepa = visual_crepa(dino_folder, transformer)
    optimizer = torch.optim.Adam(crepa.trainable_parameters(), lr=3e-3)
    batch, frames = prompt_batch(), clip_frames()
    losses = []
    for step in range(8):
        forward(transformer, batch)
        loss = crepa.loss(frames)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = [p.grad for p in crepa.trainable_parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    # lambda * (self term + two neighbours at exp(-1)) bounds the magnitude of the loss
    assert abs(losses[-1]) <= 0.5 * (1 + 2 * math.exp(-1)) + 1e-6
    assert -1.0 <= crepa.last_similarity <= 1.0


def test_loss_reaches_the_transformer_adapter_weights(dino_folder):
    transformer = tiny_transformer()
    transformer.requires_grad_(False)
    block = transformer.visual_transformer_blocks[0].feed_forward.in_layer
    block.weight.requires_grad_(True)
    crepa = visual_crepa(dino_folder, transformer)
    forward(transformer, prompt_batch())
    crepa.loss(clip_frames()).backward()
    assert block.weight.grad is not None and block.weight.grad.abs().sum() > 0


def test_pixel_frames_are_matched_to_latent_frames(dino_folder):
    transformer = tiny_transformer()
    crepa = visual_crepa(dino_folder, transformer)
    batch, frames = prompt_batch(), clip_frames(frames=9)
    forward(transformer, batch)
    from_clip = crepa.loss(frames)
    forward(transformer, batch)
    from_latent_frames = crepa.loss(frames[:, :, ::4])  # pixel frames 0, 4, 8
    torch.testing.assert_close(from_clip, from_latent_frames)
    forward(transformer, batch)
    with pytest.raises(ValueError, match="got 7 frames for 3 latent frames.*9 pixel frames"):
        crepa.loss(frames[:, :, :7])


def test_rows_split_by_prompt_length_are_put_back_in_order(dino_folder):
    transformer = tiny_transformer()
    crepa = visual_crepa(dino_folder, transformer)
    batch = prompt_batch(lengths=(9, 4))  # row 1 is shorter, so the transformer sees it first
    frames = clip_frames()
    forward(transformer, batch)
    order = [row for group in k5.text_length_groups(batch["prompt_cu_seqlens"]) for row in group]
    assert order == [1, 0]
    together = crepa.loss(frames, row_order=order)
    alone = []
    for row in range(2):
        single = prompt_batch(lengths=(9, 4))
        single = {
            "prompt_embeds_qwen": single["prompt_embeds_qwen"][row : row + 1, : (9, 4)[row]],
            "prompt_cu_seqlens": torch.tensor([0, (9, 4)[row]], dtype=torch.int32),
            "prompt_embeds_clip": single["prompt_embeds_clip"][row : row + 1],
        }
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(2, LATENT_FRAMES, 4, 6, 16, generator=gen)[row : row + 1]
        k5.transformer_forward(transformer, latents, torch.full((1,), 0.5), single)
        alone.append(crepa.loss(frames[row : row + 1]))
    torch.testing.assert_close(together, torch.stack(alone).mean(), atol=1e-5, rtol=1e-5)


def test_nothing_is_captured_without_gradients_or_after_checkpoint_recompute(dino_folder):
    transformer = tiny_transformer()
    transformer.enable_gradient_checkpointing()
    transformer.visual_transformer_blocks[1].feed_forward.in_layer.weight.requires_grad_(True)
    crepa = visual_crepa(dino_folder, transformer)
    batch, frames = prompt_batch(), clip_frames()
    with torch.no_grad():
        forward(transformer, batch)
    with pytest.raises(RuntimeError, match="no captured hidden states"):
        crepa.loss(frames)
    for _ in range(2):  # the backward recompute must not leave a stale capture for the next step
        prediction = forward(transformer, batch)
        (prediction.pow(2).mean() + crepa.loss(frames)).backward()
    assert crepa._hidden == [] and crepa._calls == []


def test_configuration_errors_name_the_key(dino_folder):
    transformer = tiny_transformer()
    with pytest.raises(ValueError, match="crepa_block_index 8 is out of range.*2 blocks"):
        visual_crepa(dino_folder, transformer, crepa_block_index=8)
    with pytest.raises(ValueError, match="crepa_encoder_image_size 60 is not a multiple.*56 or 70"):
        visual_crepa(dino_folder, transformer, crepa_encoder_image_size=60)


def test_drop_vae_encoder_frees_weights_and_keeps_decoding():
    from difftune.testing.kandinsky5_video import tiny_hunyuan_video_vae

    vae = tiny_hunyuan_video_vae()
    total = sum(p.numel() for p in vae.parameters())
    expected = sum(p.numel() for p in vae.encoder.parameters()) + sum(
        p.numel() for p in vae.quant_conv.parameters()
    )
    assert drop_vae_encoder(vae) == expected
    assert sum(p.numel() for p in vae.parameters()) == total - expected
    with torch.no_grad():
        assert vae.decode(torch.randn(1, 16, 2, 2, 2)).sample.shape == (1, 3, 5, 16, 16)
        with pytest.raises(RuntimeError, match="crepa_drop_vae_encoder"):
            vae.encode(torch.randn(1, 3, 5, 16, 16))
    assert drop_vae_encoder(vae) == 0


def test_drop_vae_encoder_frees_the_parts_the_family_names_and_warns_when_the_vae_has_none():
    from difftune.events import warnings_to
    from difftune.testing.kandinsky5_video import tiny_hunyuan_video_vae

    vae = tiny_hunyuan_video_vae()
    quant_conv, encoder = (sum(p.numel() for p in m.parameters()) for m in (vae.quant_conv, vae.encoder))
    assert drop_vae_encoder(vae, ("quant_conv",)) == quant_conv
    assert sum(p.numel() for p in vae.encoder.parameters()) == encoder  # a part not named stays

    seen = []
    with warnings_to(lambda kind, data: seen.append((kind, data["message"]))):
        assert drop_vae_encoder(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0
    assert len(seen) == 1 and seen[0][0] == "warning"
    assert "Sequential" in seen[0][1] and "encoder or quant_conv" in seen[0][1]


def test_crepa_block_inside_a_tread_route_is_refused_once_negative_indices_resolve(dino_folder):
    from difftune.errors import ConfigError

    transformer = tiny_transformer()
    blocks = len(transformer.visual_transformer_blocks)
    route = {
        "selection_ratio": 0.5,
        "start_layer_idx": 1,
        "end_layer_idx": -1,
    }  # signs differ: unknowable at load
    config = crepa_config(dino_folder, crepa_block_index=-1, tread_config={"routes": [route]})
    with pytest.raises(ConfigError, match=r"'crepa_block_index' is -1, inside tread_config.routes\[0\]"):
        Crepa(
            config,
            transformer,
            k5.find_visual_blocks(transformer),
            "cpu",
            token_grid=GRID,
            frames_per_latent=4,
            projector_width=64,
        )
    before = {**route, "start_layer_idx": -(blocks - 1)}  # the route starts after block 0
    config = crepa_config(dino_folder, crepa_block_index=0, tread_config={"routes": [before]})
    Crepa(
        config, transformer, k5.find_visual_blocks(transformer), "cpu", token_grid=GRID, frames_per_latent=4
    )


def test_crepa_without_a_token_grid_is_refused_at_set_up(dino_folder):
    from difftune.errors import ConfigError

    transformer = tiny_transformer()
    with pytest.raises(
        ConfigError, match="crepa_enabled: the family of Kandinsky5Transformer3DModel .*remove crepa_enabled"
    ):
        Crepa(
            crepa_config(dino_folder), transformer, k5.find_visual_blocks(transformer), "cpu", token_grid=None
        )


def test_visual_grid_undoes_the_tiled_token_order_of_sparse_attention():
    from diffusers.models.transformers.transformer_kandinsky import fractal_flatten

    transformer = tiny_transformer()  # patches of (1, 2, 2) latent cells
    hidden = torch.zeros(2, 2, 32, 32, 16)
    grid = torch.randn(2, 2, 16, 16, 8)
    tiled, _ = fractal_flatten(grid, grid, grid.shape[:-1], block_mask=True)
    layout = GRID.layout_of_call(
        transformer, (), {"hidden_states": hidden, "sparse_params": {"to_fractal": True}}
    )
    assert torch.equal(layout(tiled), grid)
    plain = GRID.layout_of_call(transformer, (hidden,), {})
    assert torch.equal(plain(grid.flatten(1, 3)), grid)
    assert not torch.equal(plain(tiled), grid)
