"""`anvil-compute put` and `anvil-compute get`: objects in a peer's or a local store."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from daemon.exceptions import DigestMismatch, InvalidArgument, ObjectNotFound
from daemon.storage.anvil_client import AnvilClient
from daemon.storage.atomic_file import AtomicFile
from daemon.storage.digest import DigestCheck, verified_chunks
from daemon.storage.local_store import LocalSource, LocalStore
from daemon.storage.refs import ObjectRef, Scheme, parse_ref
from daemon.storage.source import DEFAULT_CONTENT_TYPE, ObjectInfo, ObjectSource

DEFAULT_BUCKET = "default"
STDOUT = "-"  # as the value of --output only; a key ending in '-' is no file name
# Longest file name most Linux filesystems take (bytes).
NAME_MAX = 255


def register(subparsers: Any) -> None:
    """Add the `put` and `get` subcommands."""
    put = subparsers.add_parser(
        "put",
        help="store a file as an object; prints its ref with the digest",
        description="Store a file as an object and print its anvil:// ref with its sha256.",
    )
    put.add_argument("path", type=Path, metavar="PATH", help="the file to store")
    put.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket (default: %(default)s)")
    put.add_argument("--key", help="object key (default: the file's name)")
    put.add_argument("--content-type", default=DEFAULT_CONTENT_TYPE)
    _add_target(put, required=True)
    put.set_defaults(handler=run_put)

    get = subparsers.add_parser(
        "get",
        help="fetch an object by ref, verifying its digest",
        description=(
            "Fetch an object (anvil://BUCKET/KEY[?version=V][&sha256=HEX], sha256:HEX,"
            " s3://BUCKET/KEY) to a file, verified against its digest. The file appears"
            " only once complete and verified."
        ),
    )
    get.add_argument("ref", metavar="REF")
    get.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help=(
            "where to write it (default: the key's last segment, when that is a file name;"
            " '-' for stdout)"
        ),
    )
    _add_target(get, required=False)
    get.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 endpoint for s3:// refs (default: AWS)"
    )
    get.set_defaults(handler=run_get)


def run_put(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not path.is_file():
        raise InvalidArgument(f"{path} is not a readable file")
    key = args.key or path.name
    if args.data_dir is not None:
        info = LocalStore(args.data_dir).put_file(
            path, bucket=args.bucket, key=key, content_type=args.content_type
        )
    else:
        info = asyncio.run(_put_remote(args, path, key))
    ref = ObjectRef(
        scheme=Scheme.ANVIL,
        bucket=info.bucket,
        key=info.key,
        version=info.version_id or None,
        sha256=info.sha256,
    )
    print(ref)
    return 0


def run_get(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    if args.output == STDOUT:
        dest = None
    else:
        dest, why = _destination(ref, args.output)
        if dest is None:
            # A usage error, like argparse's (status 2), in one line.
            print(f"anvil-compute: {why}", file=sys.stderr)
            return 2
    info = asyncio.run(_get(args, ref, dest))
    if dest is not None:
        print(f"{dest}: {info.size} bytes, sha256 {info.sha256}", file=sys.stderr)
    return 0


def _destination(ref: ObjectRef, output: str | None) -> tuple[Path | None, str]:
    """The file to write: `output`, else the ref's last segment; or None and why not."""
    if output is not None:
        if os.path.basename(output) in ("", ".", ".."):
            return None, f"-o {output!r} names a directory, not a file: give a file's path"
        return Path(output), ""
    name = (ref.sha256 or "") if ref.scheme is Scheme.SHA256 else ref.key.rpartition("/")[2]
    if name in ("", ".", "..", STDOUT) or len(os.fsencode(name)) > NAME_MAX:
        shown = name if len(name) <= 40 else f"{name[:40]}..."
        return None, (
            f"cannot name a file after {ref.location}: its last segment {shown!r} is not"
            " a usable file name; pass -o PATH (or -o - for stdout)"
        )
    return Path(name), ""


async def _put_remote(args: argparse.Namespace, path: Path, key: str) -> ObjectInfo:
    async with AnvilClient.connect(args.endpoint, token=args.token) as client:
        return await client.put_file(
            path, bucket=args.bucket, key=key, content_type=args.content_type
        )


async def _get(args: argparse.Namespace, ref: ObjectRef, output: Path | None) -> ObjectInfo:
    if ref.scheme is Scheme.S3:
        from daemon.storage.s3_client import S3Client, S3Config  # boto3 is slow to import

        s3 = S3Client(S3Config(endpoint_url=args.s3_endpoint))
        try:
            return await _download(s3, ref, output)
        finally:
            s3.close()
    if args.data_dir is not None:
        if not (args.data_dir / "objects").is_dir():
            raise ObjectNotFound(f"no object store in {args.data_dir}")
        return await _download(LocalSource(LocalStore(args.data_dir)), ref, output)
    if ref.scheme is Scheme.SHA256:
        raise InvalidArgument("sha256: refs are read from a local store: pass --data-dir")
    if args.endpoint is None:
        raise InvalidArgument("anvil:// refs need --endpoint HOST:PORT or --data-dir DIR")
    async with AnvilClient.connect(args.endpoint, token=args.token) as client:
        return await _download(client, ref, output)


async def _download(source: ObjectSource, ref: ObjectRef, output: Path | None) -> ObjectInfo:
    """Stream `ref` to `output` (None: stdout), verified; a file appears only if it verifies.

    Raises InvalidArgument when `output` cannot be written (nothing is left behind).
    """
    async with source.open(ref) as reader:
        info = reader.info
        if ref.sha256 is not None and info.sha256 is not None and info.sha256 != ref.sha256:
            raise DigestMismatch(f"{ref}: the store holds sha256 {info.sha256}")
        check = DigestCheck(
            what=str(ref), expected_sha256=ref.sha256 or info.sha256, expected_size=info.size
        )
        if output is None:
            async for chunk in verified_chunks(reader.chunks, check):
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        else:
            try:
                with AtomicFile(output.parent, mode=0o644) as out:
                    async for chunk in reader.chunks:
                        check.update(chunk)
                        await asyncio.to_thread(out.write, chunk)
                    check.finish()
                    await asyncio.to_thread(out.commit, output)
            except OSError as exc:
                raise InvalidArgument(f"cannot write {output}: {exc.strerror or exc}") from exc
    return dataclasses.replace(info, sha256=check.finish())


def _add_target(parser: argparse.ArgumentParser, *, required: bool) -> None:
    target = parser.add_mutually_exclusive_group(required=required)
    target.add_argument(
        "--endpoint", metavar="HOST:PORT", help="a peer's (or an Anvil cluster's) ObjectService"
    )
    target.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="work directly on this data directory's store"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("ANVIL_TOKEN"),
        help="bearer token for --endpoint (default: $ANVIL_TOKEN)",
    )
