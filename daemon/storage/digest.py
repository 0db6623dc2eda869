"""Verifying a stream of bytes against the sha256 and size it must have."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from daemon.exceptions import DigestMismatch


class DigestCheck:
    """Hashes chunks as they pass and checks the total against expectations.

    `update` raises DigestMismatch as soon as more bytes than `expected_size`
    arrive; `finish` raises it on a short stream or a different digest.
    """

    def __init__(
        self,
        *,
        what: str,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> None:
        self.what = what
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self.size = 0
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.expected_size is not None and self.size > self.expected_size:
            raise DigestMismatch(
                f"{self.what}: more than the expected {self.expected_size} bytes arrived"
            )
        self._hash.update(chunk)

    def finish(self) -> str:
        """Return the hex digest of everything seen; raises DigestMismatch if unexpected."""
        if self.expected_size is not None and self.size != self.expected_size:
            raise DigestMismatch(
                f"{self.what}: got {self.size} bytes, expected {self.expected_size}"
            )
        digest = self._hash.hexdigest()
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            raise DigestMismatch(
                f"{self.what}: content has sha256 {digest}, expected {self.expected_sha256}"
            )
        return digest


async def verified_chunks(chunks: AsyncIterable[bytes], check: DigestCheck) -> AsyncIterator[bytes]:
    """Yield `chunks`, holding the last one back until the whole stream verifies.

    A consumer therefore never receives every byte of an object that fails its
    check: DigestMismatch is raised in place of the final chunk.
    """
    pending: bytes | None = None
    async for chunk in chunks:
        if not chunk:
            continue
        check.update(chunk)
        if pending is not None:
            yield pending
        pending = chunk
    check.finish()
    if pending is not None:
        yield pending


def sha256_file(path: Path, *, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (blocking)."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as src:
        while chunk := src.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def file_matches(path: Path, *, sha256: str, size: int) -> bool:
    """Whether a file holds exactly `size` bytes hashing to `sha256` (blocking; False if gone)."""
    try:
        if path.stat().st_size != size:
            return False
        return sha256_file(path) == sha256
    except FileNotFoundError:
        return False
