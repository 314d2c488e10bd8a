"""DistributedSampler: which sample indices each rank takes in an epoch (PyTorch's semantics).

Every rank draws the same permutation of ``range(len(dataset))`` from ``seed + epoch``, pads it
by wrapping around to a multiple of the number of replicas (or, with ``drop_last``, cuts it
down to one), and rank r takes every ``num_replicas``-th index starting at r. So the ranks'
index sets partition the (padded) epoch: every sample is seen once per epoch across ranks.

The permutation comes from numpy's ``Generator(PCG64(seed + epoch))``, so for the same seed it
differs from the one ``torch.utils.data.DistributedSampler`` draws with ``torch.randperm``;
everything else (lengths, padding, striding) is the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy

__all__ = ["DistributedSampler"]


def _length(dataset: Any) -> int:
    if isinstance(dataset, (int, numpy.integer)) and not isinstance(dataset, bool):
        n = int(dataset)
    elif hasattr(dataset, "__len__"):
        n = len(dataset)
    else:
        raise TypeError(f"dataset must have a length (or be an int), got {type(dataset).__name__}")
    if n < 0:
        raise ValueError(f"dataset length must be non-negative, got {n}")
    return n


class DistributedSampler:
    """The indices of one rank's share of a data set, epoch by epoch.

    Args:
        dataset: anything with ``len()``, or the number of samples as an int.
        num_replicas: the number of ranks sharing the data (default: the world's size).
        rank: this rank, in ``0 .. num_replicas-1`` (default: this process's rank).
        shuffle: draw a new permutation every epoch; False keeps ``0, 1, 2, ...``.
        seed: the base of every epoch's permutation; must be the same on every rank.
        drop_last: drop the tail so every rank gets the same number of distinct samples,
            instead of padding with samples from the start of the epoch.

    Example:
        >>> sampler = DistributedSampler(10, num_replicas=3, rank=1, shuffle=False)
        >>> list(sampler), len(sampler)
        ([1, 4, 7, 0], 4)
        >>> sampler.set_epoch(1)  # call at the start of every epoch when shuffling
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if num_replicas is None or rank is None:
            from dptrain.worker.comm import Communicator

            comm = Communicator()
            num_replicas = comm.size if num_replicas is None else num_replicas
            rank = comm.rank if rank is None else rank
        if not isinstance(num_replicas, (int, numpy.integer)) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if not isinstance(rank, (int, numpy.integer)) or not 0 <= rank < num_replicas:
            raise ValueError(
                f"Invalid rank {rank!r}, rank should be in the interval [0, {num_replicas - 1}]")
        if not isinstance(seed, (int, numpy.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        n = _length(dataset)
        if self.drop_last and n % self.num_replicas != 0:
            self.num_samples = math.ceil((n - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration draws. Call it with the same
        value on every rank at the start of each epoch, or every epoch repeats the first.

        Args:
            epoch: a non-negative int.
        """
        if not isinstance(epoch, (int, numpy.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = int(epoch)

    def epoch_indices(self) -> numpy.ndarray:
        """The whole epoch's order, padded or cut to ``num_samples * num_replicas`` indices
        (the same on every rank).

        Returns:
            An int64 array.
        """
        n = _length(self.dataset)
        if self.shuffle:
            rng = numpy.random.Generator(numpy.random.PCG64(self.seed + self.epoch))
            order = rng.permutation(n).astype(numpy.int64, copy=False)
        else:
            order = numpy.arange(n, dtype=numpy.int64)
        if self.drop_last or n == 0:
            return order[:self.total_size]
        # Wrap around as often as needed (more than once when the set is smaller than the ranks).
        return numpy.resize(order, self.total_size)

    def indices(self) -> numpy.ndarray:
        """This rank's indices for the current epoch, in order, for vectorized gathering
        (``x[sampler.indices()]``).

        Returns:
            An int64 array of ``len(self)`` indices.
        """
        return self.epoch_indices()[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples
