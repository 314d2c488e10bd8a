"""The wire form of checkpoint chunk messages, encoded and decoded without copying the bytes.

A checkpoint travels in 1 MiB chunks (UploadCheckpoint, FetchCheckpoint, DownloadCheckpoint).
Through the generated protobuf code, each chunk is copied three times on the sending side (into
the field, into the enclosing message, into the serialized bytes) and twice on the receiving
side (into the parsed message, out of its field), each copy of fresh memory with its page faults:
next to a BLAKE3 pass, those copies were most of a transfer's CPU (docs/benchmarks.md). Here a
chunk message is written as its protobuf encoding by hand (one copy, the join), and read back as
a `Chunk` whose data is a ``memoryview`` into the bytes gRPC received (no copy). Every other
message of these streams (the first one: header or file description) goes through protobuf as
usual, and so does a chunk message that is not laid out as this module writes it (e.g. from
another implementation): its decoder falls back to protobuf's, which also raises for bytes that
are not a message at all.

The encodings (field numbers as in ``protos/dptrain/v1/coordinator.proto``)::

    DownloadCheckpointResponse{chunk = 2: data}           12 <len> data
    UploadCheckpointRequest / FetchCheckpointResponse     12 <len> (0a <len> name 12 <len> data)
        {chunk = 2: FileChunk{name = 1, data = 2}}

Both ends use it: the client and the workers through `unary_stream`/`stream_unary` stubs made
by `download_stub`, `upload_stub` and `fetch_stub`; the server by swapping the codecs of those
three methods' handlers (`server_codecs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from google.protobuf.message import Message

from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb

__all__ = ["Chunk", "encode_chunk", "decode_download", "decode_file_chunks", "download_stub",
           "upload_stub", "fetch_stub", "server_codecs"]

_DATA_TAG, _NAME_TAG = 0x12, 0x0A  # field 2 and field 1, both length-delimited
_COORDINATOR = "/dptrain.v1.Coordinator/"
_WORKER = "/dptrain.v1.WorkerService/"


class Chunk(NamedTuple):
    """A chunk message's content.

    Attributes:
        name: the file it belongs to ("" in a download, whose file the first message names).
        data: the bytes (a read-only ``memoryview`` of the received message when decoded).
    """

    name: str
    data: bytes | memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(item: Message | Chunk | bytes) -> bytes:
    """A stream message's bytes: a `Chunk` (or, for a download, plain bytes) by hand, any
    protobuf message by protobuf.

    Args:
        item: what the stream sends.

    Returns:
        The serialized message.
    """
    if isinstance(item, Message):
        return item.SerializeToString()
    if isinstance(item, Chunk):
        name = item.name.encode()
        inner_head = (bytes([_NAME_TAG]) + _varint(len(name)) + name + bytes([_DATA_TAG])
                      + _varint(len(item.data)))
        size = len(inner_head) + len(item.data)
        return b"".join((bytes([_DATA_TAG]), _varint(size), inner_head, item.data))
    return b"".join((bytes([_DATA_TAG]), _varint(len(item)), item))


class _NotOurs(Exception):
    """The bytes are not laid out as `encode_chunk` writes them: let protobuf decode them."""


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise _NotOurs
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _field(raw: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """``(tag, start, stop)`` of the length-delimited field at `pos`."""
    tag = raw[pos]
    if tag not in (_DATA_TAG, _NAME_TAG):
        raise _NotOurs
    size, start = _read_varint(raw, pos + 1)
    if start + size > end:
        raise _NotOurs
    return tag, start, start + size


def decode_download(raw: bytes) -> pb.DownloadCheckpointResponse | Chunk:
    """A DownloadCheckpoint stream message: a `Chunk` for a chunk, else the parsed message.

    Raises:
        google.protobuf.message.DecodeError: bytes that are not such a message.
    """
    try:
        if raw and raw[0] == _DATA_TAG:
            tag, start, stop = _field(raw, 0, len(raw))
            if stop == len(raw):
                return Chunk("", memoryview(raw)[start:stop])
    except _NotOurs:
        pass
    return pb.DownloadCheckpointResponse.FromString(raw)


def decode_file_chunks(message_type: type[Message]) -> Callable[[bytes], Any]:
    """The decoder of an upload or fetch stream's messages (``UploadCheckpointRequest`` or
    ``FetchCheckpointResponse``): a `Chunk` for a chunk, else the parsed `message_type`."""

    def decode(raw: bytes) -> Any:
        try:
            if raw and raw[0] == _DATA_TAG:
                _, start, stop = _field(raw, 0, len(raw))
                if stop == len(raw):
                    name, data, pos = "", memoryview(b""), start
                    while pos < stop:
                        tag, begin, pos = _field(raw, pos, stop)
                        if tag == _NAME_TAG:
                            name = str(raw[begin:pos], "utf-8")
                        else:
                            data = memoryview(raw)[begin:pos]
                    return Chunk(name, data)
        except (_NotOurs, UnicodeDecodeError):
            pass  # protobuf decides (and refuses a name that is not UTF-8)
        return message_type.FromString(raw)

    return decode


_decode_upload = decode_file_chunks(pb.UploadCheckpointRequest)
_decode_fetch = decode_file_chunks(pb.FetchCheckpointResponse)


def download_stub(channel: Any) -> Callable[..., Any]:
    """``Coordinator.DownloadCheckpoint`` on `channel`, its chunks decoded without a copy."""
    return channel.unary_stream(
        _COORDINATOR + "DownloadCheckpoint",
        request_serializer=pb.DownloadCheckpointRequest.SerializeToString,
        response_deserializer=decode_download)


def upload_stub(channel: Any) -> Callable[..., Any]:
    """``WorkerService.UploadCheckpoint`` on `channel`: send the header as a message and
    each chunk as a `Chunk`."""
    return channel.stream_unary(_WORKER + "UploadCheckpoint", request_serializer=encode_chunk,
                                response_deserializer=pb.Checkpoint.FromString)


def fetch_stub(channel: Any) -> Callable[..., Any]:
    """``WorkerService.FetchCheckpoint`` on `channel`, its chunks decoded without a copy."""
    return channel.unary_stream(
        _WORKER + "FetchCheckpoint",
        request_serializer=pb.FetchCheckpointRequest.SerializeToString,
        response_deserializer=_decode_fetch)


_SERVER_CODECS: dict[str, dict[str, Callable[..., Any]]] = {
    _COORDINATOR + "DownloadCheckpoint": {"response_serializer": encode_chunk},
    _WORKER + "UploadCheckpoint": {"request_deserializer": _decode_upload},
    _WORKER + "FetchCheckpoint": {"response_serializer": encode_chunk},
}


def server_codecs(method: str, handler: Any) -> Any:
    """The server's handler of `method` with this module's codecs where it sends or receives
    chunks (its servicer then yields `Chunk`s or bytes, and receives `Chunk`s); other methods'
    handlers unchanged.

    Args:
        method: the full method name, e.g. ``/dptrain.v1.WorkerService/UploadCheckpoint``.
        handler: its ``grpc.RpcMethodHandler`` (a named tuple).
    """
    codecs = _SERVER_CODECS.get(method)
    return handler if codecs is None or handler is None else handler._replace(**codecs)
