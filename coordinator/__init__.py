"""dptrain coordinator: the gRPC service that schedules, launches and checkpoints jobs."""
