"""What starts a job's ranks, behind one interface (`base.Launcher`): ``mpiexec`` on this
machine or on a hostfile's hosts (`mpiexec.MpiexecLauncher`)."""
