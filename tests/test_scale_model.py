"""bench/scale_model.py's model, against hand-computed schedules and a synthetic fit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scale_model as sm  # noqa: E402

NET = sm.Network(alpha=1e-3, beta=1e-8, local_alpha=1e-4, local_beta=1e-9, ranks_per_node=8)


def test_ring_time_is_the_latency_and_bandwidth_terms():
    assert sm.ring_time(1e6, 4, 1e-5, 1e-9) == pytest.approx(6e-5 + 1.5e-3)
    assert sm.ring_time(1e6, 1, 1e-5, 1e-9) == 0.0


def test_reduce_time_of_each_algorithm():
    n, p = 8e6, 16  # 2 nodes of 8
    ring = 2 * 15 * 1e-3 + 2 * 15 / 16 * n * 1e-8
    local = 2 * 7 * 1e-4 + 2 * 7 / 8 * n * 1e-9
    across = 2 * 1 * 1e-3 + 2 * 1 / 2 * n * 1e-8
    assert sm.reduce_time("ring", n, p, NET) == pytest.approx(ring)
    assert sm.reduce_time("hierarchical", n, p, NET) == pytest.approx(local + across)
    assert sm.reduce_time("compressed", n, p, NET, 1e-10) == pytest.approx(
        2 * 15 * 1e-3 + 2 * 15 / 16 * n / 2 * 1e-8 + n * 1e-10)
    assert sm.reduce_time("hierarchical+compressed", n, p, NET, 1e-10) == pytest.approx(
        local + 2 * 1e-3 + n / 2 * 1e-8 + n * 1e-10)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        sm.reduce_time("tree", n, p, NET)


def test_buckets_start_with_the_small_first_one():
    mib = 1024 * 1024
    assert sm.bucket_sizes(60 * mib, 25 * mib, mib) == [mib, 25 * mib, 25 * mib, 9 * mib]
    assert sm.bucket_sizes(60 * mib, 25 * mib) == [25 * mib, 25 * mib, 10 * mib]


def test_step_overlaps_reductions_with_backward_one_at_a_time():
    # 4 buckets of 1e6 bytes ready at 10, 20, 30, 40 ms; each reduction takes
    # 2·1 ms + 1e6·1e-8 s = 12 ms: they end at 22, 34, 46, 58 ms; forward adds 10 ms.
    net = sm.Network(alpha=1e-3, beta=1e-8, local_alpha=0, local_beta=0)
    args = (1e6, 0.01, 0.04, 2, net, "ring", 1e6)
    assert sm.step_time(*args) == pytest.approx(0.068)
    assert sm.step_time(*args, overlap=False) == pytest.approx(0.01 + 0.04 + 4 * 0.012)


def test_fusion_picks_the_bucket_size_of_the_shortest_step():
    args = (25.6e6, 0.01, 0.02, 512, NET, "ring")
    mb, best = sm.best_fusion(*args)
    assert best == min(sm.step_time(*args, m * 1024 * 1024) for m in sm.FUSION_CANDIDATES_MB)
    assert best == sm.step_time(*args, mb * 1024 * 1024)


def test_fit_recovers_alpha_and_beta_from_exact_timings():
    sizes = [4 * 4 ** k for k in range(12)]
    for p in (2, 4):
        times = [sm.ring_time(n, p, 7e-6, 3e-10) for n in sizes]
        alpha, beta = sm.fit_alpha_beta(sizes, times, p)
        assert alpha == pytest.approx(7e-6, rel=1e-6)
        assert beta == pytest.approx(3e-10, rel=1e-6)
