"""Comm hooks on real MPI ranks (3 and 4; 1 to 3 for `SharedMemoryAllreduce`) against one
process on the whole batch.

The tolerance of the 16-bit hooks comes from the formats, not from observed runs: with unit
roundoff u (float16 2^-11, bfloat16 2^-8: half the spacing of numbers in [1, 2)) and η the
largest rounding error of a number below the smallest normal one (half the smallest
subnormal, or of float32's for bfloat16), one step rounds each of the p inputs c_i once
(≤ u|c_i| + η), sums the p rounded values in float32 (≤ p·2^-24·(1 + u)·Σ|c_i|) and rounds the
sum once more (≤ u·(1 + u)·Σ|c_i| + η):
    |result - Σ c_i| ≤ (2u + u² + p·2^-24·(1 + u))·Σ|c_i| + (p + 1)·η.
The script (mpi_scripts/ddp_comm_hooks.py) reports the worst error divided by this bound.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.mpi


def _run(run_mpi, mpi_json, script, n: int) -> dict:
    result = run_mpi(n, script)
    assert result.returncode == 0, result.stderr
    (report,) = mpi_json(result.stdout)
    assert report["size"] == n
    return report


@pytest.fixture(scope="module", params=[3, 4], ids=lambda n: f"ranks{n}")
def hooked(request, run_mpi, mpi_json, mpi_scripts):
    return _run(run_mpi, mpi_json, mpi_scripts / "ddp_comm_hooks.py", request.param)


def test_the_exact_reduction_is_the_one_process_gradient(hooked):
    # The reference the hooks are held to: the sum of every rank's bucket, in float64,
    # equals the gradient of one process on the whole batch (float32 model: float32 noise).
    for r in hooked["ranks"]:
        for case in ("float16", "bfloat16"):
            assert r[case]["exact_vs_single"] < 1e-6
        assert r["hier_shared"]["exact_vs_single"] < 1e-14


@pytest.mark.parametrize("case", ["hier_shared", "hier_2_per_node"])
def test_hierarchical_allreduce_equals_one_process(hooked, case):
    for r in hooked["ranks"]:
        assert r[case]["rel_to_exact"] < 1e-14  # float64: only the order of additions differs
        assert r[case]["exact_vs_single"] < 1e-14


def test_two_ranks_per_node_make_the_expected_nodes(hooked):
    n = hooked["size"]
    for r in hooked["ranks"]:
        assert r["nodes_2_per_node"] == -(-n // 2)
    assert [r["node_size_2_per_node"] for r in hooked["ranks"]] == [
        min(2, n - 2 * (k // 2)) for k in range(n)]


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_compressed_allreduce_stays_within_the_format_bound(hooked, fmt):
    for r in hooked["ranks"]:
        assert 0 < r[fmt]["err_over_bound"] <= 1.0  # > 0: the rounding did happen


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_error_feedback_keeps_the_sum_over_steps_within_one_step_bound(hooked, fmt):
    for r in hooked["ranks"]:
        assert r[f"{fmt}_ef_8_steps"]["err_over_bound"] <= 1.0
        # Without it the 8 steps' rounding errors add up past the bound: the check has teeth.
        assert r[f"{fmt}_no_ef_8_steps"]["err_over_bound"] > 1.0


def test_hierarchical_with_bfloat16_across_nodes_stays_within_the_format_bound(hooked):
    # Node sums in float32, then CompressedAllreduce among the leaders: the same bound, with
    # the node's float32 additions counted among the sums (mpi_scripts/ddp_comm_hooks.py).
    for r in hooked["ranks"]:
        assert 0 < r["hier_bf16"]["err_over_bound"] <= 1.0


def test_bad_arguments_name_the_field_and_the_value(hooked):
    errors = hooked["ranks"][0]["errors"]
    assert errors["dtype"] == [
        "ValueError", "dtype must be one of float16, bfloat16, got 'int8'"]
    assert errors["ranks_per_node"] == [
        "ValueError", "ranks_per_node must be a positive integer or None, got 0"]
    assert errors["float64_bucket"][0] == "TypeError" and "float64" in errors["float64_bucket"][1]


# ---------------------------------------------------------------- SharedMemoryAllreduce

@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"ranks{n}")
def shared(request, run_mpi, mpi_json, mpi_scripts):
    result = run_mpi(request.param, mpi_scripts / "ddp_shared_memory.py")
    assert result.returncode == 0, result.stderr
    (report,) = mpi_json(result.stdout)
    assert report["size"] == request.param
    return {**report, "stderr": result.stderr}


BUCKETINGS = ("one_bucket", "tiny_buckets", "small_first")


@pytest.mark.parametrize("bucketing", BUCKETINGS)
def test_shared_memory_sums_every_rank_in_rank_order_bit_for_bit(shared, bucketing):
    # The reference is the float32 fold ((c_0 + c_1) + c_2) of the buckets each rank computed
    # with a plain model and gathered by pickling: equal bits, every step, on every rank.
    ranks = shared["ranks"]
    for step in range(3):
        assert {r[bucketing]["steps"][step]["vs_fold"] for r in ranks} == {0.0}
        assert len({str(r[bucketing]["steps"][step]["bits"]) for r in ranks}) == 1


@pytest.mark.parametrize("bucketing", BUCKETINGS)
def test_shared_memory_equals_one_process_up_to_the_order_of_float32_sums(shared, bucketing):
    # Gradients of magnitude <= 1 summed in another order: a few float32 ulps (2^-24 each).
    for r in shared["ranks"]:
        for step in r[bucketing]["steps"]:
            assert step["vs_single"] <= (0.0 if shared["size"] == 1 else 1e-6)


def test_shared_memory_buckets_and_gradients_live_in_the_windows(shared):
    n = shared["size"]
    for r in shared["ranks"]:
        assert [r[b]["buckets"] for b in BUCKETINGS] == [1, 6, 3]
        if n == 1:  # one rank communicates nothing: the buckets stay where they are
            assert [r[b]["windows"] for b in BUCKETINGS] == [0, 0, 0]
            assert not any(r[b]["in_windows"] for b in BUCKETINGS)
        else:  # one window per bucket, and every .grad a view into one
            assert [r[b]["windows"] for b in BUCKETINGS] == [1, 6, 3]
            assert all(r[b]["in_windows"] for b in BUCKETINGS)


def test_registering_after_a_step_keeps_the_gradients_and_accumulates_in_place(shared):
    for r in shared["ranks"]:
        assert r["late"]["kept"] == 0.0
        assert r["late"]["in_place_vs_fold"] == 0.0
        assert r["late"]["in_windows"] == r["late"]["in_windows_after"] == (shared["size"] > 1)


def test_shared_memory_reduces_buckets_in_flight_together_and_reuses_them(shared):
    n = shared["size"]
    total = n * (n + 1) // 2  # rank r holds r + 1, times the step
    for r in shared["ranks"]:
        assert r["direct"] == [[[float(total)]] * 3, [[float(2 * total)]] * 3]


def test_shared_memory_rejects_arrays_it_did_not_allocate_and_other_worlds(shared):
    errors = shared["ranks"][-1]["errors"]
    assert errors["not_allocated"] == [
        "ValueError", "SharedMemoryAllreduce reduces buckets it allocated (allocate_bucket, "
        "which DistributedDataParallel.register_comm_hook calls), got another ndarray of 3 "
        "elements"]
    n = shared["size"]
    if n > 1:
        assert errors["other_world"] == [
            "ValueError", f"SharedMemoryAllreduce was built for rank {n - 1} of {n} but is "
            f"called with rank 0 of 1; build it with ddp.comm"]


# ---------------------------------------------------------------- the default on one node

def test_the_default_on_one_node_is_the_shared_window_with_the_folds_bits(shared):
    n = shared["size"]
    for r in shared["ranks"]:
        d = r["default"]
        if n == 1:  # nothing to reduce: no window, and the one process's own gradients
            assert (d["allreduce"], d["hook"], d["mapped"]) == (None, "function", 0)
            assert d["vs_single"] == 0.0
            continue
        assert (d["allreduce"], d["hook"]) == ("shared_memory", "SharedMemoryAllreduce")
        assert d["vs_fold"] == 0.0
        # Every rank maps every rank's window: at least the gradients' bytes per rank.
        assert d["mapped"] >= n * r["gradient_bytes"]


def test_close_gives_the_windows_back_and_keeps_the_gradients(shared):
    n = shared["size"]
    for r in shared["ranks"]:
        d = r["default"]
        assert d["after_close"] == 0 and d["after_with"] == 0  # /dev/shm mapped as before
        assert d["in_with"] >= (n * r["gradient_bytes"] if n > 1 else 0)
        assert d["kept"] == 0.0
        assert d["allreduce_closed"] == (None if n == 1 else "mpi")
        assert d["closed_vs_single"] <= (0.0 if n == 1 else 1e-6)  # MPI's order of sums


def test_a_dropped_wrapper_s_windows_are_freed_once_no_gradient_views_them(shared):
    # Garbage collection runs at different points on different ranks: the next hook built on
    # the same ranks frees them, on every rank together, once no rank holds a view.
    n = shared["size"]
    for r in shared["ranks"]:
        d = r["dropped"]
        one = d["mapped"]
        assert one >= (n * r["gradient_bytes"] if n > 1 else 0)
        assert d["both"] == 2 * one  # the gradients still viewed the first wrapper's windows
        assert d["second_closed"] == one  # the first's, not freed by the close of another
        assert d["third"] == one  # the first's freed as the third's were allocated
        assert d["end"] == 0


def test_without_room_in_dev_shm_gradients_go_through_mpi_with_one_warning(shared):
    n = shared["size"]
    for r in shared["ranks"]:
        for kind in ("auto", "shared_memory"):
            f = r["fallback"][kind]
            assert (f["allreduce"], f["hook"], f["mapped"]) == (
                (None, "function", 0) if n == 1 else ("mpi", "function", 0))
            assert f["vs_single"] <= (0.0 if n == 1 else 1e-6)
        assert r["errors"]["reserve"] == (None if n == 1 else [
            "ValueError", "DPTRAIN_SHM_RESERVE_MB must be a non-negative number of MiB, got "
            "'lots'"])
    warnings = [line for line in shared["stderr"].splitlines() if "warning" in line]
    if n == 1:
        assert warnings == []
        return
    assert len(warnings) == 2  # rank 0 only, once per wrapper
    for line in warnings:
        assert line.startswith("dptrain: warning: gradients go through MPI's all-reduce, not "
                               "shared memory: /dev/shm has ")
        assert line.endswith(f"MiB free, the gradient buckets of the {n} ranks need 0.0 MiB "
                             "and 1099511627776.0 MiB stay free (DPTRAIN_SHM_RESERVE_MB)")


def test_allreduce_mpi_keeps_mpis_allreduce(shared):
    n = shared["size"]
    for r in shared["ranks"]:
        m = r["mpi"]
        assert (m["allreduce"], m["hook"], m["mapped"]) == (None if n == 1 else "mpi",
                                                            "function", 0)
