"""proto/anvil/*.proto against the gRPC surface DESIGN §5 specifies.

The ObjectService subset must stay wire-compatible with Anvil's own service, so
a client reads from a real Anvil cluster or from a peer's built-in store alike.
On the wire that means: the method paths (`/anvil.ObjectService/<Method>`), the
streaming shape of each method, and each field's number and wire type. Field
and message names are not on the wire, but DESIGN §5 names them, so they are
pinned too.

Every expected value below is transcribed from the text of DESIGN §5
(/work/shared/DESIGN.md, "## 5. gRPC surface (proto package `anvil`)"), not
generated from the descriptors under test:

    `anvil.ObjectService` subset, wire-compatible with Anvil's own
    (`PutObject` client-stream of metadata{bucket_name=1, object_key=2} then
    `chunk`=2; `GetObject{bucket_name=1, object_key=2, version_id=3}` server
    stream of metadata{content_type=1, content_length=2} then chunk=2;
    `HeadObject`)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from daemon.pb.anvil import compute_pb2, object_pb2

# Field types, grouped by how they travel. DESIGN §5 names no scalar types, so
# for scalars we pin what wire compatibility needs and what each field's meaning
# fixes: names, keys, versions and content types are text (`string`: proto3
# validates UTF-8, so `bytes` would accept what Anvil never sends, and vice
# versa the wire type is the same); a chunk of an object is raw `bytes` (a
# `string` would reject non-UTF-8 chunks); a length is a plain varint integer
# (any of these four; `sint*` would be zigzag-encoded and read wrongly).
STRING = frozenset({FieldDescriptor.TYPE_STRING})
BYTES = frozenset({FieldDescriptor.TYPE_BYTES})
MESSAGE = frozenset({FieldDescriptor.TYPE_MESSAGE})
VARINT_INT = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
    }
)


@dataclass(frozen=True)
class Field:
    """One field as DESIGN §5 gives it; number None where DESIGN gives none."""

    number: int | None
    types: frozenset[int]


@dataclass(frozen=True)
class Method:
    request: str
    response: str
    client_streaming: bool
    server_streaming: bool


# --- DESIGN §5, ObjectService --------------------------------------------------

# The service's methods: DESIGN §5 lists exactly these three as the subset.
# Streaming: PutObject is a "client-stream", GetObject a "server stream";
# HeadObject is named without a stream, i.e. unary. The request/response
# message names are not in DESIGN's text (they are not on the wire either);
# they are Anvil's `<Method>Request` / `<Method>Response` convention.
OBJECT_SERVICE = "anvil.ObjectService"
OBJECT_METHODS: dict[str, Method] = {
    "PutObject": Method("anvil.PutObjectRequest", "anvil.PutObjectResponse", True, False),
    "GetObject": Method("anvil.GetObjectRequest", "anvil.GetObjectResponse", False, True),
    "HeadObject": Method("anvil.HeadObjectRequest", "anvil.HeadObjectResponse", False, False),
}

# The messages, reached from the methods (so the pins hold whatever the message
# types are called), as `(method, "request" | "response", path of fields)`.
#
# PutObject's stream messages: "metadata{bucket_name=1, object_key=2} then
# `chunk`=2". DESIGN gives no number for the `metadata` field itself (only for
# the fields inside it, and chunk=2), so its number is left unpinned.
PUT_STREAM: dict[str, Field] = {
    "metadata": Field(None, MESSAGE),
    "chunk": Field(2, BYTES),
}
PUT_METADATA: dict[str, Field] = {
    "bucket_name": Field(1, STRING),
    "object_key": Field(2, STRING),
}
# GetObject's request: "GetObject{bucket_name=1, object_key=2, version_id=3}".
GET_REQUEST: dict[str, Field] = {
    "bucket_name": Field(1, STRING),
    "object_key": Field(2, STRING),
    "version_id": Field(3, STRING),
}
# GetObject's response stream: "metadata{content_type=1, content_length=2} then
# chunk=2". As for PutObject, the `metadata` field's own number is not given.
GET_STREAM: dict[str, Field] = {
    "metadata": Field(None, MESSAGE),
    "chunk": Field(2, BYTES),
}
GET_METADATA: dict[str, Field] = {
    "content_type": Field(1, STRING),
    "content_length": Field(2, VARINT_INT),
    # Not in DESIGN §5: Anvil's own proto numbers the version 3 in ObjectInfo,
    # so ours does too (a real Anvil's version would otherwise go unread).
    "version_id": Field(3, STRING),
}
# HeadObject: DESIGN §5 names the method and nothing of its messages, so only
# the method itself (name, unary shape) is pinned, in OBJECT_METHODS.

MESSAGE_PINS: list[tuple[str, str, tuple[str, ...], dict[str, Field]]] = [
    ("PutObject", "request", (), PUT_STREAM),
    ("PutObject", "request", ("metadata",), PUT_METADATA),
    ("GetObject", "request", (), GET_REQUEST),
    ("GetObject", "response", (), GET_STREAM),
    ("GetObject", "response", ("metadata",), GET_METADATA),
]

# --- DESIGN §5, ComputeService and PeerService -----------------------------------

# "`anvil.ComputeService`: `RegisterCapability`, `SubmitJob`, `GetJobStatus` (the
# seed's three) plus `CancelJob`, `WatchJob` (server stream),
# `ListCapabilities`, `DeregisterCapability`." DESIGN gives no message fields
# for these, and a streaming shape only for WatchJob.
COMPUTE_METHODS = {
    "RegisterCapability",
    "SubmitJob",
    "GetJobStatus",
    "CancelJob",
    "WatchJob",
    "ListCapabilities",
    "DeregisterCapability",
}
# "`anvil.PeerService` (peer to peer): `Dispatch`, `Heartbeat`."
PEER_METHODS = {"Dispatch", "Heartbeat"}


def _service(name: str) -> ServiceDescriptor:
    package, _, short = name.rpartition(".")
    for module in (object_pb2, compute_pb2):
        if module.DESCRIPTOR.package == package and short in module.DESCRIPTOR.services_by_name:
            service: ServiceDescriptor = module.DESCRIPTOR.services_by_name[short]
            return service
    raise AssertionError(f"no service {name} in proto/anvil")


def _method(service: str, name: str) -> MethodDescriptor:
    methods = _service(service).methods_by_name
    assert name in methods, f"{service} has no method {name}"
    method: MethodDescriptor = methods[name]
    return method


def _message(method: str, side: str, path: tuple[str, ...]) -> Descriptor:
    rpc = _method(OBJECT_SERVICE, method)
    message: Descriptor = rpc.input_type if side == "request" else rpc.output_type
    for name in path:
        field = message.fields_by_name[name]
        assert field.message_type is not None, f"{message.full_name}.{name} is not a message"
        message = field.message_type
    return message


def test_the_proto_package_is_anvil() -> None:
    # DESIGN §5: "gRPC surface (proto package `anvil`)". The package is part of
    # every method path on the wire.
    assert object_pb2.DESCRIPTOR.package == "anvil"
    assert compute_pb2.DESCRIPTOR.package == "anvil"


def test_object_service_has_exactly_the_design_methods() -> None:
    service = _service(OBJECT_SERVICE)
    assert service.full_name == OBJECT_SERVICE
    assert set(service.methods_by_name) == set(OBJECT_METHODS)


@pytest.mark.parametrize("name", sorted(OBJECT_METHODS))
def test_object_method_types_and_streaming(name: str) -> None:
    expected = OBJECT_METHODS[name]
    method = _method(OBJECT_SERVICE, name)
    actual = Method(
        request=method.input_type.full_name,
        response=method.output_type.full_name,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )
    assert actual == expected


@pytest.mark.parametrize(
    ("method", "side", "path", "fields"),
    MESSAGE_PINS,
    ids=[f"{m}-{s}{''.join('.' + p for p in path)}" for m, s, path, _ in MESSAGE_PINS],
)
def test_object_message_fields(
    method: str, side: str, path: tuple[str, ...], fields: dict[str, Field]
) -> None:
    message = _message(method, side, path)
    for name, want in fields.items():
        assert name in message.fields_by_name, f"{message.full_name} has no field {name}"
        field = message.fields_by_name[name]
        if want.number is not None:
            assert field.number == want.number, f"{field.full_name} is numbered {field.number}"
        assert field.type in want.types, f"{field.full_name} has type {field.type}"
        # DESIGN's `{a=1, b=2}` notation names single values, never lists.
        assert not field.is_repeated, f"{field.full_name} is repeated"
    # A number DESIGN gives belongs to the field DESIGN names, and to no other.
    given = {want.number: name for name, want in fields.items() if want.number is not None}
    for field in message.fields:
        if field.number in given:
            assert field.name == given[field.number], (
                f"{message.full_name}: number {field.number} is {field.name}, "
                f"DESIGN §5 gives it to {given[field.number]}"
            )


@pytest.mark.parametrize(("method", "side"), [("PutObject", "request"), ("GetObject", "response")])
def test_each_stream_message_is_metadata_or_chunk(method: str, side: str) -> None:
    # "metadata{...} then chunk": every message of the stream carries one of the
    # two, never both, so they share a oneof.
    message = _message(method, side, ())
    metadata = message.fields_by_name["metadata"]
    chunk = message.fields_by_name["chunk"]
    assert metadata.containing_oneof is not None
    assert metadata.containing_oneof is chunk.containing_oneof


def test_get_object_version_id_is_optional() -> None:
    # DESIGN §5 lists version_id beside bucket_name and object_key; a get
    # without it reads the latest version, so "unset" must be distinguishable
    # from "set to empty" (proto3 `optional`; presence does not change the wire).
    field = _message("GetObject", "request", ()).fields_by_name["version_id"]
    assert field.has_presence


def test_extensions_stay_clear_of_anvil_numbers() -> None:
    # Not from DESIGN: object.proto's own header says numbers 1-99 follow
    # Anvil's definitions and anvil-compute's additions start at 100. In the
    # messages DESIGN §5 describes, every field DESIGN does not name must
    # therefore be numbered 100 or higher, so that it can never collide with a
    # field Anvil defines (or adds later) in the low range.
    for method, side, path, fields in MESSAGE_PINS:
        message = _message(method, side, path)
        for field in message.fields:
            if field.name not in fields:
                assert field.number >= 100, (
                    f"{field.full_name} = {field.number} is an addition in Anvil's range"
                )


@pytest.mark.parametrize(
    ("service", "methods"),
    [("anvil.ComputeService", COMPUTE_METHODS), ("anvil.PeerService", PEER_METHODS)],
)
def test_compute_and_peer_services_have_exactly_the_design_methods(
    service: str, methods: set[str]
) -> None:
    assert set(_service(service).methods_by_name) == methods


def test_watch_job_is_a_server_stream() -> None:
    method = _method("anvil.ComputeService", "WatchJob")
    assert method.server_streaming
    assert not method.client_streaming


def test_head_reads_a_real_anvils_answer_and_ours() -> None:
    """Anvil answers HeadObject with etag=1, size=2, last_modified=3; a peer adds
    its full description at 100. The client reads either."""
    from daemon.storage.anvil_client import head_info

    anvil = object_pb2.HeadObjectResponse(etag="e1", size=42, last_modified="2026-11-29T10:00:00Z")
    info = head_info("b", "k", object_pb2.HeadObjectResponse.FromString(anvil.SerializeToString()))
    assert (info.size, info.etag, info.sha256, info.version_id) == (42, "e1", None, "")
    ours = object_pb2.HeadObjectResponse(
        etag="e2",
        size=7,
        info=object_pb2.ObjectInfo(content_length=7, etag="e2", version_id="v9", sha256="ab" * 32),
    )
    full = head_info("b", "k", ours)
    assert (full.size, full.version_id, full.sha256) == (7, "v9", "ab" * 32)
    fields = {f.name: f.number for f in object_pb2.HeadObjectResponse.DESCRIPTOR.fields}
    assert fields == {"etag": 1, "size": 2, "last_modified": 3, "info": 100}
    assert object_pb2.ObjectInfo.DESCRIPTOR.fields_by_name["version_id"].number == 3
