"""gRPC message limits and client channels, the same for every link the daemon opens."""

from __future__ import annotations

import grpc
from grpc import aio

# Object chunks are 1 MiB; Anvil may send up to 32 MiB ones. Anything larger is
# refused by gRPC itself with RESOURCE_EXHAUSTED before a handler runs.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> aio.Channel:
    """A channel to HOST:PORT: TLS when `credentials` are given, else plaintext."""
    if credentials is not None:
        return aio.secure_channel(target, credentials, options=list(GRPC_OPTIONS))
    return aio.insecure_channel(target, options=list(GRPC_OPTIONS))
