"""How a job's ranks are started: one launcher per way (``mpiexec`` locally or on a hostfile)."""
