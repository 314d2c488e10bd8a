"""The GPU all-reduce paths' decisions and hooks, in-process: which path each job gets, how a
CUDA-aware MPI is recognised, the pinned staging pipeline and the NCCL hook's refusals. The
paths' training on 1-3 real MPI ranks is in test_ddp.py."""

from __future__ import annotations

import nccl_double
import numpy as np
import pytest

from dptrain import engine
from dptrain.engine import backend, nn
from dptrain.worker import DistributedDataParallel
from dptrain.worker.comm import cuda_aware_from
from dptrain.worker.comm_device import (
    NcclAllreduce,
    PinnedStagingAllreduce,
    RankFacts,
    pick_allreduce,
)

GPU_EACH = RankFacts(nccl=True, local_ranks=2, gpus=2, cuda_aware=False)
SHARED_GPU = RankFacts(nccl=True, local_ranks=2, gpus=1, cuda_aware=True)
NO_NCCL = RankFacts(nccl=False, local_ranks=1, gpus=1, cuda_aware=False)
AWARE = RankFacts(nccl=False, local_ranks=1, gpus=1, cuda_aware=True)


@pytest.mark.parametrize("requested, facts, expected", [
    ("auto", [GPU_EACH, GPU_EACH], "nccl"),              # every rank has its own GPU
    ("auto", [GPU_EACH, SHARED_GPU], "host"),            # one node shares a GPU, MPI not aware
    ("auto", [SHARED_GPU, SHARED_GPU], "cuda_aware"),    # shared GPUs, CUDA-aware MPI
    ("auto", [AWARE, NO_NCCL], "host"),                  # aware on one rank only
    ("auto", [NO_NCCL], "host"),                         # the mpich wheel's case
    ("host", [GPU_EACH, GPU_EACH], "host"),              # asked for: taken as it is
    ("cuda_aware", [NO_NCCL], "cuda_aware"),             # a library that cannot be asked
    ("nccl", [GPU_EACH, GPU_EACH], "nccl"),
])
def test_auto_picks_nccl_then_cuda_aware_then_host_and_a_request_wins(requested, facts,
                                                                        expected):
    assert pick_allreduce(requested, facts) == expected


def test_nccl_where_a_rank_cannot_use_it_names_the_rank_and_why():
    with pytest.raises(RuntimeError, match=r"rank 1: its node runs 2 ranks on 1 GPUs"):
        pick_allreduce("nccl", [GPU_EACH, SHARED_GPU])
    with pytest.raises(RuntimeError, match=r"rank 0: CuPy's NCCL .* is missing"):
        pick_allreduce("nccl", [NO_NCCL])
    with pytest.raises(ValueError, match="allreduce must be one of auto, host, cuda_aware, "
                                         "nccl, got 'gloo'"):
        pick_allreduce("gloo", [GPU_EACH])
    with pytest.raises(ValueError, match="allreduce must be one of .*got 'gloo'"):
        DistributedDataParallel(nn.Linear(2, 2), comm=object(), allreduce="gloo")


MPICH = "MPICH Version:      5.0.2\nMPICH Device:       ch4:ucx ofi"
CRAY = "MPI VERSION    : CRAY MPICH version 8.1.28.2 (ANL base 3.4a2)"
OPEN_MPI = "Open MPI v4.1.5, package: Open MPI ..., ident: 4.1.5"
MVAPICH = "MVAPICH2 Version      :\t2.3.7"


@pytest.mark.parametrize("query, version, environ, expected", [
    (1, MPICH, {}, True),                                          # the library says so
    (0, MPICH, {}, False),
    (1, MPICH, {"MPIR_CVAR_ENABLE_GPU": "0"}, False),             # MPICH's GPU support off
    (-1, OPEN_MPI, {"OMPI_MCA_opal_cuda_support": "true"}, True),  # mpi4py's "unknown"
    (None, OPEN_MPI, {}, False),
    (None, CRAY, {"MPICH_GPU_SUPPORT_ENABLED": "1"}, True),
    (None, CRAY, {}, False),
    (None, MVAPICH, {"MV2_USE_CUDA": "1"}, True),
    (None, MVAPICH, {"MV2_USE_CUDA": "0"}, False),
    (None, "Some MPI 1.0", {"MV2_USE_CUDA": "1"}, False),         # unknown library: staged
])
def test_cuda_aware_mpi_trusts_the_library_query_then_its_switch(query, version, environ,
                                                                 expected):
    assert cuda_aware_from(query, version, environ) is expected


@pytest.mark.mpi
def test_the_mpich_wheel_is_asked_and_says_it_is_not_cuda_aware():
    # MPI's singleton world in this process: the real library's MPIX_Query_cuda_support.
    from dptrain.worker.comm import _query_cuda_support, cuda_aware_mpi

    assert _query_cuda_support() == 0
    assert cuda_aware_mpi() is False


@pytest.mark.mpi
def test_pinned_staging_copies_each_bucket_into_its_own_reused_buffer_in_order():
    from dptrain.worker.comm import Communicator

    comm = Communicator()  # MPI's singleton world: a sum over one rank keeps the values
    hook = PinnedStagingAllreduce(comm, "strict")
    a = engine.tensor([1.0, 2.0, 3.0], device="strict").data
    b = engine.tensor([4.0, 5.0], device="strict").data
    for step in range(3):
        a[...] = a + 1
        ra, rb = hook(comm, a), hook(comm, b)
        rb.wait()  # drives the bucket before it first
        assert ra.done and rb.done
        np.testing.assert_array_equal(engine.Tensor(a).numpy(), [2.0 + step, 3.0 + step,
                                                                 4.0 + step])
        np.testing.assert_array_equal(engine.Tensor(b).numpy(), [4.0, 5.0])
    assert hook.pinned_buffers == 2  # allocated at the first step, reused after
    assert comm.staged_bytes == 3 * (a.nbytes + b.nbytes)


@pytest.mark.mpi
@pytest.mark.skipif(backend.cupy_available(), reason="needs no GPU: CuPy sees one here")
def test_the_nccl_hook_without_nccl_says_what_is_missing():
    from dptrain.worker.comm import Communicator

    with pytest.raises(RuntimeError, match=r"needs CuPy's NCCL \(cupy.cuda.nccl\) and a GPU"):
        NcclAllreduce(Communicator(), "strict")


@pytest.mark.mpi
def test_the_nccl_hook_reduces_in_place_and_refuses_dtypes_nccl_has_not():
    # nccl_double stands in for cupy.cuda.nccl: the GPU boundary, which CI cannot run.
    from dptrain.worker.comm import Communicator

    comm = Communicator()
    hook = NcclAllreduce(comm, "strict", nccl=nccl_double)
    bucket = engine.tensor([1.5, -2.0, 4.0], dtype=engine.float64, device="strict").data
    assert hook(comm, bucket).test()
    np.testing.assert_array_equal(engine.Tensor(bucket).numpy(), [1.5, -2.0, 4.0])
    assert nccl_double.calls[-1] == ("allReduce", 3, nccl_double.NCCL_FLOAT64,
                                     nccl_double.NCCL_SUM, 0, True)
    with pytest.raises(TypeError, match="cannot reduce dtype bool; NCCL takes int8"):
        hook(comm, engine.ones(2, dtype=np.bool_, device="strict").data)
