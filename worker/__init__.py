"""dptrain worker: data-parallel training over MPI (gradient all-reduce across processes)."""
