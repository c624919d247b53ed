from dataclasses import replace
from pathlib import Path

import pytest
import torch

from difftune.cache.latents import CacheMiss, LatentCache
from difftune.data.buckets import SamplePlan


def _plan(name="a.png", **changes) -> SamplePlan:
    plan = SamplePlan(
        path=Path("/data") / name,
        relative_path=name,
        dataset_id="d",
        original_size=(300, 200),
        resize_to=(96, 64),
        crop_box=(16, 0, 64, 64),
        bucket=(64, 64),
        size_bytes=10,
        mtime_ns=5,
    )
    return replace(plan, **changes)


def test_roundtrip_stores_bf16_returns_float32_with_time_id_sizes(tmp_path):
    cache = LatentCache(tmp_path, "vae-1")
    latents = torch.randn(2, 4, 8, 8)
    plans = [_plan("a.png"), _plan("b.png")]
    cache.write(plans, latents)
    entry = cache.load(plans[1])
    assert entry.latents.dtype == torch.float32
    assert torch.allclose(entry.latents, latents[1], atol=0.02) and not torch.equal(entry.latents, latents[1])
    assert (
        entry.original_size == (200, 300) and entry.crop_top_left == (0, 16) and entry.target_size == (64, 64)
    )
    from safetensors import safe_open

    with safe_open(str(cache.path_for(plans[0])), "pt") as handle:
        assert handle.get_tensor("latents").dtype == torch.bfloat16


def test_fp16_storage(tmp_path):
    cache = LatentCache(tmp_path, "vae-1", dtype="fp16")
    cache.write([_plan()], [torch.ones(4, 2, 2) / 3])
    from safetensors import safe_open

    with safe_open(str(cache.path_for(_plan())), "pt") as handle:
        assert handle.get_tensor("latents").dtype == torch.float16
    with pytest.raises(ValueError, match="use bf16 or fp16"):
        LatentCache(tmp_path, "vae-1", dtype="int8")


@pytest.mark.parametrize(
    "change",
    [
        {"mtime_ns": 6},
        {"size_bytes": 11},
        {"resize_to": (97, 64)},
        {"crop_box": (0, 0, 64, 64)},
        {"bucket": (64, 48), "crop_box": (16, 0, 64, 48)},
        {"path": Path("/data/other.png")},
    ],
)
def test_any_change_of_source_or_geometry_is_a_miss(tmp_path, change):
    cache = LatentCache(tmp_path, "vae-1")
    cache.write([_plan()], [torch.zeros(4, 2, 2)])
    assert cache.missing([_plan()]) == []
    assert cache.missing([_plan(**change)]) == [_plan(**change)]
    assert LatentCache(tmp_path, "vae-2").missing([_plan()]) == [_plan()]


def test_corrupt_entry_is_deleted_and_missing(tmp_path):
    cache = LatentCache(tmp_path, "vae-1")
    cache.write([_plan("a.png"), _plan("b.png")], torch.zeros(2, 4, 2, 2))
    broken = cache.path_for(_plan("a.png"))
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(CacheMiss):
        cache.load(_plan("a.png"))
    assert not broken.exists()
    assert cache.missing([_plan("a.png"), _plan("b.png")]) == [_plan("a.png")]
