"""Module cache levels against real wasmtime: memory → disk → compile, and what the
disk level refuses to load."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_wasm_guests as guests
import wasmtime

from daemon.exceptions import DigestMismatch
from daemon.executors.result import RunEnd
from daemon.executors.wasm.engine import EngineSettings
from daemon.executors.wasm.executor import WasmExecutor
from daemon.executors.wasm.limits import Limits
from daemon.executors.wasm.module_cache import Level, load_or_create_secret
from daemon.executors.wasm.pool import PoolSettings
from daemon.executors.wasm.sandbox import RunRequest, Sandbox


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def sandbox(cache_dir: Path, settings: EngineSettings | None = None) -> Sandbox:
    return Sandbox(settings, cache_dir=cache_dir, cache_secret=load_or_create_secret(cache_dir))


@pytest.fixture
def box(cache_dir: Path) -> Iterator[Sandbox]:
    with sandbox(cache_dir) as sb:
        yield sb


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.cwasm"))


def digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_echo(
    sb: Sandbox, tmp_path: Path, module: Path, name: str, digest: str | None = None
) -> bytes:
    out = tmp_path / name
    out.mkdir()
    (tmp_path / "in").mkdir(exist_ok=True)
    result = sb.run(
        RunRequest(
            digest=digest or digest_of(module),
            module_path=module,
            argv=("g",),
            env=(),
            stdin_path=None,
            input_dir=tmp_path / "in",
            output_dir=out,
            limits=Limits(),
        )
    )
    assert result.outcome is RunEnd.OK, result.message
    return result.stdout


def test_levels_compile_then_memory_then_disk(tmp_path: Path, cache_dir: Path) -> None:
    module = guests.write_module(tmp_path, guests.echo("levels"))
    digest = digest_of(module)
    with sandbox(cache_dir) as first:
        loaded, level = first.cache.get(digest, module)
        assert level is Level.COMPILED
        again, level = first.cache.get(digest, module)
        assert level is Level.MEMORY
        assert again is loaded  # the same Module and InstancePre, reused
    module.unlink()  # a disk hit must not need the wasm bytes
    with sandbox(cache_dir) as second:
        _, level = second.cache.get(digest, module)
        assert level is Level.DISK
        assert run_echo(second, tmp_path, module, "out", digest) == b"levelsg\0"


def test_cache_file_is_written_atomically_and_privately(
    tmp_path: Path, cache_dir: Path, box: Sandbox
) -> None:
    module = guests.write_module(tmp_path, guests.echo())
    box.cache.get(digest_of(module), module)
    assert box.cache.disk is not None
    path = box.cache.disk.path_for(digest_of(module))
    assert path.is_file()
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(["cache.key", path.name])
    assert (cache_dir / "cache.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("damage", ["flip-payload-byte", "flip-mac-byte", "truncate", "empty"])
def test_tampered_cache_file_is_refused_and_recompiled(
    tmp_path: Path, cache_dir: Path, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = guests.write_module(tmp_path, guests.echo("genuine"))
    digest = digest_of(module)
    with sandbox(cache_dir) as first:
        first.cache.get(digest, module)
        assert first.cache.disk is not None
        path = first.cache.disk.path_for(digest)
    blob = bytearray(path.read_bytes())
    if damage == "flip-payload-byte":
        blob[len(blob) // 2] ^= 0x01
    elif damage == "flip-mac-byte":
        blob[10] ^= 0x01
    elif damage == "truncate":
        del blob[len(blob) // 2 :]
    else:
        blob.clear()
    path.write_bytes(bytes(blob))

    deserialized: list[int] = []
    real = wasmtime.Module.deserialize.__func__  # type: ignore[attr-defined]

    def spy(cls: type[wasmtime.Module], engine: wasmtime.Engine, data: bytes) -> wasmtime.Module:
        deserialized.append(len(data))
        return real(cls, engine, data)  # type: ignore[no-any-return]

    monkeypatch.setattr(wasmtime.Module, "deserialize", classmethod(spy))
    with sandbox(cache_dir) as second:
        _, level = second.cache.get(digest, module)
        assert level is Level.COMPILED
        assert deserialized == []  # the damaged bytes never reached wasmtime
        assert second.cache.disk is not None
        assert second.cache.disk.rejected == 1
        assert run_echo(second, tmp_path, module, "out") == b"genuineg\0"
    with sandbox(cache_dir) as third:  # the file was rewritten, sealed again
        _, level = third.cache.get(digest, module)
        assert level is Level.DISK


def test_another_modules_valid_cache_file_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    """A genuine sealed artifact, put under another module's name, does not run as it."""
    a = guests.write_module(tmp_path, guests.echo("module-a"))
    b = guests.write_module(tmp_path, guests.echo("module-b"))
    with sandbox(cache_dir) as first:
        first.cache.get(digest_of(a), a)
        first.cache.get(digest_of(b), b)
        assert first.cache.disk is not None
        path_a = first.cache.disk.path_for(digest_of(a))
        path_b = first.cache.disk.path_for(digest_of(b))
    path_a.write_bytes(path_b.read_bytes())
    with sandbox(cache_dir) as second:
        _, level = second.cache.get(digest_of(a), a)
        assert level is Level.COMPILED
        assert run_echo(second, tmp_path, a, "out") == b"module-ag\0"


def test_raw_serialized_module_is_never_loaded(tmp_path: Path, cache_dir: Path) -> None:
    """Bytes straight from Module.serialize — valid for wasmtime — but not sealed by us."""
    module = guests.write_module(tmp_path, guests.echo("ours"))
    evil = guests.echo("evil")
    with sandbox(cache_dir) as first:
        assert first.cache.disk is not None
        path = first.cache.disk.path_for(digest_of(module))
        path.write_bytes(bytes(wasmtime.Module(first.engine, evil).serialize()))
        _, level = first.cache.get(digest_of(module), module)
        assert level is Level.COMPILED
        assert run_echo(first, tmp_path, module, "out") == b"oursg\0"


def test_a_file_sealed_with_another_secret_is_refused(tmp_path: Path) -> None:
    module = guests.write_module(tmp_path, guests.echo())
    with sandbox(tmp_path / "one") as one:
        one.cache.get(digest_of(module), module)
        assert one.cache.disk is not None
        sealed = one.cache.disk.path_for(digest_of(module)).read_bytes()
    with sandbox(tmp_path / "two") as two:
        assert two.cache.disk is not None
        two.cache.disk.path_for(digest_of(module)).write_bytes(sealed)
        _, level = two.cache.get(digest_of(module), module)
        assert level is Level.COMPILED
        assert two.cache.disk.rejected == 1


def test_engine_config_is_part_of_the_key(tmp_path: Path, cache_dir: Path) -> None:
    module = guests.write_module(tmp_path, guests.echo())
    with sandbox(cache_dir) as default:
        default.cache.get(digest_of(module), module)
    with sandbox(cache_dir, EngineSettings(max_wasm_stack=256 * 1024)) as other:
        _, level = other.cache.get(digest_of(module), module)
        assert level is Level.COMPILED
        assert other.cache.disk is not None
        assert other.cache.disk.rejected == 0
    assert len(cache_files(cache_dir)) == 2


def test_wrong_bytes_for_the_digest_raise(tmp_path: Path, box: Sandbox) -> None:
    module = guests.write_module(tmp_path, guests.echo())
    with pytest.raises(DigestMismatch):
        box.cache.get("ab" * 32, module)


def test_memory_level_is_bounded(tmp_path: Path) -> None:
    with Sandbox(memory_cache_entries=2) as sb:
        paths = [guests.write_module(tmp_path, guests.echo(f"m{i}")) for i in range(3)]
        for p in paths:
            sb.cache.get(digest_of(p), p)
        assert sb.cache.memory.keys() == [digest_of(p) for p in paths[1:]]
        _, level = sb.cache.get(digest_of(paths[0]), paths[0])
        assert level is Level.COMPILED  # no disk level: evicted means recompiled


@pytest.mark.parametrize(
    ("wat", "refusal"),
    [
        ('(module (memory 1 1 shared) (func (export "_start")))', "threads must be enabled"),
        ('(module (tag $e) (func (export "_start") (throw $e)))', "exceptions proposal not"),
        ('(module (type $s (struct)) (func (export "_start")))', "without the gc feature"),
        ('(module (memory 1) (memory 1) (func (export "_start")))', "multiple memories"),
        ('(module (memory i64 1) (func (export "_start")))', "memory64 must be enabled"),
    ],
    ids=["threads", "exceptions", "gc", "multi-memory", "memory64"],
)
def test_unneeded_wasm_features_are_off(tmp_path: Path, wat: str, refusal: str) -> None:
    wasm = bytes(wasmtime.wat2wasm(wat))
    wasmtime.Module(wasmtime.Engine(), wasm)  # wasmtime's default engine accepts it
    module = guests.write_module(tmp_path, wasm)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    with Sandbox() as sb:
        result = sb.run(
            RunRequest(
                digest=digest_of(module),
                module_path=module,
                argv=(),
                env=(),
                stdin_path=None,
                input_dir=tmp_path / "in",
                output_dir=tmp_path / "out",
                limits=Limits(),
            )
        )
    assert result.outcome is RunEnd.INVALID_MODULE
    assert refusal in result.message


def test_racing_creators_agree_on_one_secret(tmp_path: Path) -> None:
    secrets: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: secrets.append(load_or_create_secret(tmp_path / "c")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(secrets)) == 1
    assert len(secrets[0]) == 32
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["cache.key"]


async def test_pool_recompiles_over_a_tampered_file(tmp_path: Path, cache_dir: Path) -> None:
    """Through the real worker processes, which share the disk level between pools."""
    module = guests.write_module(tmp_path, guests.echo("pooled"))

    async def run_in_a_new_pool(name: str) -> bytes:
        async with WasmExecutor(PoolSettings(workers=1, cache_dir=cache_dir)) as ex:
            out = tmp_path / name
            out.mkdir()
            result = await ex.run(module, output_dir=out)
            assert result.outcome is RunEnd.OK, result.message
            return result.stdout

    assert await run_in_a_new_pool("o1") == b"pooledguest\0"
    [cached] = cache_files(cache_dir)
    tampered = bytearray(cached.read_bytes())
    tampered[10] ^= 0xFF  # inside the MAC: wasmtime itself would load the payload
    cached.write_bytes(bytes(tampered))
    assert await run_in_a_new_pool("o2") == b"pooledguest\0"
    assert cached.read_bytes() != bytes(tampered)  # refused, recompiled, sealed again
    with sandbox(cache_dir) as sb:
        _, level = sb.cache.get(digest_of(module), module)
        assert level is Level.DISK
