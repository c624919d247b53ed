from pathlib import Path

import pytest

from difftune.config.schema import DatasetConfig
from difftune.data.buckets import plan_sample, plan_samples
from difftune.data.discovery import SampleInfo
from difftune.data.errors import DataError, SampleRejected

SIZES = [(1024, 1024), (3000, 2000), (2000, 3000), (640, 480), (4096, 1024), (500, 1600)]
CROPS = [
    {"crop": False},
    {"crop": True, "crop_aspect": "square", "crop_style": "center"},
    {"crop": True, "crop_aspect": "preserve", "crop_style": "random"},
    {"crop": True, "crop_aspect": "closest", "crop_aspect_buckets": [1.0, 1.5, 0.75], "crop_style": "corner"},
    {"crop": True, "crop_aspect": "random", "crop_aspect_buckets": [1.0, 1.5, 0.75], "crop_style": "centre"},
]
RESOLUTIONS = [("pixel", 512), ("area", 0.25), ("pixel_area", 512), ("pixel_area", 1000)]


def _sample(size, name="img.png") -> SampleInfo:
    return SampleInfo(
        path=Path("/data") / name,
        relative_path=name,
        width=size[0],
        height=size[1],
        size_bytes=100,
        mtime_ns=1,
    )


def _dataset(**kwargs) -> DatasetConfig:
    return DatasetConfig(id="d", instance_data_dir="/data", **kwargs)


@pytest.mark.parametrize("crop", CROPS, ids=lambda c: f"{c.get('crop_aspect', 'nocrop')}")
@pytest.mark.parametrize(("resolution_type", "resolution"), RESOLUTIONS)
@pytest.mark.parametrize("multiple", [64, 16])
def test_buckets_are_multiples_within_limits_and_crops_fit(crop, resolution_type, resolution, multiple):
    dataset = _dataset(resolution=resolution, resolution_type=resolution_type, **crop)
    for size in SIZES:
        plan = plan_sample(_sample(size), dataset, multiple, seed=0)
        width, height = plan.bucket
        assert width % multiple == 0 and height % multiple == 0 and min(width, height) >= multiple
        if resolution_type == "pixel":
            assert min(width, height) <= resolution
        else:
            area = resolution * 1024 * 1024 if resolution_type == "area" else resolution**2
            assert width * height <= area
        left, top, crop_w, crop_h = plan.crop_box
        assert (crop_w, crop_h) == plan.bucket
        assert (
            0 <= left
            and left + crop_w <= plan.resize_to[0]
            and 0 <= top
            and top + crop_h <= plan.resize_to[1]
        )
        # the resize keeps the aspect ratio (to within a pixel)
        assert abs(plan.resize_to[0] / plan.resize_to[1] - size[0] / size[1]) < 2 / min(plan.resize_to)
        assert plan.original_size == size


def test_no_crop_bucket_keeps_the_aspect_and_trims_less_than_a_multiple():
    plan = plan_sample(_sample((3000, 2000)), _dataset(resolution=1024, resolution_type="pixel_area"), 64, 0)
    assert plan.bucket == (1216, 832)  # sqrt(1024^2 * 1.5) = 1254 -> 1216; 836 -> 832
    assert plan.resize_to[0] - plan.bucket[0] < 64 and plan.resize_to[1] - plan.bucket[1] < 64
    assert plan.crop_top_left == ((plan.resize_to[1] - 832) // 2, (plan.resize_to[0] - 1216) // 2)


def test_pixel_resolution_sets_the_short_edge():
    plan = plan_sample(_sample((2000, 1000)), _dataset(resolution=512, resolution_type="pixel"), 64, 0)
    assert plan.bucket == (1024, 512) and plan.resize_to == (1024, 512) and plan.crop_box == (0, 0, 1024, 512)


def test_square_crop_and_closest_aspect():
    square = plan_sample(
        _sample((3000, 2000)),
        _dataset(
            resolution=512, resolution_type="pixel", crop=True, crop_aspect="square", crop_style="center"
        ),
        64,
        0,
    )
    assert (
        square.bucket == (512, 512)
        and square.resize_to == (768, 512)
        and square.crop_box == (128, 0, 512, 512)
    )
    closest = plan_sample(
        _sample((1900, 1000)),
        _dataset(
            resolution=512,
            resolution_type="pixel",
            crop=True,
            crop_aspect="closest",
            crop_aspect_buckets=[1.0, 1.5, 2.0, 0.5],
        ),
        64,
        0,
    )
    assert closest.bucket == (1024, 512)


def test_random_crops_are_deterministic_per_seed_and_path():
    dataset = _dataset(
        resolution=256,
        resolution_type="pixel",
        crop=True,
        crop_aspect="random",
        crop_aspect_buckets=[1.0, 0.5, 2.0],
        crop_style="random",
    )
    sample = _sample((4000, 3000))
    first = plan_sample(sample, dataset, 64, seed=7)
    assert plan_sample(sample, dataset, 64, seed=7) == first
    plans = {plan_sample(_sample((4000, 3000), f"img{i}.png"), dataset, 64, seed=7) for i in range(30)}
    assert len({p.crop_box for p in plans}) > 5 and len({p.bucket for p in plans}) == 3


def test_too_small_and_aspect_limits_are_skipped_with_reasons():
    dataset = _dataset(
        resolution=512,
        resolution_type="pixel",
        minimum_image_size=400,
        minimum_aspect_ratio=0.5,
        maximum_aspect_ratio=2.0,
    )
    samples = [
        _sample((600, 500), "ok.png"),
        _sample((300, 900), "small.png"),
        _sample((2000, 500), "wide.png"),
        _sample((500, 1200), "tall.png"),
    ]
    plans, skipped = plan_samples(samples, dataset, 64, 0)
    assert [p.relative_path for p in plans] == ["ok.png"]
    reasons = {path.name: reason for path, reason in skipped}
    assert reasons["small.png"].startswith(
        "too small: 300x900 is 300 px short edge, below minimum_image_size 400"
    )
    assert "above maximum_aspect_ratio 2" in reasons["wide.png"]
    assert "below minimum_aspect_ratio 0.5" in reasons["tall.png"]
    with pytest.raises(SampleRejected, match="megapixels"):
        plan_sample(
            _sample((100, 100)),
            _dataset(resolution_type="area", resolution=1.0, minimum_image_size=0.5),
            64,
            0,
        )


def test_target_downsample_size_sets_the_scale_of_the_crop():
    common = {
        "resolution": 512,
        "resolution_type": "pixel",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
    }
    plain = plan_sample(_sample((4000, 3000)), _dataset(**common), 64, 0)
    assert plain.resize_to == (683, 512)  # covering resize: the crop sees most of the picture
    down = plan_sample(
        _sample((4000, 3000)), _dataset(maximum_image_size=2000, target_downsample_size=1024, **common), 64, 0
    )
    assert down.resize_to == (1365, 1024) and down.bucket == (512, 512)
    assert down.crop_box == ((1365 - 512) // 2, (1024 - 512) // 2, 512, 512)
    below = plan_sample(
        _sample((1500, 1000)), _dataset(maximum_image_size=2000, target_downsample_size=1024, **common), 64, 0
    )
    assert below.resize_to == (768, 512)  # not above maximum_image_size: untouched


def test_resolution_below_the_multiple_is_an_error():
    with pytest.raises(DataError, match="resolution 32 .*raise resolution"):
        plan_sample(_sample((100, 100)), _dataset(resolution=32, resolution_type="pixel"), 64, 0)
