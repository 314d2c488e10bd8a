"""api.chunk_wire: its hand-written chunk encodings against protobuf's own, both ways."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from dptrain.coordinator.api.chunk_wire import (
    Chunk,
    decode_download,
    decode_file_chunks,
    encode_chunk,
)
from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb

FILE_CHUNK_STREAMS = [pb.UploadCheckpointRequest, pb.FetchCheckpointResponse]
names = st.text(max_size=40)
payloads = st.binary(max_size=300) | st.sampled_from([b"", b"x" * 200_000])


@pytest.mark.parametrize("message_type", FILE_CHUNK_STREAMS)
@given(name=names, data=payloads)
def test_a_file_chunk_reads_back_through_protobuf_and_ours(message_type, name, data):
    raw = encode_chunk(Chunk(name, data))
    parsed = message_type.FromString(raw)  # the reference decoder
    assert parsed.WhichOneof("item") == "chunk"
    assert (parsed.chunk.name, parsed.chunk.data) == (name, data)
    ours = decode_file_chunks(message_type)(raw)
    assert isinstance(ours, Chunk) and ours.name == name and bytes(ours.data) == data
    # protobuf's own encoding (which leaves out an empty name or data) decodes alike
    ours = decode_file_chunks(message_type)(
        message_type(chunk=pb.FileChunk(name=name, data=data)).SerializeToString())
    assert isinstance(ours, Chunk) and ours.name == name and bytes(ours.data) == data


@given(data=payloads)
def test_a_download_chunk_reads_back_through_protobuf_and_ours(data):
    raw = encode_chunk(data)
    assert pb.DownloadCheckpointResponse.FromString(raw).chunk == data
    ours = decode_download(raw)
    assert isinstance(ours, Chunk) and ours.name == "" and bytes(ours.data) == data
    ours = decode_download(pb.DownloadCheckpointResponse(chunk=data).SerializeToString())
    assert bytes(ours.data) == data


def test_decoded_data_is_a_read_only_view_of_the_received_bytes():
    raw = encode_chunk(Chunk("model.safetensors", b"0123456789"))
    data = decode_file_chunks(pb.UploadCheckpointRequest)(raw).data
    assert isinstance(data, memoryview) and data.readonly and data.obj is raw
    assert bytes(data) == b"0123456789"


def test_other_messages_go_through_protobuf():
    header = pb.UploadCheckpointRequest(header=pb.CheckpointHeader(
        job_id="j-1", step=3, manifest_json=b"{}",
        files=[pb.CheckpointFile(name="m", size=2, blake3="a" * 64)]))
    assert encode_chunk(header) == header.SerializeToString()
    assert decode_file_chunks(pb.UploadCheckpointRequest)(header.SerializeToString()) == header
    info = pb.DownloadCheckpointResponse(info=pb.DownloadInfo(step=3))
    assert decode_download(info.SerializeToString()) == info
    # a chunk followed by another field is not laid out as ours: protobuf decides (last wins)
    two = (pb.UploadCheckpointRequest(chunk=pb.FileChunk(name="a", data=b"1")).SerializeToString()
           + header.SerializeToString())
    assert decode_file_chunks(pb.UploadCheckpointRequest)(two) == header


@pytest.mark.parametrize("raw", [
    b"\x12\x05ab",              # a length beyond the message
    b"\x12\x80",                # a varint cut short
    b"\x12\x04\x0a\x02\xff\xfe",  # a file name that is not UTF-8
    b"\xff\xff\xff",
])
def test_bytes_that_are_no_message_raise_protobufs_error(raw):
    with pytest.raises(DecodeError):
        decode_file_chunks(pb.UploadCheckpointRequest)(raw)
    if raw != b"\x12\x04\x0a\x02\xff\xfe":  # as a download chunk those are just bytes
        with pytest.raises(DecodeError):
            decode_download(raw)
