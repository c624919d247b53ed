import itertools
from collections import Counter

import pytest

from difftune.data.errors import DatasetTooSmall
from difftune.data.sampler import BucketBatchSampler, SampleGroup, check_enough_samples, usable_batches


def _groups():
    return [
        SampleGroup("a", {(64, 64): list(range(0, 10)), (96, 64): list(range(10, 17))}),
        SampleGroup("b", {(64, 64): list(range(17, 25))}, repeats=1),
    ]


def _bucket_of(groups):
    return {i: (g.dataset_id, bucket) for g in groups for bucket, ix in g.buckets.items() for i in ix}


def test_every_batch_is_one_bucket_of_one_dataset_and_incomplete_batches_are_dropped():
    groups = _groups()
    sampler = BucketBatchSampler(groups, batch_size=3, seed=1)
    # a: 10 -> 3 batches, 7 -> 2 batches; b: 8 samples twice = 16 -> 5 batches
    assert sampler.batches_per_epoch == 10 == usable_batches(groups, 3) == len(sampler)
    batches = list(sampler)
    assert len(batches) == 10 and all(len(b) == 3 for b in batches)
    where = _bucket_of(groups)
    assert all(len({where[i] for i in batch}) == 1 for batch in batches)


def test_repeats_show_samples_repeats_plus_one_times():
    groups = [SampleGroup("r", {(64, 64): list(range(6))}, repeats=2)]
    counts = Counter(i for batch in BucketBatchSampler(groups, 2, seed=0) for i in batch)
    assert counts == {i: 3 for i in range(6)}


def test_order_is_a_function_of_seed_and_epoch():
    first = BucketBatchSampler(_groups(), 2, seed=5)
    second = BucketBatchSampler(_groups(), 2, seed=5)
    assert list(itertools.islice(first.iter_forever(), 40)) == list(
        itertools.islice(second.iter_forever(), 40)
    )
    assert first.epoch_batches(0) != first.epoch_batches(1)
    assert first.epoch_batches(0) != BucketBatchSampler(_groups(), 2, seed=6).epoch_batches(0)


def test_resume_from_state_dict_continues_exactly():
    reference = list(itertools.islice(BucketBatchSampler(_groups(), 2, seed=3).iter_forever(), 40))
    for stop in (1, 7, 16, 17, 25):  # 16/17 cross an epoch boundary (16 batches per epoch)
        sampler = BucketBatchSampler(_groups(), 2, seed=3)
        stream = sampler.iter_forever()
        taken = [next(stream) for _ in range(stop)]
        state = sampler.state_dict()
        resumed = BucketBatchSampler(_groups(), 2, seed=3)
        resumed.load_state_dict(state)
        rest = list(itertools.islice(resumed.iter_forever(), 40 - stop))
        assert taken + rest == reference, stop
    with pytest.raises(ValueError, match="seed 3 but this run uses seed 4"):
        BucketBatchSampler(_groups(), 2, seed=4).load_state_dict(state)


def test_last_position_tracks_the_batch_handed_out():
    sampler = BucketBatchSampler(_groups(), 2, seed=0)
    stream = sampler.iter_forever()
    positions = []
    for _ in range(sampler.batches_per_epoch + 2):
        next(stream)
        positions.append(sampler.last_position)
    assert positions[0] == (0, 0) and positions[-1] == (1, 1)


def test_probability_weights_which_dataset_comes_first():
    big = [
        SampleGroup("often", {(64, 64): list(range(100))}, probability=9.0),
        SampleGroup("rarely", {(64, 64): list(range(100, 200))}, probability=1.0),
    ]
    sampler = BucketBatchSampler(big, 1, seed=0)
    first_half = sampler.epoch_batches(0)[:100]
    often = sum(1 for b in first_half if b[0] < 100)
    assert often >= 80
    never = [SampleGroup("on", {(64, 64): [0, 1]}), SampleGroup("off", {(64, 64): [2, 3]}, probability=0.0)]
    assert sorted(i for b in BucketBatchSampler(never, 1, seed=0) for i in b) == [0, 1]


def test_processes_take_their_rows_of_the_global_batches_and_resume_at_the_same_position():
    whole = BucketBatchSampler(_groups(), 4, seed=9)
    parts = [BucketBatchSampler(_groups(), 4, seed=9, rows=slice(2 * p, 2 * p + 2)) for p in (0, 1)]
    for epoch in (0, 1):
        rows = [part.epoch_batches(epoch) for part in parts]
        assert [a + b for a, b in zip(*rows)] == whole.epoch_batches(epoch)
    assert all(part.batches_per_epoch == whole.batches_per_epoch == 7 for part in parts)
    stream = parts[1].iter_forever()
    next(stream)
    # the position is the global one, saved under the keys checkpoints hold
    assert parts[1].state_dict() == {"epoch": 0, "batch_index": 1, "seed": 9}
    resumed = BucketBatchSampler(_groups(), 4, seed=9, rows=slice(2, 4))
    resumed.load_state_dict(parts[1].state_dict())
    assert next(resumed.iter_forever()) == next(stream)


def test_dataset_too_small_says_usable_needed_and_short():
    groups = [
        SampleGroup("tiny", {(64, 64): [0, 1, 2], (96, 64): [3, 4]}),
        SampleGroup("other", {(64, 64): [5]}),
    ]
    check_enough_samples(groups, batch_size=2, gradient_accumulation_steps=2, num_processes=1)
    # two processes train on global batches of 4 from one bucket: no bucket holds 4
    with pytest.raises(DatasetTooSmall) as caught:
        check_enough_samples(groups, batch_size=2, gradient_accumulation_steps=2, num_processes=2)
    message = str(caught.value)
    assert "'tiny', 'other'" in message and "give 0 usable samples" in message and "batches of 4" in message
    assert "needs 8 (train_batch_size 2 x gradient_accumulation_steps 2 x 2 process(es)): 8 short" in message
    with pytest.raises(DatasetTooSmall):
        next(BucketBatchSampler([SampleGroup("x", {(1, 1): [0]})], 2, seed=0).iter_forever())
