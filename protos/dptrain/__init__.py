"""The ``dptrain`` protobuf package (``package dptrain.*`` in the .proto files)."""
