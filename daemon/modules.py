"""A capability's module, pinned to the digest of its bytes when it is configured or
registered: later writes to the module's object (or file) are never run.

A pinned module is `(ref, sha256)`: an object ref carrying its version and
`sha256=`, or a path on the peer beside the digest its bytes had at start. The
runner fetches the ref with its digest, and the WASM worker checks a path's
bytes against it, so bytes that differ fail the job instead of running.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

from daemon.capability_config import LocalCapability
from daemon.exceptions import AnvilError, FailedPrecondition, InvalidArgument
from daemon.executors.wasm.validate import check_module_file
from daemon.storage.digest import sha256_file
from daemon.storage.fetcher import Fetcher
from daemon.storage.refs import ObjectRef, Scheme, parse_ref, validate_sha256

# Resolves an object ref to the same ref pinned by version and sha256.
Resolver = Callable[[ObjectRef], Awaitable[ObjectRef]]
# Checks that a pinned module can run; raises InvalidModule / DigestMismatch /
# the fetch's errors.
ModuleCheck = Callable[[str], Awaitable[None]]
# Checking a module compiles it; a module this slow to compile is refused.
CHECK_TIMEOUT_S = 60.0


def is_object_ref(module: str) -> bool:
    return "://" in module or module.startswith("sha256:")


async def pin_module(
    module: str, sha256: str, *, resolve: Resolver, own_config: bool
) -> tuple[str, str]:
    """(the module's pinned ref or path, its sha256 hex).

    `sha256` (may be empty) is what the operator expects. An object ref is
    resolved now, except in this peer's own config (`own_config`) when the
    operator gave its digest (the object may not be stored yet). A path is
    hashed now in the peer's own config; a registration for another peer
    cannot read that peer's files, so it must give the digest. Raises
    InvalidArgument, FailedPrecondition (the bytes differ from `sha256`), and
    the resolver's errors (ObjectNotFound, Unavailable).
    """
    expected = validate_sha256(sha256) if sha256 else None
    if is_object_ref(module):
        ref = parse_ref(module)
        if ref.scheme is Scheme.SHA256 or ref.sha256 is not None:
            pass  # the ref names its digest itself
        elif expected is not None and own_config:
            ref = ref.with_sha256(expected)
        else:
            ref = await resolve(ref)
        pinned, digest = str(ref), ref.sha256
    elif own_config:
        try:
            digest = await asyncio.to_thread(sha256_file, Path(module))
        except OSError as exc:
            raise InvalidArgument(f"cannot read module {module}: {exc.strerror}") from exc
        pinned = module
    elif expected is not None:
        pinned, digest = module, expected
    else:
        raise InvalidArgument(
            f"module {module!r} is a path on the peer: give its module_sha256, "
            "or name it by an object ref"
        )
    assert digest is not None
    if expected is not None and digest != expected:
        raise FailedPrecondition(
            f"module {module} has sha256 {digest}, not the expected {expected}: refusing it"
        )
    return pinned, digest


async def pin_or_explain(
    name: str, module: str, sha256: str, *, resolve: Resolver
) -> tuple[str, str]:
    """pin_module for a capability in this peer's config; errors name the capability."""
    try:
        return await pin_module(module, sha256, resolve=resolve, own_config=True)
    except AnvilError as exc:
        hint = (
            " (store the module first, or set its sha256 in the config to pin it without a lookup)"
            if is_object_ref(module)
            else ""
        )
        raise type(exc)(f"capability {name!r}: cannot pin its module: {exc}{hint}") from exc


async def pin_capabilities(
    capabilities: tuple[LocalCapability, ...], resolve: Resolver
) -> tuple[LocalCapability, ...]:
    """Each WASM capability of this peer's config with its module pinned by sha256
    (resolved now when the config gives none). Raises AnvilError naming the capability."""
    pinned = []
    for cap in capabilities:
        if cap.kind != "wasm":
            pinned.append(cap)
            continue
        module, digest = await pin_or_explain(
            cap.name, cap.module, cap.module_sha256, resolve=resolve
        )
        pinned.append(dataclasses.replace(cap, module=module, module_sha256=digest))
    return tuple(pinned)


async def check_fetched(fetcher: Fetcher, ref: str) -> None:
    """Fetch a pinned module through the verified cache and check that a WASM worker
    will run it (a WASI preview 1 command importing nothing else).

    Raises InvalidModule, DigestMismatch, ObjectNotFound, Unavailable, and
    FailedPrecondition when compiling it takes longer than CHECK_TIMEOUT_S.
    """
    async with fetcher.open(ref) as obj:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await asyncio.to_thread(check_module_file, obj.path, obj.sha256)
        except TimeoutError:
            raise FailedPrecondition(
                f"module {ref} took longer than {CHECK_TIMEOUT_S:g} s to compile"
            ) from None
