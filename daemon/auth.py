"""Bearer JWT auth (HS256, Anvil's claims `sub`, `exp`, `scopes`) and TLS credentials.

Scopes are spelled as Anvil spells them: `action` or `action|resource`, where
the action is `compute:submit`, `object:read`, ... (`family:*` and `*` cover
a family or everything) and the resource is a pattern: `*`, an exact name, or
a prefix ending in `*` (`object:read|photos/2026/*`). A scope without a
resource covers every resource. For objects the resource is `BUCKET/KEY`; for
`compute:submit` it is the capability (`compute:submit|text:*`).

Each RPC needs one of its actions (`METHOD_ACTIONS`) at the door; the handler
then decides on the resource (which bucket, whose job: daemon/access.py).
Health checks and reflection are open so load balancers and grpcurl work.
"""

from __future__ import annotations

import contextvars
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from grpc import aio

from daemon.exceptions import ConfigError, InvalidArgument, PermissionDenied, Unauthenticated

ALGORITHM = "HS256"
SCOPE_SUBMIT = "compute:submit"
SCOPE_READ = "compute:read"
SCOPE_REGISTER = "compute:register"
SCOPE_CANCEL = "compute:cancel"
# Sees and cancels every tenant's jobs (operators).
SCOPE_ADMIN = "compute:admin"
SCOPE_OBJECT_READ = "object:read"
SCOPE_OBJECT_WRITE = "object:write"
SCOPE_PEER = "peer:dispatch"
# A tenant's token (client.token): its own jobs, every bucket. No registration.
CLIENT_SCOPES = (
    SCOPE_SUBMIT,
    SCOPE_READ,
    SCOPE_CANCEL,
    SCOPE_OBJECT_READ,
    SCOPE_OBJECT_WRITE,
)
# An operator's token (operator.token): registration and every tenant's jobs.
OPERATOR_SCOPES = (*CLIENT_SCOPES, SCOPE_REGISTER, SCOPE_ADMIN)
# What one peer's token lets it do on another peer.
PEER_SCOPES = (SCOPE_PEER, SCOPE_OBJECT_READ, SCOPE_OBJECT_WRITE)
PEER_SUBJECT_PREFIX = "peer:"
KNOWN_ACTIONS = frozenset({*OPERATOR_SCOPES, SCOPE_PEER, "compute:*", "object:*", "peer:*", "*"})

# The actions that open each RPC (any one of them); the handler may check more.
METHOD_ACTIONS: dict[str, tuple[str, ...]] = {
    # Operators, or a peer for its own rows (checked in the handler).
    "/anvil.ComputeService/RegisterCapability": (SCOPE_REGISTER, SCOPE_PEER),
    "/anvil.ComputeService/DeregisterCapability": (SCOPE_REGISTER, SCOPE_PEER),
    "/anvil.ComputeService/ListCapabilities": (SCOPE_READ,),
    "/anvil.ComputeService/SubmitJob": (SCOPE_SUBMIT,),
    "/anvil.ComputeService/GetJobStatus": (SCOPE_READ,),
    "/anvil.ComputeService/WatchJob": (SCOPE_READ,),
    "/anvil.ComputeService/CancelJob": (SCOPE_CANCEL,),
    "/anvil.PeerService/Dispatch": (SCOPE_PEER,),
    "/anvil.PeerService/Heartbeat": (SCOPE_PEER,),
    "/anvil.ObjectService/PutObject": (SCOPE_OBJECT_WRITE,),
    # A job's submitter reads its outputs with compute:read alone.
    "/anvil.ObjectService/GetObject": (SCOPE_OBJECT_READ, SCOPE_READ),
    "/anvil.ObjectService/HeadObject": (SCOPE_OBJECT_READ, SCOPE_READ),
}
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
MAX_SCOPES = 256
MAX_SCOPE_LENGTH = 1024
_RESOURCE = re.compile(r"[^\x00-\x1f\x7f]+")


@dataclass(frozen=True, kw_only=True, slots=True)
class Scope:
    """One granted scope: an action (or wildcard) over a resource pattern."""

    action: str
    resource: str = "*"

    @classmethod
    def parse(cls, text: str) -> Scope:
        """`action` or `action|resource`. Raises InvalidArgument when malformed."""
        action, sep, resource = text.partition("|")
        if not action or (sep and not _RESOURCE.fullmatch(resource)):
            raise InvalidArgument(f"malformed scope {text!r}: expected ACTION or ACTION|RESOURCE")
        return cls(action=action, resource=resource if sep else "*")

    def covers_action(self, action: str) -> bool:
        if self.action in ("*", action):
            return True
        family, _, rest = self.action.partition(":")
        return rest == "*" and action.startswith(family + ":")

    def covers_resource(self, resource: str) -> bool:
        if self.resource == "*":
            return True
        if self.resource.endswith("*"):
            return resource.startswith(self.resource[:-1])
        return resource == self.resource

    def __str__(self) -> str:
        return self.action if self.resource == "*" else f"{self.action}|{self.resource}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Claims:
    """A verified caller: who it is, which tenant it acts for, what it may do."""

    sub: str
    scopes: frozenset[str]
    exp: int
    # Whose jobs these are: the token's tenant claim (Anvil's `tenant_id`), else its subject.
    tenant: str = ""
    granted: tuple[Scope, ...] = ()

    def __post_init__(self) -> None:
        if not self.tenant:
            object.__setattr__(self, "tenant", self.sub)
        if not self.granted:
            parsed = []
            for text in self.scopes:
                try:
                    parsed.append(Scope.parse(text))
                except InvalidArgument:
                    continue  # a scope we cannot read grants nothing
            object.__setattr__(self, "granted", tuple(parsed))

    def has_action(self, action: str) -> bool:
        """Whether some scope grants `action` on some resource (the door check)."""
        return any(s.covers_action(action) for s in self.granted)

    def allows(self, action: str, resource: str = "*") -> bool:
        """Whether some scope grants `action` on `resource` ('*': on everything)."""
        return any(
            s.covers_action(action)
            and (s.resource == "*" or (resource != "*" and s.covers_resource(resource)))
            for s in self.granted
        )

    @property
    def is_admin(self) -> bool:
        return self.allows(SCOPE_ADMIN)

    @property
    def peer_id(self) -> str | None:
        """The peer this token speaks for (`peer:<uuid>` with the peer scope), else None."""
        if self.sub.startswith(PEER_SUBJECT_PREFIX) and self.allows(SCOPE_PEER):
            return self.sub[len(PEER_SUBJECT_PREFIX) :]
        return None


# The verified caller of the current RPC, for handlers that record who asked.
current_claims: contextvars.ContextVar[Claims | None] = contextvars.ContextVar(
    "current_claims", default=None
)


def issue_token(
    secret: bytes, *, sub: str, scopes: Iterable[str], ttl_s: float, tenant: str = ""
) -> str:
    """A signed token for `sub` with the given scopes, valid for ttl_s seconds.

    Raises InvalidArgument for a malformed scope.
    """
    scopes = sorted(set(scopes))
    for scope in scopes:
        Scope.parse(scope)
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "scopes": scopes, "iat": now, "exp": now + int(ttl_s)}
    if tenant:
        payload["tenant"] = tenant
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
    if len(scopes) > MAX_SCOPES or any(len(s) > MAX_SCOPE_LENGTH for s in scopes):
        raise Unauthenticated(f"invalid token: at most {MAX_SCOPES} scopes of {MAX_SCOPE_LENGTH}")
    if not isinstance(payload["sub"], str) or not payload["sub"]:
        raise Unauthenticated("invalid token: 'sub' must be a non-empty string")
    # Our tokens name the tenant `tenant`; Anvil's own tokens carry `tenant_id`.
    tenant = payload.get("tenant")
    if tenant is None and payload.get("tenant_id") is not None:
        tenant = f"anvil-tenant:{payload['tenant_id']}"
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise Unauthenticated("invalid token: 'tenant' must be a non-empty string")
    return Claims(
        sub=payload["sub"], scopes=frozenset(scopes), exp=int(payload["exp"]), tenant=tenant or ""
    )


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

    def __len__(self) -> int:
        """How many verified tokens are held: never more than `max_entries`."""
        return len(self._claims)

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
    actions = METHOD_ACTIONS.get(method, ("*",))
    if not any(claims.has_action(action) for action in actions):
        wanted = " or ".join(repr(a) for a in actions)
        raise PermissionDenied(f"token for {claims.sub!r} lacks scope {wanted} for {method}")
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


def write_token(path: Path, secret: bytes, *, sub: str, scopes: Iterable[str], ttl_s: float) -> str:
    """Write a new token to `path` (mode 0600, replaced atomically); return it."""
    token = issue_token(secret, sub=sub, scopes=scopes, ttl_s=ttl_s)
    _write_private(path, token + "\n")
    return token


def parse_ttl(text: str) -> float:
    """Seconds in `90s`, `15m`, `12h`, `30d` (or plain seconds). Raises InvalidArgument."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None or float(match[1]) <= 0:
        raise InvalidArgument(f"bad time to live {text!r}: expected e.g. 3600, 90s, 15m, 12h, 30d")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


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
