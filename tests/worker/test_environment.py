"""The worker's environment rules: the world-size check under Slurm (run for real against a
Slurm cluster in ``tests/coordinator/test_slurm.py``)."""

from __future__ import annotations

import pytest

from dptrain.worker.environment import world_size_error


# Variables as the ranks saw them in a 2-task sbatch job on a Slurm 22.05 cluster.
@pytest.mark.parametrize("environ, world_size", [
    ({}, 1),                                                      # not under Slurm
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "PMI_RANK": "1",  # srun --mpi=pmi2
      "PMI_SIZE": "2"}, 2),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "PMI_RANK": "1",  # mpiexec -n 2 inside it
      "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}, 2),
    ({"SLURM_NTASKS": ""}, 3),
])
def test_a_world_of_every_slurm_task_passes(environ, world_size):
    assert world_size_error(world_size, environ) is None


def test_singletons_under_slurm_are_refused_with_the_sizes_and_the_fix():
    # srun --mpi=none: Slurm's variables, no PMI ones
    message = world_size_error(1, {"SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
    assert message == (
        "SLURM_NTASKS: Slurm started 2 task(s) but the MPI world has 1 rank(s), so the tasks "
        "do not see each other; start them with 'srun --mpi=pmi2' (the mpich wheel speaks "
        "PMI-2: not --mpi=none, not pmix)")
