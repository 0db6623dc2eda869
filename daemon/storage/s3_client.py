"""S3 backend (`s3://` refs) over boto3: AWS, MinIO, or Anvil's S3 gateway.

Uploads record the object's sha256 as user metadata (`x-amz-meta-sha256`), so
later reads know the digest to verify without a ref carrying one. boto3 is
blocking; every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]
from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

from daemon import exceptions
from daemon.exceptions import AnvilError, InvalidArgument
from daemon.storage.digest import sha256_file
from daemon.storage.refs import ObjectRef, Scheme, validate_bucket, validate_key
from daemon.storage.source import CHUNK_SIZE, DEFAULT_CONTENT_TYPE, ObjectInfo, ObjectReader

SHA256_METADATA = "sha256"

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound"}
_DENIED = {"403", "AccessDenied", "AllAccessDisabled"}
_UNAUTHENTICATED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_INVALID = {"400", "InvalidBucketName", "InvalidArgument", "KeyTooLongError", "InvalidRequest"}


@dataclass(frozen=True, kw_only=True, slots=True)
class S3Config:
    """Where the S3 service is; credentials default to boto3's usual chain."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    # Path-style addressing works with MinIO, Anvil's gateway and IP endpoints.
    addressing_style: str = "path"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 3


class S3Client:
    """ObjectSource for `s3://` refs, plus uploads of files."""

    def __init__(self, config: S3Config | None = None, *, chunk_size: int = CHUNK_SIZE) -> None:
        self.config = config or S3Config()
        self.chunk_size = chunk_size
        session = boto3.session.Session()
        self._s3: Any = session.client(
            "s3",
            endpoint_url=self.config.endpoint_url,
            region_name=self.config.region,
            aws_access_key_id=self.config.access_key_id,
            aws_secret_access_key=self.config.secret_access_key,
            config=botocore.config.Config(
                s3={"addressing_style": self.config.addressing_style},
                connect_timeout=self.config.connect_timeout,
                read_timeout=self.config.read_timeout,
                retries={"mode": "standard", "max_attempts": self.config.max_attempts},
            ),
        )
        self._transfer = TransferConfig(
            multipart_chunksize=8 * CHUNK_SIZE, max_concurrency=4, use_threads=True
        )

    async def head(self, ref: ObjectRef) -> ObjectInfo:
        """Describe the object; raises ObjectNotFound, PermissionDenied, Unavailable."""
        _check_scheme(ref)
        kwargs = _location(ref)
        try:
            response = await asyncio.to_thread(self._s3.head_object, **kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _error(exc, ref.location) from exc
        return _info(ref, response)

    @asynccontextmanager
    async def open(self, ref: ObjectRef) -> AsyncIterator[ObjectReader]:
        """GetObject; yields the object's info and its (unverified) chunks."""
        _check_scheme(ref)
        kwargs = _location(ref)
        try:
            response = await asyncio.to_thread(self._s3.get_object, **kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _error(exc, ref.location) from exc
        body = response["Body"]
        try:
            yield ObjectReader(info=_info(ref, response), chunks=self._chunks(body, ref))
        finally:
            await asyncio.to_thread(body.close)

    async def put_file(
        self,
        path: Path,
        *,
        bucket: str,
        key: str,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Upload a file (multipart when large), recording its sha256 as metadata."""
        validate_bucket(bucket)
        validate_key(key)
        if sha256 is None:
            sha256 = await asyncio.to_thread(sha256_file, path)
        extra = {"ContentType": content_type, "Metadata": {SHA256_METADATA: sha256}}
        try:
            await asyncio.to_thread(
                self._s3.upload_file,
                str(path),
                bucket,
                key,
                ExtraArgs=extra,
                Config=self._transfer,
            )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _error(exc, f"s3://{bucket}/{key}") from exc
        except boto3.exceptions.S3UploadFailedError as exc:
            raise _error(exc.__cause__ or exc, f"s3://{bucket}/{key}") from exc
        return await self.head(ObjectRef(scheme=Scheme.S3, bucket=bucket, key=key))

    def close(self) -> None:
        self._s3.close()

    async def _chunks(self, body: Any, ref: ObjectRef) -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(body.read, self.chunk_size):
                yield chunk
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _error(exc, ref.location) from exc


def _check_scheme(ref: ObjectRef) -> None:
    if ref.scheme is not Scheme.S3:
        raise InvalidArgument(f"the S3 client reads s3:// refs, not {ref}")


def _location(ref: ObjectRef) -> dict[str, str]:
    kwargs = {"Bucket": ref.bucket, "Key": ref.key}
    if ref.version is not None:
        kwargs["VersionId"] = ref.version
    return kwargs


def _info(ref: ObjectRef, response: Mapping[str, Any]) -> ObjectInfo:
    return ObjectInfo(
        bucket=ref.bucket,
        key=ref.key,
        size=int(response["ContentLength"]),
        sha256=_sha256_of(response),
        version_id=str(response.get("VersionId") or ""),
        etag=str(response.get("ETag") or "").strip('"'),
        content_type=str(response.get("ContentType") or DEFAULT_CONTENT_TYPE),
    )


def _sha256_of(response: Mapping[str, Any]) -> str | None:
    """The object's sha256 from our metadata, or from a full-object S3 checksum."""
    recorded = str(response.get("Metadata", {}).get(SHA256_METADATA, "")).lower()
    if len(recorded) == 64 and all(c in "0123456789abcdef" for c in recorded):
        return recorded
    checksum = response.get("ChecksumSHA256")
    if checksum and response.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        raw = base64.b64decode(checksum)
        if len(raw) == 32:
            return raw.hex()
    return None


def _error(exc: BaseException, what: str) -> AnvilError:
    """Translate a boto error into the daemon's error of the same meaning."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return exceptions.Unauthenticated(f"{what}: no S3 credentials configured")
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        message = str(exc.response.get("Error", {}).get("Message", "")) or code
        if code in _NOT_FOUND:
            return exceptions.ObjectNotFound(f"{what}: not found ({message})")
        if code in _DENIED:
            return exceptions.PermissionDenied(f"{what}: access denied ({message})")
        if code in _UNAUTHENTICATED:
            return exceptions.Unauthenticated(f"{what}: {message}")
        if code in _INVALID:
            return exceptions.InvalidArgument(f"{what}: {message}")
        return exceptions.Unavailable(f"{what}: S3 error {code}: {message}")
    return exceptions.Unavailable(f"{what}: {exc}")
