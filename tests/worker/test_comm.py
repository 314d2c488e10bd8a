"""Communicator: every collective on 1, 2 and 3 real MPI ranks, against hand-computed values."""

from __future__ import annotations

import pytest

from dptrain.worker.comm import Request

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda n: f"ranks{n or '1-no-mpiexec'}")
def collectives(request, run_mpi, mpi_json, mpi_scripts):
    """What every rank saw running comm_collectives.py; n=0 runs it without mpiexec."""
    result = run_mpi(request.param, mpi_scripts / "comm_collectives.py")
    assert result.returncode == 0, result.stderr
    (report,) = mpi_json(result.stdout)
    assert report["size"] == max(request.param, 1)
    assert [r["rank"] for r in report["ranks"]] == list(range(report["size"]))
    return report


def test_allreduce_sum_mean_max_min(collectives):
    n = collectives["size"]
    s = n * (n + 1) / 2  # rank r contributes (r + 1) * values
    for r in collectives["ranks"]:
        assert r["sum_f64"] == [s * k for k in (1, 2, 3, 4)]
        assert r["mean_f32"] == pytest.approx([s / n * k for k in (1, 2, 3, 4)], rel=1e-6)
        assert r["mean_dtype"] == "float32"
        assert r["sum_i64"] == [sum(range(n)), -sum(range(n)), sum(10 * k + 1 for k in range(n))]
        assert r["max"] == [n - 1, 0]
        assert r["min"] == [0, -(n - 1)]
        assert r["sum_2d_f16"] == [[s, s]] * 3


def test_allreduce_works_in_place(collectives):
    assert all(r["in_place"] for r in collectives["ranks"])


def test_nonblocking_allreduce(collectives):
    n = collectives["size"]
    s = n * (n + 1) / 2
    for r in collectives["ranks"]:
        assert r["iallreduce_big"] == [s, s]
        assert r["iallreduce_mean"] == pytest.approx([2 * s / n] * 3)
        assert r["requests_done"] == [True, True]


def test_a_late_partner_still_gets_the_sum(collectives):
    n = collectives["size"]
    s = n * (n + 1) / 2
    for r in collectives["ranks"]:
        assert r["late_partner_sum"] == [s, s]


def test_ibarrier_waits_for_the_late_rank(collectives):
    assert all(r["ibarrier_after_late_rank"] == [True, True] for r in collectives["ranks"])


def test_nonblocking_reduce_and_broadcast(collectives):
    n = collectives["size"]
    s = n * (n + 1) / 2
    ranks = collectives["ranks"]
    assert ranks[n - 1]["ireduce_root"] == [s] * 4
    assert all(r["ireduce_others_unchanged"] for r in ranks)
    assert all(r["ibroadcast"] == [s] * 4 for r in ranks)  # the root's sum, everywhere


def test_broadcast_and_objects(collectives):
    n = collectives["size"]
    for r in collectives["ranks"]:
        assert r["broadcast"] == [float(n - 1)] * 5  # from the last rank
        assert r["allgather"] == [{"rank": k, "name": f"r{k}"} for k in range(n)]
        assert r["bcast_object"] == {"from": 0, "list": [0, 0]}


def test_sampler_takes_its_defaults_from_the_world(collectives):
    n = collectives["size"]
    shares = []
    for r in collectives["ranks"]:
        assert r["sampler_default"][:2] == [n, r["rank"]]
        assert len(r["sampler_default"][2]) == -(-10 // n)  # ceil(10 / n), padded
        shares += r["sampler_default"][2]
    assert sorted(set(shares)) == list(range(10))


def test_bad_arguments_raise_clear_errors(collectives):
    errors = collectives["ranks"][0]["errors"]
    assert errors["non_contiguous"][0] == "ValueError"
    assert "C-contiguous" in errors["non_contiguous"][1]
    assert errors["bad_op"][0] == "ValueError" and "'avg'" in errors["bad_op"][1]
    assert errors["bool"][0] == "TypeError" and "bool" in errors["bool"][1]
    assert errors["int_mean"][0] == "TypeError" and "floating point" in errors["int_mean"][1]
    assert errors["read_only"][0] == "ValueError" and "read-only" in errors["read_only"][1]
    assert errors["bad_root"][0] == "ValueError" and "root" in errors["bad_root"][1]
    assert errors["not_array"][0] == "TypeError" and "tensor.data" in errors["not_array"][1]


def test_importing_worker_does_not_initialise_mpi(run_mpi):
    code = "import sys, worker\nassert 'mpi4py.MPI' not in sys.modules, 'MPI imported'\n"
    result = run_mpi(0, code)
    assert result.returncode == 0, result.stderr


def test_abort_ends_every_rank_with_the_code(run_mpi):
    code = (
        "import time\n"
        "from dptrain.worker.comm import Communicator\n"
        "comm = Communicator()\n"
        "if comm.rank == 1:\n"
        "    time.sleep(0.2)\n"
        "    comm.abort(3)\n"
        "    print('abort returned', flush=True)\n"
        "comm.barrier()  # rank 0 would wait here forever\n"
        "print('passed the barrier', flush=True)\n")
    for _ in range(3):  # MPICH's MPI_Abort may return before the launcher acts: a race
        result = run_mpi(3, code, timeout=60)
        assert result.returncode == 3
        assert "abort returned" not in result.stdout
        assert "passed the barrier" not in result.stdout


class _FakeMPIRequest:
    def __init__(self, polls_until_done: int):
        self.polls = polls_until_done

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        self.polls -= 1
        return self.polls <= 0

    def Wait(self) -> None:  # noqa: N802 - mpi4py's name
        self.polls = 0


def test_request_finishes_exactly_once():
    finished = []
    req = Request(_FakeMPIRequest(polls_until_done=3), lambda: finished.append(1))
    assert not req.test() and not req.test() and not req.done
    assert req.test() and req.done
    req.wait()
    assert req.test()
    assert finished == [1]
    other = Request(_FakeMPIRequest(polls_until_done=10), lambda: finished.append(2))
    other.wait()
    other.wait()
    assert other.done and finished == [1, 2]
