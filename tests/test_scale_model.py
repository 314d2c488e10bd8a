"""bench/scale_model.py's model, against hand-computed schedules and a synthetic fit, and the
pure parts of its check on namespace hosts (bench/scale_check_netns.py): the tc commands,
the fit over given timings and the comparison tables, against hand-computed values."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from netns import HostNetwork, shape_commands, unavailable


def _load(name: str):
    # Loaded from its file, not through sys.path: bench/ holds modules named like the
    # package's folders (bench/engine.py), which must not shadow anything for the tests
    # collected after this.
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses
    spec.loader.exec_module(module)
    return module


sm = _load("scale_model")
check = _load("scale_check_netns")

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


def test_fit_on_absolute_errors_is_the_least_squares_line():
    # t = a + b·n through (0, 1), (1, 2), (2, 4): b = Σ(n-1)(t-7/3) / Σ(n-1)² = 3/2,
    # a = 7/3 - 3/2 = 5/6; on 2 ranks α = a/2, β = b.
    alpha, beta = sm.fit_alpha_beta([0, 1, 2], [1, 2, 4], 2, relative=False)
    assert alpha == pytest.approx(5 / 12)
    assert beta == pytest.approx(1.5)
    # On relative errors the small times weigh more: the line bends towards (0, 1).
    alpha_rel, _ = sm.fit_alpha_beta([0, 1, 2], [1, 2, 4], 2)
    assert alpha_rel > alpha


def test_fit_on_three_hosts_recovers_the_shaped_link():
    # A ring on 3 ranks over links of 50 µs and 1 Gb/s (8 ns per byte), as timed.
    sizes = [4 * 4 ** k for k in range(12)]
    times = [4 * 50e-6 + 4 / 3 * n * 8e-9 for n in sizes]
    for relative in (True, False):
        alpha, beta = sm.fit_alpha_beta(sizes, times, 3, relative)
        assert alpha == pytest.approx(50e-6, rel=1e-6)
        assert beta == pytest.approx(8e-9, rel=1e-6)


def test_tc_shapes_the_rate_with_a_token_bucket_of_4_ms():
    # 1 Gb/s: 4 ms are 1e9 / 8 · 4e-3 = 500000 bytes; 100 Mb/s: 50000, below the 64 KiB floor.
    assert shape_commands("eth0", 1e9) == [
        ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "1000000000bit",
         "burst", "500000", "latency", "100ms"]]
    assert shape_commands("eth0", 100e6)[0][-5:] == ["100000000bit", "burst", "65536",
                                                     "latency", "100ms"]


def test_tc_delays_with_netem_above_the_token_bucket():
    assert shape_commands("eth0", 300e6, 200e-6) == [
        ["tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "netem", "delay",
         "200us"],
        ["tc", "qdisc", "replace", "dev", "eth0", "parent", "1:1", "handle", "10:", "tbf",
         "rate", "300000000bit", "burst", "150000", "latency", "100ms"]]


def test_shape_puts_the_token_bucket_on_the_hosts_link():
    reason = unavailable() or (shutil.which("tc") is None and "needs the 'tc' command "
                               "(Debian: apt-get install iproute2)")
    if reason:
        pytest.skip(f"shaping a namespace host's link: {reason}")
    net = HostNetwork.create(1)
    try:
        host = net.hosts[0]
        net.shape(host, 300e6)
        shown = net.run_in(host, "tc qdisc show dev eth0").stdout
        found = re.search(r"qdisc tbf \S+ root .*rate 300Mbit burst (\d+)b lat 100ms", shown)
        assert found, shown
        # tc stores the burst in its clock's ticks: 150000 bytes come back within a tick's worth.
        assert abs(int(found.group(1)) - 150000) < 150, shown
        try:
            net.shape(host, 300e6, 200e-6)
        except RuntimeError as e:  # a kernel without netem (CONFIG_NET_SCH_NETEM unset)
            assert f"netem delay 200us on {host}: " in str(e)
            assert "qdisc kind is unknown" in str(e)
        else:
            shown = net.run_in(host, "tc qdisc show dev eth0").stdout
            assert re.search(r"qdisc netem 1: root .*delay 200us", shown), shown
            assert re.search(r"qdisc tbf 10: parent 1:1 .*rate 300Mbit", shown), shown
    finally:
        net.remove()


def test_link_settings_parse_and_name_the_field_when_wrong():
    assert check.parse_link("1000/200") == (1e9, pytest.approx(200e-6))
    assert check.parse_link("300") == (300e6, 0.0)
    assert check.describe_link(1e9, 200e-6) == "1000 Mb/s, 200 µs"
    assert check.describe_link(300e6, 0.0) == "300 Mb/s"
    with pytest.raises(argparse.ArgumentTypeError, match=r"--links: .*MBIT\[/DELAY_US\].*'fast'"):
        check.parse_link("fast")
    with pytest.raises(argparse.ArgumentTypeError, match=r"--links: the rate must be > 0.*'0/5'"):
        check.parse_link("0/5")
    assert check.parse_hosts("2,3") == [2, 3]
    for wrong in ("1,2", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=r"--hosts: .*at least 2, got"):
            check.parse_hosts(wrong)


def test_shaped_against_fitted_rows():
    # β shaped: 8 bits / 1 Gb/s = 8000 ps per byte; the smallest all-reduce over the ring's
    # 2(p-1) steps: 100 µs / 2 on 2 ranks, 200 µs / 4 on 3.
    m = {"alpha": 50e-6, "beta": 1e-8, "allreduce": {4: 1e-4, 1024: 3e-4}}
    assert check.shaped_rows(m, 2, 1e9, 200e-6)[2:] == [
        "| β (fitted), ps/byte | 8000.0 | 10000.0 | 1.25 |",
        "| α (fitted), µs | 200.0 | 50.00 | 0.25 |",
        "| 4 B all-reduce / 2(p-1), µs | 200.0 | 50.00 | 0.25 |"]
    m["allreduce"] = {16: 3e-4, 4: 2e-4}
    assert check.shaped_rows(m, 3, 1e9, 0.0)[4] == (
        "| 4 B all-reduce / 2(p-1), µs | 0.0 | 50.00 |  |")


def test_check_rows_against_a_hand_computed_schedule():
    # 10M parameters = 4e7 bytes in DDP's default buckets: 25 MiB = 26214400, then 13785600.
    # Backward 40 ms hands them over at 26.2144 ms and 40 ms; the rest of the step is 20 ms.
    # Ring on 2 ranks, α = 100 µs, β = 1 ns/byte: 0.2 ms + n ns per bucket:
    #   26.4144 and 13.9856 ms; with overlap they end at 52.6288 and 66.6144 ms → 86.6144 ms;
    #   without, 20 + 40 + 26.4144 + 13.9856 = 100.4 ms.
    # One rank per host: hierarchical is the same ring over the two leaders.
    # Compressed: half the bytes plus 0.1 ns/byte of codec: 15.92864 and 8.47136 ms; ends at
    #   42.14304 and 50.6144 ms → 70.6144 ms; without overlap 84.4 ms.
    m = {"params": 10e6, "backward": 0.04, "codec_s_per_byte": 1e-10, "bucket_mb": 25,
         "steps": {"none": 0.06, "ring": 0.1, "hierarchical": 0.11, "compressed": 0.075}}
    net = sm.Network(alpha=1e-4, beta=1e-9, local_alpha=1e-4, local_beta=1e-9,
                     ranks_per_node=1)
    assert sm.check_rows(m, 2, net)[2:] == [
        "| no communication | 60.00 | | | | |",
        "| ring | 100.00 | 86.61 | 100.40 | 0.87 | 1.00 |",
        "| hierarchical | 110.00 | 86.61 | 100.40 | 0.79 | 0.91 |",
        "| compressed | 75.00 | 70.61 | 84.40 | 0.94 | 1.13 |"]
    # 10 MiB buckets: three of 10485760 bytes (10.68576 ms each) handed over every
    # 10.48576 ms, then 8542720 (8.74272 ms) at 40 ms: they end at 21.17152, 31.85728,
    # 42.54304 and 51.28576 ms → 71.28576 ms; without overlap 60 + 4 · 0.2 + 40 = 100.8 ms.
    assert sm.check_rows({**m, "bucket_mb": 10}, 2, net)[3] == (
        "| ring | 100.00 | 71.29 | 100.80 | 0.71 | 1.01 |")
