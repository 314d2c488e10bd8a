"""The coordinator's API layer: the domain records, their errors and limits, and the one module
that converts them to and from protobuf (`serde`). Client and server both build on it; it holds
no server logic and loads neither the store nor the engine."""
