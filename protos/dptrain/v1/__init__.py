"""``dptrain.v1``: the coordinator's gRPC API. ``coordinator.proto`` is the source; the
``coordinator_pb2*`` modules are generated from it by ``make protos`` (scripts/gen_protos.py)
and checked in; never edit them by hand."""
