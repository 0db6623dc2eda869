"""The one place where the daemon's errors become gRPC status codes.

`ErrorInterceptor` wraps every handler: an AnvilError aborts the call with the
status its `code` names and its message; anything else is logged with its
traceback and answered INTERNAL without leaking details to the client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from daemon.exceptions import AnvilError, ErrorCode

log = logging.getLogger(__name__)

GRPC_CODES: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
assert set(GRPC_CODES) == set(ErrorCode)

# From gRPC status back to our errors, for clients of other peers.
_ERROR_CODES = {grpc_code: code for code, grpc_code in GRPC_CODES.items()}


def grpc_code(exc: AnvilError) -> grpc.StatusCode:
    return GRPC_CODES[exc.code]


def error_code(code: grpc.StatusCode) -> ErrorCode:
    """The ErrorCode for a status received from another peer (INTERNAL if unmapped)."""
    return _ERROR_CODES.get(code, ErrorCode.INTERNAL)


async def _abort(context: aio.ServicerContext[Any, Any], exc: BaseException, method: str) -> None:
    if isinstance(exc, AnvilError):
        await context.abort(grpc_code(exc), str(exc))
    log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises this to unwind the handler; it must pass through.
    return isinstance(exc, aio.AbortError)


def _wrap_unary(
    behavior: Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]], method: str
) -> Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc, method)

    return handler


def _wrap_stream(
    behavior: Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterator[Any]], method: str
) -> Callable[[Any, aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc, method)

    return handler


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps exceptions raised by any handler to a gRPC status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # The handler is typed Any: grpcio's stubs describe the sync handler
        # signatures, while an aio server's behaviours are coroutines.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
