"""Build anvil-exec (anvil_exec.c) for x86_64 and aarch64 with the Zig toolchain from PyPI.

    python guest_modules/containers/exec_helper/build.py          # rebuild the binaries
    python guest_modules/containers/exec_helper/build.py --check  # rebuild elsewhere, compare

The binaries are daemon/executors/podman/anvil-exec.<machine>.

Freestanding static binaries (no C library), stripped, without a build id:
with the pinned toolchain a rebuild is byte-identical, which
tests/unit/test_exec_helper.py checks. They ship in the package beside the
executor (daemon/executors/podman/executor.py), which bind-mounts the one for the
machine into every container.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DEST = REPO / "daemon" / "executors" / "podman"
SOURCE = "anvil_exec.c"
ZIG_VERSION = "0.17.1"
MACHINES = ("x86_64", "aarch64")
CFLAGS: tuple[str, ...] = (
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-O2",
    "-s",
    "-fno-stack-protector",
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
)


class BuildError(Exception):
    """The toolchain is missing or the wrong version, or the compile failed."""


def binary_name(machine: str) -> str:
    return f"anvil-exec.{machine}"


def build(out_dir: Path, *, strict_version: bool = True) -> list[Path]:
    """Compile anvil-exec for every machine into `out_dir`; return the paths."""
    try:
        version = subprocess.run(
            [sys.executable, "-m", "ziglang", "version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(
            f"the Zig toolchain is missing: pip install ziglang=={ZIG_VERSION}"
        ) from exc
    if strict_version and version != ZIG_VERSION:
        raise BuildError(f"Zig {version} found, anvil-exec is built with {ZIG_VERSION}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for machine in MACHINES:
        out = out_dir / binary_name(machine)
        # A relative source and a fixed working directory: nothing path-dependent.
        cmd = [
            sys.executable,
            "-m",
            "ziglang",
            "cc",
            f"--target={machine}-linux-none",
            *CFLAGS,
            "-o",
            str(out),
            SOURCE,
        ]
        done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"{machine}: compile failed\n{done.stderr}")
        out.chmod(0o755)
        paths.append(out)
    return paths


def stale_files(fresh_dir: Path, dest_dir: Path = DEST) -> list[str]:
    """Names of the binaries in `fresh_dir` that differ from (or are missing in) `dest_dir`."""
    return sorted(
        p.name
        for p in fresh_dir.iterdir()
        if not (dest_dir / p.name).is_file() or (dest_dir / p.name).read_bytes() != p.read_bytes()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="rebuild in a temp folder, compare")
    args = parser.parse_args(argv)
    try:
        if not args.check:
            for path in build(DEST):
                print(f"{path.relative_to(REPO)}  {path.stat().st_size} bytes")
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp))
            stale = stale_files(Path(tmp))
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    if stale:
        print(f"build.py: out of date, run {Path(__file__).relative_to(REPO)}: {stale}")
        return 1
    print("anvil-exec is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
