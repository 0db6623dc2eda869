"""Object references: `anvil://bucket/key`, `s3://bucket/key`, `sha256:<hex>`.

Parsed once into a frozen `ObjectRef`; pure, no I/O. A location ref may pin a
version (`?version=`) and carry the digest its bytes must have (`?sha256=`).
Keys are percent-decoded on parse and percent-encoded on format, so
`parse_ref(str(ref)) == ref` for every valid ref.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote

from daemon.exceptions import InvalidArgument

MAX_KEY_BYTES = 1024

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOCATION = re.compile(r"(?P<scheme>[A-Za-z0-9+.-]+)://(?P<bucket>[^/?#]*)(?:/(?P<key>[^?#]*))?")
_QUERY_KEYS = frozenset({"version", "sha256"})
# Characters left unescaped in a formatted key: '/' separates "folders"; '?',
# '#', '%', '&' and whitespace are escaped so the ref parses back to the same key.
_KEY_SAFE = "/:@!$'()*+,;=~"


class Scheme(enum.Enum):
    ANVIL = "anvil"
    S3 = "s3"
    SHA256 = "sha256"


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectRef:
    """Where an object lives and, optionally, the sha256 its bytes must have.

    For `Scheme.SHA256` the digest is the whole address: bucket and key are "".
    """

    scheme: Scheme
    bucket: str = ""
    key: str = ""
    version: str | None = None
    sha256: str | None = None

    def __str__(self) -> str:
        if self.scheme is Scheme.SHA256:
            return f"sha256:{self.sha256}"
        query = []
        if self.version is not None:
            query.append(f"version={quote(self.version, safe='')}")
        if self.sha256 is not None:
            query.append(f"sha256={self.sha256}")
        suffix = "?" + "&".join(query) if query else ""
        return f"{self.location}{suffix}"

    @property
    def location(self) -> str:
        """The ref without version or digest (`anvil://b/k`), or `sha256:<hex>`."""
        if self.scheme is Scheme.SHA256:
            return f"sha256:{self.sha256}"
        return f"{self.scheme.value}://{self.bucket}/{quote(self.key, safe=_KEY_SAFE)}"

    def with_sha256(self, sha256: str) -> ObjectRef:
        """The same ref carrying an expected digest (validated, lowercased)."""
        return replace(self, sha256=validate_sha256(sha256))


def parse_ref(text: str) -> ObjectRef:
    """Parse a ref string; raises InvalidArgument naming what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument("object ref is empty")
    if any(ch.isspace() for ch in text):
        raise InvalidArgument(f"object ref {text!r} contains whitespace")
    if text.startswith("sha256:"):
        return ObjectRef(scheme=Scheme.SHA256, sha256=validate_sha256(text[len("sha256:") :]))

    location, _, query = text.partition("?")
    if "#" in text:
        raise InvalidArgument(f"object ref {text!r}: fragments ('#') are not allowed")
    match = _LOCATION.fullmatch(location)
    if match is None:
        raise InvalidArgument(
            f"object ref {text!r} is not one of anvil://BUCKET/KEY, s3://BUCKET/KEY, sha256:HEX"
        )
    if match["scheme"] not in (Scheme.ANVIL.value, Scheme.S3.value):
        raise InvalidArgument(
            f"object ref {text!r}: unknown scheme {match['scheme']!r}"
            " (use anvil://, s3:// or sha256:)"
        )
    scheme = Scheme(match["scheme"])
    bucket = validate_bucket(match["bucket"])
    if match["key"] is None:
        raise InvalidArgument(
            f"object ref {text!r} has no key (expected {scheme.value}://{bucket}/KEY)"
        )
    key = validate_key(_unquote(text, match["key"]))
    params = _parse_query(text, query)
    sha256 = params.get("sha256")
    return ObjectRef(
        scheme=scheme,
        bucket=bucket,
        key=key,
        version=params.get("version"),
        sha256=None if sha256 is None else validate_sha256(sha256),
    )


def validate_bucket(bucket: str) -> str:
    """Return the bucket name if valid; raises InvalidArgument otherwise."""
    if not bucket:
        raise InvalidArgument("bucket name is empty")
    if _BUCKET.fullmatch(bucket) is None:
        raise InvalidArgument(
            f"bad bucket name {bucket!r}: use 1-255 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return bucket


def validate_key(key: str) -> str:
    """Return the object key if valid; raises InvalidArgument otherwise."""
    if not key:
        raise InvalidArgument("object key is empty")
    if len(key.encode("utf-8", errors="surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidArgument(f"object key is longer than {MAX_KEY_BYTES} bytes")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in key):
        raise InvalidArgument(f"object key {key!r} contains a control character")
    return key


def validate_sha256(digest: str) -> str:
    """Return the digest lowercased if it is 64 hex digits; raises InvalidArgument otherwise."""
    lowered = digest.lower()
    if _SHA256.fullmatch(lowered) is None:
        raise InvalidArgument(f"bad sha256 digest {digest!r}: expected 64 hex digits")
    return lowered


def _parse_query(text: str, query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    if not query:
        return params
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        if not sep or not value:
            raise InvalidArgument(f"object ref {text!r}: query part {part!r} is not NAME=VALUE")
        if name not in _QUERY_KEYS:
            raise InvalidArgument(
                f"object ref {text!r}: unknown parameter {name!r} (known: version, sha256)"
            )
        if name in params:
            raise InvalidArgument(f"object ref {text!r}: parameter {name!r} given twice")
        params[name] = _unquote(text, value)
    return params


def _unquote(text: str, part: str) -> str:
    try:
        return unquote(part, errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"object ref {text!r}: percent-escapes are not UTF-8") from exc
