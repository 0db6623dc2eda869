"""Compiled modules in three levels: memory (LRU by sha256), disk (`Module.serialize`), compile.

`Module.deserialize` runs native code from its input, so the disk level only
ever loads files this daemon sealed itself: each file carries an HMAC-SHA256,
under a secret kept in the cache folder, over the cache key (module digest +
wasmtime version + engine configuration) and the payload. A file that is
foreign, tampered, truncated, renamed or from another engine is refused,
removed and the module recompiled.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wasmtime import Engine, InstancePre, Module, WasmtimeError

from daemon.exceptions import DigestMismatch, InvalidArgument, InvalidModule
from daemon.executors.wasm.lru import LruCache

log = logging.getLogger(__name__)

WASM_MAGIC = b"\0asm"
_FILE_MAGIC = b"ANVLCWM1"
_MAC_SIZE = 32
_SECRET_SIZE = 32
_SECRET_NAME = "cache.key"


class Level(enum.Enum):
    """Where `ModuleCache.get` found the module."""

    MEMORY = "memory"
    DISK = "disk"
    COMPILED = "compiled"


# --- sealing: pure -----------------------------------------------------------


def seal(secret: bytes, key: str, payload: bytes) -> bytes:
    """The bytes of a cache file holding `payload` under `key`."""
    return _FILE_MAGIC + _mac(secret, key, payload) + payload


def unseal(secret: bytes, key: str, blob: bytes) -> bytes | None:
    """The payload if `blob` was sealed under this secret and key, else None."""
    head = len(_FILE_MAGIC) + _MAC_SIZE
    if len(blob) <= head or not blob.startswith(_FILE_MAGIC):
        return None
    mac, payload = blob[len(_FILE_MAGIC) : head], blob[head:]
    if not hmac.compare_digest(mac, _mac(secret, key, payload)):
        return None
    return payload


def _mac(secret: bytes, key: str, payload: bytes) -> bytes:
    h = hmac.new(secret, key.encode() + b"\n", hashlib.sha256)
    h.update(payload)
    return h.digest()


# --- disk level --------------------------------------------------------------


def load_or_create_secret(directory: Path) -> bytes:
    """The folder's sealing secret, created (mode 0600) on first use; safe to race."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / _SECRET_NAME
    try:
        secret = path.read_bytes()
        if len(secret) == _SECRET_SIZE:
            return secret
        replace = True  # unusable: start over, every old file becomes a miss
    except FileNotFoundError:
        replace = False
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".key-")
    try:
        os.write(fd, secrets.token_bytes(_SECRET_SIZE))
        os.fsync(fd)
        os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            # Atomic create-if-absent: when two processes race, the first link wins.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path.read_bytes()


class DiskModuleCache:
    """Sealed `Module.serialize` files, one per (module digest, engine key)."""

    def __init__(self, directory: Path, *, secret: bytes, engine_key: str) -> None:
        self.directory = directory
        self._secret = secret
        self._engine_key = engine_key
        self._engine_tag = hashlib.sha256(engine_key.encode()).hexdigest()[:16]
        self.rejected = 0

    def path_for(self, digest: str) -> Path:
        return self.directory / f"{digest}-{self._engine_tag}.cwasm"

    def _key(self, digest: str) -> str:
        return f"{digest}\n{self._engine_key}"

    def load(self, digest: str) -> bytes | None:
        """The verified payload for `digest`, or None (missing or refused and removed)."""
        path = self.path_for(digest)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("module cache: cannot read %s: %s", path, exc)
            return None
        payload = unseal(self._secret, self._key(digest), blob)
        if payload is None:
            self.discard(digest, "not sealed by this daemon for this engine")
        return payload

    def discard(self, digest: str, why: str) -> None:
        """Count and remove a refused file, so the next store rewrites it."""
        self.rejected += 1
        path = self.path_for(digest)
        log.warning("module cache: refusing %s (%s); recompiling", path, why)
        path.unlink(missing_ok=True)

    def store(self, digest: str, payload: bytes) -> None:
        """Write atomically (temp file + rename); a failure only costs a later recompile."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(seal(self._secret, self._key(digest), payload))
                os.replace(tmp, self.path_for(digest))
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("module cache: cannot write %s: %s", self.path_for(digest), exc)


# --- the three levels --------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadedModule:
    """A compiled module with its imports resolved, ready to instantiate."""

    digest: str
    module: Module
    pre: InstancePre


class ModuleCache:
    """`get(digest)` → memory hit, else disk load, else compile (then fill both levels).

    One per process, used from one thread. `prepare` links a module (resolves
    its imports) and raises InvalidModule when it cannot be run.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        prepare: Callable[[Module], InstancePre],
        disk: DiskModuleCache | None,
        max_entries: int = 64,
        max_bytes: int = 512 << 20,
        max_module_bytes: int = 64 << 20,
    ) -> None:
        self._engine = engine
        self._prepare = prepare
        self.disk = disk
        self.max_module_bytes = max_module_bytes
        self.memory: LruCache[str, LoadedModule] = LruCache(
            max_entries=max_entries, max_bytes=max_bytes
        )
        self.counts: dict[Level, int] = dict.fromkeys(Level, 0)

    def get(self, digest: str, wasm_path: Path) -> tuple[LoadedModule, Level]:
        """The module whose bytes hash to `digest`; `wasm_path` is read only on a miss.

        Raises InvalidModule (not wasm, does not compile or link), DigestMismatch
        (the file's bytes are not `digest`), InvalidArgument (file unreadable).
        """
        loaded = self.memory.get(digest)
        if loaded is not None:
            self.counts[Level.MEMORY] += 1
            return loaded, Level.MEMORY
        module, size, level = self._load(digest, wasm_path)
        loaded = LoadedModule(digest=digest, module=module, pre=self._prepare(module))
        self.memory.put(digest, loaded, size)
        self.counts[level] += 1
        return loaded, level

    def _load(self, digest: str, wasm_path: Path) -> tuple[Module, int, Level]:
        if self.disk is not None:
            payload = self.disk.load(digest)
            if payload is not None:
                try:
                    return Module.deserialize(self._engine, payload), len(payload), Level.DISK
                except WasmtimeError as exc:
                    self.disk.discard(digest, f"wasmtime refused it: {exc}")
        wasm = read_module(wasm_path, digest, self.max_module_bytes)
        module = compile_module(self._engine, wasm)
        size = len(wasm)
        if self.disk is not None:
            serialized = module.serialize()
            size = len(serialized)
            self.disk.store(digest, bytes(serialized))
        return module, size, Level.COMPILED


def read_module(path: Path, digest: str, max_bytes: int) -> bytes:
    """The file's bytes, checked against its size bound and its sha256 digest."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise InvalidModule(f"module is {size:,} bytes, over the {max_bytes:,} limit")
            wasm = f.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidArgument(f"cannot read module {path}: {exc.strerror}") from exc
    if len(wasm) > max_bytes:
        raise InvalidModule(f"module is over the {max_bytes:,} byte limit")
    actual = hashlib.sha256(wasm).hexdigest()
    if actual != digest:
        raise DigestMismatch(f"module {path} has sha256 {actual}, expected {digest}")
    return wasm


def compile_module(engine: Engine, wasm: bytes) -> Module:
    """Compile a wasm binary (never WAT text). Raises InvalidModule with wasmtime's reason."""
    if not wasm.startswith(WASM_MAGIC):
        raise InvalidModule("not a WebAssembly binary (no \\0asm header)")
    try:
        return Module(engine, wasm)
    except WasmtimeError as exc:
        raise InvalidModule(wasmtime_reason(str(exc))) from None


def wasmtime_reason(text: str) -> str:
    """The useful line of a wasmtime error: its root cause, without the backtrace."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    if "Caused by:" in lines:
        causes = lines[lines.index("Caused by:") + 1 :]
        if causes:
            head, sep, rest = causes[-1].partition(": ")
            cause = rest if sep and head.isdigit() else causes[-1]
            return cause if lines[0].endswith(":") else f"{lines[0]}: {cause}"
    return lines[0]
