"""Object refs: parsing, formatting, and the errors bad refs produce."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.exceptions import InvalidArgument
from daemon.storage.refs import ObjectRef, Scheme, parse_ref

DIGEST = "ab" * 32


def test_anvil_ref_with_version_and_digest() -> None:
    ref = parse_ref(f"anvil://models/digits/v1.onnx?version=7&sha256={DIGEST.upper()}")
    assert ref == ObjectRef(
        scheme=Scheme.ANVIL, bucket="models", key="digits/v1.onnx", version="7", sha256=DIGEST
    )
    assert str(ref) == f"anvil://models/digits/v1.onnx?version=7&sha256={DIGEST}"
    assert ref.location == "anvil://models/digits/v1.onnx"


def test_s3_ref() -> None:
    ref = parse_ref("s3://my-bucket.eu/a/b/c.bin")
    assert (ref.scheme, ref.bucket, ref.key, ref.version, ref.sha256) == (
        Scheme.S3,
        "my-bucket.eu",
        "a/b/c.bin",
        None,
        None,
    )


def test_digest_ref() -> None:
    ref = parse_ref(f"sha256:{DIGEST}")
    assert ref == ObjectRef(scheme=Scheme.SHA256, sha256=DIGEST)
    assert str(ref) == ref.location == f"sha256:{DIGEST}"


def test_percent_encoded_key_round_trips() -> None:
    ref = parse_ref("anvil://b/dir/a%20b%3Fc%23d%25e")
    assert ref.key == "dir/a b?c#d%e"
    assert str(ref) == "anvil://b/dir/a%20b%3Fc%23d%25e"
    assert parse_ref(str(ref)) == ref


def test_with_sha256_validates_and_lowers() -> None:
    ref = parse_ref("anvil://b/k").with_sha256(DIGEST.upper())
    assert ref.sha256 == DIGEST
    with pytest.raises(InvalidArgument, match="64 hex digits"):
        ref.with_sha256("nothex")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("anvil://", "bucket name is empty"),
        ("anvil:///key", "bucket name is empty"),
        ("anvil://bucket", "has no key"),
        ("anvil://bucket/", "key is empty"),
        ("ftp://bucket/key", "unknown scheme 'ftp'"),
        ("bucket/key", "is not one of"),
        ("anvil://bucket/key?foo=1", "unknown parameter 'foo'"),
        ("anvil://bucket/key?version=", "not NAME=VALUE"),
        ("anvil://bucket/key?version=1&version=2", "given twice"),
        ("anvil://bucket/key?sha256=1234", "64 hex digits"),
        ("sha256:xyz", "64 hex digits"),
        ("sha256:" + "0" * 63, "64 hex digits"),
        ("anvil://bucket/key#frag", "fragments"),
        ("anvil://bucket/a key", "whitespace"),
        ("anvil://bad!bucket/key", "bad bucket name"),
        ("anvil://-bucket/key", "bad bucket name"),
        ("anvil://bucket/%ff", "not UTF-8"),
        ("anvil://bucket/a%00b", "control character"),
        ("anvil://bucket/" + "k" * 1025, "longer than 1024 bytes"),
    ],
)
def test_bad_refs_are_invalid_arguments(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_ref(text)


_buckets = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
_keys = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_characters="\x7f"),
    min_size=1,
    max_size=40,
)
_digests = st.none() | st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
_versions = st.none() | st.text(min_size=1, max_size=12)


@given(
    scheme=st.sampled_from([Scheme.ANVIL, Scheme.S3]),
    bucket=_buckets,
    key=_keys,
    version=_versions,
    sha256=_digests,
)
def test_format_then_parse_is_identity(
    scheme: Scheme, bucket: str, key: str, version: str | None, sha256: str | None
) -> None:
    ref = ObjectRef(scheme=scheme, bucket=bucket, key=key, version=version, sha256=sha256)
    assert parse_ref(str(ref)) == ref
