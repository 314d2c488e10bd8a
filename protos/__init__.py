"""dptrain's gRPC API: .proto sources and their generated Python code."""
