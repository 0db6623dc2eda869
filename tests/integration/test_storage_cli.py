"""`anvil-compute put` / `get`, run as real processes against a peer or a data directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
from grpc import aio

from daemon.storage.local_store import LocalStore
from daemon.storage.object_service import GRPC_OPTIONS, add_object_service
from daemon.storage.refs import Scheme, parse_ref

MiB = 1 << 20

# The CLI with the objects subcommands registered (daemon.cli is not ours to edit).
CLI = """
import sys
import daemon.cli
daemon.cli.COMMAND_MODULES = ("daemon.commands.objects",)
sys.exit(daemon.cli.main(sys.argv[1:]))
"""


async def cli(*args: str | Path, cwd: Path | None = None) -> tuple[int, bytes, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLI,
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out, err.decode()


def content(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[str]:
    server = aio.server(options=GRPC_OPTIONS)
    add_object_service(server, LocalStore(tmp_path / "peer"))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(3 * MiB + 5))
    return path


@pytest.mark.parametrize("target", ["--data-dir", "--endpoint"])
async def test_put_prints_a_ref_that_get_fetches(
    src: Path, tmp_path: Path, endpoint: str, target: str
) -> None:
    where = str(tmp_path / "data") if target == "--data-dir" else endpoint
    code, out, err = await cli("put", src, "--bucket", "models", target, where)
    assert code == 0, err
    ref = parse_ref(out.decode().strip())
    assert (ref.scheme, ref.bucket, ref.key) == (Scheme.ANVIL, "models", "model.bin")
    assert ref.sha256 == hashlib.sha256(content(src)).hexdigest()
    assert ref.version

    code, _, err = await cli("get", str(ref), target, where, "-o", tmp_path / "copy")
    assert code == 0, err
    assert content(tmp_path / "copy") == content(src)
    assert f"sha256 {ref.sha256}" in err

    code, out, err = await cli("get", "anvil://models/model.bin", target, where, "-o", "-")
    assert code == 0, err
    assert out == content(src)


async def test_get_names_the_file_after_the_key_and_reads_digest_refs(
    src: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    code, out, err = await cli("put", src, "--key", "dir/weights.bin", "--data-dir", data_dir)
    assert code == 0, err
    ref = parse_ref(out.decode().strip())
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = await cli("get", ref.location, "--data-dir", data_dir, cwd=work)
    assert code == 0, err
    assert content(work / "weights.bin") == content(src)
    code, out, err = await cli("get", f"sha256:{ref.sha256}", "--data-dir", data_dir, "-o", "-")
    assert code == 0, err
    assert out == content(src)


async def test_a_wrong_digest_fails_and_writes_nothing(
    src: Path, tmp_path: Path, endpoint: str
) -> None:
    code, _, err = await cli("put", src, "--endpoint", endpoint)
    assert code == 0, err
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    bad = "anvil://default/model.bin?sha256=" + "0" * 64
    code, out, err = await cli("get", bad, "--endpoint", endpoint, "-o", out_dir / "x")
    assert code == 1
    assert "sha256" in err and "0" * 64 in err
    assert os.listdir(out_dir) == []
    code, out, err = await cli("get", bad, "--endpoint", endpoint, "-o", "-")
    assert (code, out) == (1, b"")


async def test_a_corrupted_store_fails_and_writes_nothing(src: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data")
    info = store.put_file(src, bucket="b", key="k")
    blob = store.blob_path(info.sha256 or "")
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\x00\x00")
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = await cli(
        "get", "anvil://b/k", "--data-dir", tmp_path / "data", "-o", "out", cwd=work
    )
    assert code == 1
    assert "content has sha256" in err
    assert os.listdir(work) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("get", "anvil://b/missing", "--data-dir", "{tmp}"), "no object store"),
        (("get", "anvil://b/k"), "need --endpoint"),
        (("get", "sha256:" + "a" * 64, "--endpoint", "127.0.0.1:1"), "pass --data-dir"),
        (("get", "nonsense", "--data-dir", "{tmp}"), "is not one of"),
        (("put", "{tmp}/does-not-exist", "--data-dir", "{tmp}"), "not a readable file"),
    ],
)
async def test_errors_are_one_line_and_exit_1(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    code, _, err = await cli(*(a.format(tmp=tmp_path) for a in args))
    assert code == 1
    assert err.startswith("anvil-compute: ") and message in err
    assert err.count("\n") == 1


async def test_missing_object_on_a_peer(endpoint: str) -> None:
    code, _, err = await cli("get", "anvil://b/nothing", "--endpoint", endpoint, "-o", "-")
    assert code == 1
    assert "no object b/nothing" in err


async def test_put_needs_a_target(src: Path) -> None:
    code, _, err = await cli("put", src)
    assert code == 2
    assert "one of the arguments --endpoint --data-dir is required" in err


async def put_as(endpoint: str, src: Path, key: str) -> None:
    code, _, err = await cli("put", src, "--key", key, "--endpoint", endpoint)
    assert code == 0, err


@pytest.mark.parametrize("key", ["dir/.", "dir/..", "dir/-", "-", "..", "dir/", "x" * 300])
async def test_a_key_that_names_no_file_needs_an_output(
    src: Path, tmp_path: Path, endpoint: str, key: str
) -> None:
    await put_as(endpoint, src, key)
    work = tmp_path / "work"
    (work / "dir").mkdir(parents=True)
    ref = f"anvil://default/{quote(key)}"
    code, out, err = await cli("get", ref, "--endpoint", endpoint, cwd=work)
    assert code == 2, err
    assert out == b""  # never stdout because the key ends in '-'
    assert err.startswith("anvil-compute: ") and err.count("\n") == 1, err
    assert "-o PATH" in err
    assert sorted(p.name for p in work.rglob("*")) == ["dir"]
    # Named explicitly, the same object is fetched; '-' as the flag's value is stdout.
    code, _, err = await cli("get", ref, "--endpoint", endpoint, "-o", "named", cwd=work)
    assert code == 0, err
    assert content(work / "named") == content(src)
    code, out, err = await cli("get", ref, "--endpoint", endpoint, "-o", "-", cwd=work)
    assert (code, out) == (0, content(src)), err


@pytest.mark.parametrize("output", [".", "..", "exists", "no/such/dir/out", ""])
async def test_an_unwritable_output_is_one_line_and_leaves_no_temp(
    src: Path, tmp_path: Path, endpoint: str, output: str
) -> None:
    await put_as(endpoint, src, "k")
    work = tmp_path / "a" / "work"
    (work / "exists").mkdir(parents=True)
    code, out, err = await cli(
        "get", "anvil://default/k", "--endpoint", endpoint, "-o", output, cwd=work
    )
    assert code in (1, 2), err
    assert err.startswith("anvil-compute: ") and err.count("\n") == 1, err
    assert out == b""
    leftovers = [p for p in (tmp_path / "a").rglob("*") if p.name != "exists"]
    assert [p.name for p in leftovers] == ["work"]
