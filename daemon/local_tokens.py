"""The tokens a peer mints with the fabric's shared secret: the two it leaves in
its data directory for local clients, and its own for calls to other peers."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import jwt

from daemon import auth
from daemon.config import Settings
from daemon.exceptions import AnvilError

# Tokens `serve` writes into the data directory; renewed while it runs, a day
# before they expire.
CLIENT_TOKEN_TTL_S = 30 * 24 * 3600
TOKEN_RENEW_BEFORE_S = 24 * 3600
TOKEN_CHECK_INTERVAL_S = 3600
PEER_TOKEN_TTL_S = 3600


def _fresh(path: Path, secret: bytes, scopes: tuple[str, ...]) -> bool:
    """A valid token with exactly these scopes and more than a day left is at `path`."""
    try:
        claims = auth.verify_token(path.read_text().strip(), secret)
    except (OSError, AnvilError, jwt.PyJWTError):
        return False
    return claims.exp - time.time() > TOKEN_RENEW_BEFORE_S and claims.scopes == frozenset(scopes)


def write_local_tokens(settings: Settings, secret: bytes) -> None:
    """client.token (a tenant: its own jobs, every bucket) and operator.token
    (registration, every job), 0600 in the data directory; kept if still fresh."""
    for path, sub, scopes in (
        (settings.token_path, "local-client", auth.CLIENT_SCOPES),
        (settings.operator_token_path, "local-operator", auth.OPERATOR_SCOPES),
    ):
        if not _fresh(path, secret, scopes):
            auth.write_token(path, secret, sub=sub, scopes=scopes, ttl_s=CLIENT_TOKEN_TTL_S)


class PeerToken:
    """This peer's bearer token for other peers, renewed well before it expires
    (a call may sit in a retry loop for minutes)."""

    def __init__(self, secret: bytes | None, peer_id: uuid.UUID) -> None:
        self._secret = secret
        self._peer_id = peer_id
        self._token: tuple[str, float] | None = None

    def __call__(self) -> str | None:
        """The token (None with authentication off)."""
        if self._secret is None:
            return None
        now = time.time()
        if self._token is None or self._token[1] - now < PEER_TOKEN_TTL_S / 4:
            token = auth.issue_token(
                self._secret,
                sub=f"{auth.PEER_SUBJECT_PREFIX}{self._peer_id}",
                scopes=auth.PEER_SCOPES,
                ttl_s=PEER_TOKEN_TTL_S,
            )
            self._token = (token, now + PEER_TOKEN_TTL_S)
        return self._token[0]
