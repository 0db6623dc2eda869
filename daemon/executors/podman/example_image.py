"""The example container image (a busybox rootfs): build it, and load it into Podman.

    python guest_modules/containers/build_busybox_image.py                # build + podman load
    python guest_modules/containers/build_busybox_image.py --output busybox.oci.tar --no-load

Prints the image id, `sha256:<64 hex>`, on stdout: the `podman_image` of
capabilities such as `demo:busybox-wc` (guest_modules/containers/README.md).

The image is an OCI archive written here byte for byte — sorted entries,
zero timestamps and owners, a fixed `created` — so the same busybox binary
always gives the same image id, on any peer, and `podman save`/`podman load`
keep it. No registry is involved: the rootfs is the host's static busybox
(Debian's `busybox-static`, installed by .ci/install-podman.sh) with a link
per applet, plus empty /input, /output and /tmp mount points.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEFAULT_BUSYBOX = Path("/bin/busybox")
DEFAULT_NAME = "localhost/anvil-busybox:latest"
# Go's names for the machine, as OCI image configs spell them.
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "riscv64": "riscv64"}


def _add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    for key, value in kw.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)
    if data is not None:
        assert info.size == len(data)


def rootfs_layer(busybox: bytes, applets: list[str]) -> bytes:
    """The uncompressed layer tar: /bin/busybox, one symlink per applet, a few files and dirs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for directory in ("bin", "etc", "input", "output", "tmp"):
            _add(tar, directory, type=tarfile.DIRTYPE, mode=0o1777 if directory == "tmp" else 0o755)
        _add(tar, "bin/busybox", data=busybox, size=len(busybox), mode=0o755)
        for applet in sorted(set(applets) - {"busybox"}):
            _add(tar, f"bin/{applet}", type=tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ):
            _add(tar, name, data=text.encode(), size=len(text), mode=0o644)
    return buffer.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _add(tar, f"blobs/sha256/{digest[7:]}", data=data, size=len(data), mode=0o644)
    return {"digest": digest, "size": len(data)}


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def oci_archive(layer: bytes, *, name: str, architecture: str) -> tuple[bytes, str]:
    """(the OCI archive's bytes, the image id) for a one-layer image of `layer`."""
    config = _json(
        {
            "architecture": architecture,
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/bin"], "WorkingDir": "/", "Cmd": ["/bin/sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()],
            },
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": Path(__file__).name}],
        }
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "oci-layout", data=b'{"imageLayoutVersion":"1.0.0"}', size=30, mode=0o644)
        for directory in ("blobs", "blobs/sha256"):
            _add(tar, directory, type=tarfile.DIRTYPE, mode=0o755)
        layer_ref = _blob(tar, layer)
        config_ref = _blob(tar, config)
        manifest = _json(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_ref},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_ref}],
            }
        )
        manifest_ref = _blob(tar, manifest)
        index = _json(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        **manifest_ref,
                        "annotations": {"org.opencontainers.image.ref.name": name},
                    }
                ],
            }
        )
        _add(tar, "index.json", data=index, size=len(index), mode=0o644)
    return buffer.getvalue(), str(config_ref["digest"])


def build(busybox_path: Path = DEFAULT_BUSYBOX, *, name: str = DEFAULT_NAME) -> tuple[bytes, str]:
    """(OCI archive, image id) of the busybox image. Raises SystemExit with a reason."""
    if not busybox_path.is_file():
        raise SystemExit(
            f"{busybox_path} not found: install busybox-static (.ci/install-podman.sh)"
        )
    busybox = busybox_path.read_bytes()
    listed = subprocess.run(
        [str(busybox_path), "--list"], capture_output=True, check=True, text=True
    ).stdout.split()
    if not listed:
        raise SystemExit(f"{busybox_path} --list printed no applets")
    machine = platform.machine()
    architecture = ARCHITECTURES.get(machine)
    if architecture is None:
        raise SystemExit(f"unknown machine {machine!r}")
    return oci_archive(rootfs_layer(busybox, listed), name=name, architecture=architecture)


def podman_load(archive: Path) -> None:
    podman = shutil.which("podman")
    if podman is None:
        raise SystemExit("podman is not installed (.ci/install-podman.sh)")
    subprocess.run([podman, "load", "--quiet", "--input", str(archive)], check=True, stdout=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--busybox", type=Path, default=DEFAULT_BUSYBOX)
    parser.add_argument("--name", default=DEFAULT_NAME, help="the image's tag (informative)")
    parser.add_argument("--output", type=Path, help="also keep the OCI archive here")
    parser.add_argument("--no-load", action="store_true", help="do not run `podman load`")
    args = parser.parse_args(argv)
    archive_bytes, image_id = build(args.busybox, name=args.name)
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.output or Path(tmp) / "busybox.oci.tar"
        archive.write_bytes(archive_bytes)
        if not args.no_load:
            podman_load(archive)
    print(image_id)
    print(
        f'\n[capabilities."demo:busybox-wc"]\npodman_image = "{image_id}"\ncommand = ["wc", "-w"]',
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
