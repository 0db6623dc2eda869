"""Bearer JWT auth (HS256, Anvil's claims `sub`, `exp`, `scopes`) and TLS credentials.

Each RPC needs one scope (`METHOD_SCOPES`); health checks and reflection are
open so load balancers and grpcurl work. A scope matches exactly, or through a
wildcard held by the caller (`compute:*`, `peer:*`, `*`).
"""

from __future__ import annotations

import contextvars
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from grpc import aio

from daemon.exceptions import ConfigError, PermissionDenied, Unauthenticated

ALGORITHM = "HS256"
SCOPE_SUBMIT = "compute:submit"
SCOPE_READ = "compute:read"
SCOPE_REGISTER = "compute:register"
SCOPE_CANCEL = "compute:cancel"
SCOPE_OBJECT_READ = "object:read"
SCOPE_OBJECT_WRITE = "object:write"
SCOPE_PEER = "peer:dispatch"
CLIENT_SCOPES = (
    SCOPE_SUBMIT,
    SCOPE_READ,
    SCOPE_REGISTER,
    SCOPE_CANCEL,
    SCOPE_OBJECT_READ,
    SCOPE_OBJECT_WRITE,
)

METHOD_SCOPES: dict[str, str] = {
    "/anvil.ComputeService/RegisterCapability": SCOPE_REGISTER,
    "/anvil.ComputeService/DeregisterCapability": SCOPE_REGISTER,
    "/anvil.ComputeService/ListCapabilities": SCOPE_READ,
    "/anvil.ComputeService/SubmitJob": SCOPE_SUBMIT,
    "/anvil.ComputeService/GetJobStatus": SCOPE_READ,
    "/anvil.ComputeService/WatchJob": SCOPE_READ,
    "/anvil.ComputeService/CancelJob": SCOPE_CANCEL,
    "/anvil.PeerService/Dispatch": SCOPE_PEER,
    "/anvil.PeerService/Heartbeat": SCOPE_PEER,
    "/anvil.ObjectService/PutObject": SCOPE_OBJECT_WRITE,
    "/anvil.ObjectService/GetObject": SCOPE_OBJECT_READ,
    "/anvil.ObjectService/HeadObject": SCOPE_OBJECT_READ,
}
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Claims:
    sub: str
    scopes: frozenset[str]
    exp: int

    def allows(self, scope: str) -> bool:
        if scope in self.scopes or "*" in self.scopes:
            return True
        family = scope.split(":", 1)[0]
        return f"{family}:*" in self.scopes


# The verified caller of the current RPC, for handlers that record who asked.
current_claims: contextvars.ContextVar[Claims | None] = contextvars.ContextVar(
    "current_claims", default=None
)


def issue_token(secret: bytes, *, sub: str, scopes: Iterable[str], ttl_s: float) -> str:
    """A signed token for `sub` with the given scopes, valid for ttl_s seconds."""
    now = int(time.time())
    payload = {"sub": sub, "scopes": sorted(scopes), "iat": now, "exp": now + int(ttl_s)}
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify_token(token: str, secret: bytes) -> Claims:
    """Check signature, expiry and claim types; raise Unauthenticated with the reason."""
    try:
        payload = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"invalid token: {exc}") from exc
    scopes = payload.get("scopes", [])
    if isinstance(scopes, str):  # Anvil also writes scopes space-separated
        scopes = scopes.split()
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise Unauthenticated("invalid token: 'scopes' must be a list of strings")
    if not isinstance(payload["sub"], str):
        raise Unauthenticated("invalid token: 'sub' must be a string")
    return Claims(sub=payload["sub"], scopes=frozenset(scopes), exp=int(payload["exp"]))


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token from `authorization: Bearer <token>`; raise Unauthenticated if absent."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    raise Unauthenticated("missing authorization metadata (Bearer token)")


class VerifiedTokens:
    """Claims of tokens already verified, so a client's every call does not redo it.

    Keyed by the token's exact text, whose signature fixes its claims; expiry
    is checked again on every use. Bounded: the oldest entry goes first.
    """

    def __init__(self, secret: bytes, *, max_entries: int = 4096) -> None:
        self._secret = secret
        self._max = max_entries
        self._claims: dict[str, Claims] = {}

    def verify(self, token: str) -> Claims:
        """Like verify_token, from the cache when possible; raises Unauthenticated."""
        claims = self._claims.get(token)
        if claims is not None and claims.exp > time.time():
            return claims
        self._claims.pop(token, None)
        claims = verify_token(token, self._secret)
        if len(self._claims) >= self._max:
            del self._claims[next(iter(self._claims))]
        self._claims[token] = claims
        return claims


def authorize(method: str, metadata: Any, tokens: VerifiedTokens) -> Claims | None:
    """Claims of the caller allowed to call `method`; None for open methods.

    Raises Unauthenticated (no/bad token) or PermissionDenied (missing scope);
    unknown methods need a token with the `*` scope.
    """
    if method.startswith(OPEN_METHOD_PREFIXES):
        return None
    claims = tokens.verify(bearer_token(metadata))
    scope = METHOD_SCOPES.get(method, "*")
    if not claims.allows(scope):
        raise PermissionDenied(f"token for {claims.sub!r} lacks scope {scope!r} for {method}")
    return claims


class AuthInterceptor(aio.ServerInterceptor):
    """Rejects calls without a valid token holding the method's scope."""

    def __init__(self, secret: bytes) -> None:
        self._tokens = VerifiedTokens(secret)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        try:
            claims = authorize(
                handler_call_details.method, handler_call_details.invocation_metadata, self._tokens
            )
        except (Unauthenticated, PermissionDenied) as exc:
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if isinstance(exc, Unauthenticated)
                else grpc.StatusCode.PERMISSION_DENIED
            )
            return _rejecting_handler(code, str(exc))
        current_claims.set(claims)
        return await continuation(handler_call_details)


def _rejecting_handler(code: grpc.StatusCode, message: str) -> Any:
    async def reject(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    # A unary-unary handler answers streaming calls too: the status is sent
    # before any message is read or written.
    return grpc.unary_unary_rpc_method_handler(reject)


def load_or_create_secret(path: Path) -> bytes:
    """The shared HS256 secret; created (0600, 32 random bytes hex) when missing."""
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = secrets.token_hex(32)
        _write_private(path, text + "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read auth secret {path}: {exc}") from exc
    if len(text) < 32:
        raise ConfigError(f"auth secret in {path} is shorter than 32 characters")
    return text.encode()


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_client_token(path: Path, secret: bytes, *, ttl_s: float) -> str:
    """Write a token with every client scope to `path` (mode 0600); return it."""
    token = issue_token(secret, sub="local-client", scopes=CLIENT_SCOPES, ttl_s=ttl_s)
    _write_private(path, token + "\n")
    return token


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    # CA that signs client certificates; when set, clients must present one (mTLS).
    client_ca: Path | None = None


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server TLS credentials; require client certificates when client_ca is set."""
    try:
        pair = (tls.key.read_bytes(), tls.cert.read_bytes())
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS files: {exc}") from exc
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(
    *, ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client TLS credentials (with a client certificate for mTLS when given)."""
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes() if ca else None,
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
    except OSError as exc:
        raise ConfigError(f"cannot read TLS files: {exc}") from exc
