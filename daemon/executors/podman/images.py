"""The images containers run: pinned by digest, found on this host, never pulled;
brought here by `podman load` of an image archive."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from podman.errors import APIError, DockerException, ImageNotFound, NotFound

from daemon.exceptions import FailedPrecondition, InvalidArgument, Unavailable

_DIGEST_REF = re.compile(r"(?:(?P<name>[^@\s]+)@)?sha256:(?P<hex>[0-9a-f]{64})")


class ImageNotPresent(FailedPrecondition):
    """The pinned image is not in this peer's Podman (and is never pulled)."""


def check_image_ref(ref: str) -> tuple[str | None, str]:
    """(name or None, digest hex) of an image pinned by digest. Raises InvalidArgument."""
    match = _DIGEST_REF.fullmatch(ref)
    if match is None:
        raise InvalidArgument(
            f"image {ref!r} is not pinned by digest: use 'sha256:<image id>' or "
            "'NAME@sha256:<manifest digest>'"
        )
    return match["name"], match["hex"]


def explain(exc: BaseException) -> str:
    """Podman's own words for an API error, else the exception's."""
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or type(exc).__name__


async def find(client: Any, ref: str, *, where: str) -> tuple[str, Mapping[str, Any]]:
    """(image id hex, inspected attributes) of `ref`, present here and pinned by digest.

    Never pulls. `where` names the Podman service in errors. Raises
    InvalidArgument (not pinned), ImageNotPresent, FailedPrecondition (the
    digest differs), Unavailable.
    """
    _, digest = check_image_ref(ref)
    try:
        image = await asyncio.to_thread(client.images.get, ref)
    except (ImageNotFound, NotFound) as exc:
        raise ImageNotPresent(
            f"image {ref} is not present on this peer (images are never pulled): "
            "load it with `podman load -i FILE`, or name its archive in the "
            "capability's podman_archive"
        ) from exc
    except (DockerException, OSError) as exc:
        raise Unavailable(f"podman at {where}: {explain(exc)}") from exc
    image_id = str(image.id).removeprefix("sha256:")
    digests = {str(image.attrs.get("Digest") or "")} | {
        str(d).rpartition("@")[2] for d in image.attrs.get("RepoDigests") or []
    }
    if digest != image_id and f"sha256:{digest}" not in digests:
        raise FailedPrecondition(f"image {ref} resolved to {image_id}, whose digest differs")
    return image_id, image.attrs


async def load(client: Any, archive: Path, *, where: str) -> tuple[str, ...]:
    """`podman load` an image archive (docker or OCI); the ids of the images in it.

    The archive is streamed, not read into memory. Raises InvalidArgument
    (unreadable or not an image archive), Unavailable.
    """

    def post() -> list[str]:
        with archive.open("rb") as body:
            response = client.api.post(
                "/images/load", data=body, headers={"Content-type": "application/x-tar"}
            )
        response.raise_for_status()
        return [str(name) for name in response.json().get("Names") or []]

    try:
        names = await asyncio.to_thread(post)
    except FileNotFoundError as exc:
        raise InvalidArgument(f"image archive {archive} does not exist") from exc
    except (APIError, DockerException, requests.HTTPError) as exc:
        # HTTPError is an OSError too, but a refused archive is no outage:
        # loading it again elsewhere would fail the same way.
        raise InvalidArgument(f"podman cannot load {archive}: {explain(exc)}") from exc
    except OSError as exc:
        raise Unavailable(f"podman at {where}: {explain(exc)}") from exc
    ids = []
    for name in names:
        try:
            image = await asyncio.to_thread(client.images.get, name)
        except APIError as exc:
            raise FailedPrecondition(f"podman refused: {explain(exc)}") from exc
        except (DockerException, OSError) as exc:
            raise Unavailable(f"podman at {where}: {explain(exc)}") from exc
        ids.append(str(image.id).removeprefix("sha256:"))
    return tuple(dict.fromkeys(ids))
