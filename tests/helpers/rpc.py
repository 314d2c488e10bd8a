"""Calling any RPC of the coordinator by name over a raw channel, for the tests that sweep every
RPC of the service descriptor (the API fuzzer, the authorisation table)."""

from __future__ import annotations

from typing import Any

import grpc

from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb

#: Every RPC of the dptrain services: its name -> (the service's full name, its descriptor).
METHODS = {m.name: (service.full_name, m) for service in pb.DESCRIPTOR.services_by_name.values()
           for m in service.methods}


def call_rpc(channel: grpc.Channel, method: str, request: Any, metadata: tuple,
             timeout: float = 30.0) -> tuple[str, str]:
    """Call `method` with `request` (a message, bytes, or a list of them for a streaming
    request); return the status code's name and details. A watch is read to its first message
    (it follows a live job for as long as the job lives); other streams to their end."""
    service, m = METHODS[method]
    path = f"/{service}/{method}"
    raw = isinstance(request, bytes) or (isinstance(request, list) and request
                                         and isinstance(request[0], bytes))
    serializer = None if raw else (lambda message: message.SerializeToString())
    try:
        if m.client_streaming:
            call = channel.stream_unary(path, request_serializer=serializer)
            call(iter(request), metadata=metadata, timeout=timeout)
        elif m.server_streaming:
            stream = channel.unary_stream(path, request_serializer=serializer)(
                request, metadata=metadata, timeout=timeout)
            for _ in stream:
                if method == "WatchJob":
                    stream.cancel()
                    break
        else:
            channel.unary_unary(path, request_serializer=serializer)(
                request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as e:
        if e.code() is grpc.StatusCode.CANCELLED and method == "WatchJob":
            return "OK", ""  # we ended it after its first message
        return e.code().name, e.details() or ""
    return "OK", ""
