"""DistributedSampler: PyTorch's partition semantics, as properties over sizes and ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dptrain.worker import DistributedSampler

sizes = st.integers(min_value=0, max_value=300)
replicas = st.integers(min_value=1, max_value=9)
seeds = st.integers(min_value=0, max_value=2**32)
epochs = st.integers(min_value=0, max_value=1000)


def shares(n, num_replicas, **kwargs) -> list[list[int]]:
    return [list(DistributedSampler(n, num_replicas, r, **kwargs)) for r in range(num_replicas)]


@settings(max_examples=150, deadline=None)
@given(n=sizes, num_replicas=replicas, seed=seeds, epoch=epochs, shuffle=st.booleans())
def test_padded_shares_cover_every_index_in_equal_lengths(n, num_replicas, seed, epoch,
                                                          shuffle):
    samplers = [DistributedSampler(n, num_replicas, r, shuffle=shuffle, seed=seed)
                for r in range(num_replicas)]
    for s in samplers:
        s.set_epoch(epoch)
    parts = [list(s) for s in samplers]
    expected_len = math.ceil(n / num_replicas)
    assert all(len(p) == expected_len == len(s) for p, s in zip(parts, samplers))
    flat = sum(parts, [])
    assert set(flat) == set(range(n))  # every sample seen
    if n % num_replicas == 0:
        assert sorted(flat) == list(range(n))  # disjoint: no padding needed
    else:  # padding wraps around: no sample is repeated more than once more than another
        counts = np.bincount(flat, minlength=n)
        assert counts.max() - counts.min() <= 1


@settings(max_examples=150, deadline=None)
@given(n=sizes, num_replicas=replicas, seed=seeds, shuffle=st.booleans())
def test_drop_last_shares_are_disjoint_and_equal(n, num_replicas, seed, shuffle):
    parts = shares(n, num_replicas, seed=seed, shuffle=shuffle, drop_last=True)
    flat = sum(parts, [])
    assert all(len(p) == n // num_replicas for p in parts)
    assert len(set(flat)) == len(flat) == num_replicas * (n // num_replicas)
    assert all(0 <= i < n for i in flat)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=10, max_value=300), num_replicas=replicas, seed=seeds,
       epoch=epochs)
def test_each_epoch_is_deterministic_and_differs_from_the_next(n, num_replicas, seed, epoch):
    a = DistributedSampler(n, num_replicas, 0, seed=seed)
    b = DistributedSampler(n, num_replicas, num_replicas - 1, seed=seed)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    # Every rank draws the same epoch order, whichever rank it is.
    np.testing.assert_array_equal(a.epoch_indices(), b.epoch_indices())
    first = a.epoch_indices()
    a.set_epoch(epoch)
    np.testing.assert_array_equal(a.epoch_indices(), first)
    a.set_epoch(epoch + 1)
    assert not np.array_equal(a.epoch_indices(), first)  # 10! orders: equal by chance ~never


def test_unshuffled_shares_by_hand():
    # 10 samples on 3 ranks: 12 slots, padded with samples 0 and 1 (PyTorch's wrap-around).
    assert shares(10, 3, shuffle=False) == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    assert shares(10, 3, shuffle=False, drop_last=True) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    # Fewer samples than ranks: wrap around more than once.
    assert shares(2, 5, shuffle=False) == [[0], [1], [0], [1], [0]]
    assert shares(0, 2, shuffle=False) == [[], []]


def test_shuffled_order_is_numpy_pcg64_of_seed_plus_epoch():
    s = DistributedSampler(8, 2, 1, seed=3)
    s.set_epoch(4)
    order = np.random.Generator(np.random.PCG64(7)).permutation(8)
    assert list(s) == order[1::2].tolist()


def test_indices_is_the_vectorized_form():
    s = DistributedSampler(range(11), 4, 2, seed=1)
    idx = s.indices()
    assert idx.dtype == np.int64 and idx.tolist() == list(s)
    data = np.arange(11) * 10
    assert data[idx].tolist() == [10 * i for i in s]


def test_matches_torch_when_not_shuffled():
    torch_data = pytest.importorskip("torch.utils.data")
    for n in range(0, 14):
        for num_replicas in range(1, 5):
            for drop_last in (False, True):
                for r in range(num_replicas):
                    theirs = torch_data.DistributedSampler(
                        range(n), num_replicas, r, shuffle=False, drop_last=drop_last)
                    ours = DistributedSampler(n, num_replicas, r, shuffle=False,
                                              drop_last=drop_last)
                    assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Invalid rank 3"):
        DistributedSampler(10, num_replicas=3, rank=3)
    with pytest.raises(ValueError, match="num_replicas"):
        DistributedSampler(10, num_replicas=0, rank=0)
    with pytest.raises(TypeError, match="length"):
        DistributedSampler(object(), num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="epoch"):
        DistributedSampler(10, 1, 0).set_epoch(-1)
    with pytest.raises(ValueError, match="seed"):
        DistributedSampler(10, 1, 0, seed=-1)
