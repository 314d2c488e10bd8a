"""The coordinator's server side: the thin gRPC servicer over plain ``(request, state)`` logic
(`jobs`, `checkpoint_store`), the store, the scheduler (pure policy), the runner (a state
machine) and the launchers that start a job's ranks."""
