import pytest

from daemon import auth
from daemon.exceptions import PermissionDenied, Unauthenticated
from tests.eventually import eventually_sync

SECRET = b"k" * 40


def test_a_cached_token_still_expires() -> None:
    tokens = auth.VerifiedTokens(SECRET)
    token = auth.issue_token(SECRET, sub="a", scopes=[auth.SCOPE_READ], ttl_s=1)
    assert tokens.verify(token).sub == "a"
    assert tokens.verify(token).sub == "a"  # from the cache

    def refused() -> str:
        try:
            tokens.verify(token)
        except Unauthenticated as exc:
            return str(exc)
        return ""

    # Expiry is whole seconds of the wall clock (VerifiedTokens takes no clock):
    # this token's ends within a second; a cache that kept it would never refuse.
    assert "expired" in eventually_sync(refused, timeout=3)


def test_forged_tokens_are_never_cached_as_valid() -> None:
    tokens = auth.VerifiedTokens(SECRET)
    forged = auth.issue_token(b"x" * 40, sub="a", scopes=["*"], ttl_s=60)
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="invalid token"):
            tokens.verify(forged)


def test_the_cache_is_bounded_and_scopes_still_apply() -> None:
    tokens = auth.VerifiedTokens(SECRET, max_entries=3)
    issued = [auth.issue_token(SECRET, sub=str(i), scopes=[], ttl_s=60) for i in range(10)]
    for token in issued:
        tokens.verify(token)
    assert len(tokens) == 3
    metadata = [("authorization", f"Bearer {issued[0]}")]
    with pytest.raises(PermissionDenied, match="lacks scope 'compute:submit'"):
        auth.authorize("/anvil.ComputeService/SubmitJob", metadata, tokens)
    assert auth.authorize("/grpc.health.v1.Health/Check", [], tokens) is None
