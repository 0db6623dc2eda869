"""Build every guest module to WebAssembly with the Zig toolchain from PyPI.

    python guest_modules/build.py            # rebuild dist/*.wasm and dist/SHA256SUMS
    python guest_modules/build.py --check    # rebuild in a temporary folder, compare

Each capability's C source is `<folder>/main.c`; it builds to
`dist/<capability with ':' -> '-'>.wasm` as a WASI preview 1 command. The
flags are fixed and the toolchain is pinned (`ZIG_VERSION`), so a rebuild is
byte-identical: tests/unit/test_guest_build.py rebuilds and compares with the
checked-in files. The first compile on a machine builds WASI libc into Zig's
cache (~20-30 s); later ones take about a second.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIST = HERE / "dist"
SDK = HERE / "sdk"
ZIG_VERSION = "0.17.1"

# capability string -> source folder
MODULES: dict[str, str] = {
    "text:wordcount": "text_wordcount",
    "data:csv-aggregate": "data_csv_aggregate",
    "image:resize": "image_resize",
    "inference:digits": "inference_digits",
}

CFLAGS: tuple[str, ...] = (
    "--target=wasm32-wasi",
    "-O2",
    "-s",  # no debug info or names: smaller, and nothing path-dependent
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
)


class BuildError(Exception):
    """The toolchain is missing or the wrong version, or a module failed to compile."""


def wasm_name(capability: str) -> str:
    """`text:wordcount` -> `text-wordcount.wasm`."""
    return capability.replace(":", "-") + ".wasm"


def zig_version() -> str:
    """The version of `python -m ziglang`; raises BuildError when it is not installed."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ziglang", "version"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(
            f"the Zig toolchain is missing: pip install ziglang=={ZIG_VERSION}"
        ) from exc
    return done.stdout.strip()


def compile_module(capability: str, out_dir: Path) -> Path:
    """Compile one capability into `out_dir`; raises BuildError with the compiler's output."""
    source = HERE / MODULES[capability] / "main.c"
    out = out_dir / wasm_name(capability)
    # Relative paths and a fixed working directory keep the command line, and
    # so the output, independent of where the checkout lives.
    cmd = [
        sys.executable,
        "-m",
        "ziglang",
        "cc",
        *CFLAGS,
        "-I",
        "sdk",
        "-o",
        str(out),
        str(source.relative_to(HERE)),
    ]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"{capability}: compile failed\n{done.stderr}")
    return out


def sha256sums(paths: list[Path]) -> str:
    """`sha256sum` format: '<hex>  <name>' per line, sorted by name."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
        for p in sorted(paths, key=lambda p: p.name)
    ]
    return "".join(lines)


def build(out_dir: Path, *, strict_version: bool = True) -> list[Path]:
    """Build every module into `out_dir` and write its SHA256SUMS; returns the .wasm paths."""
    version = zig_version()
    if strict_version and version != ZIG_VERSION:
        raise BuildError(
            f"Zig {version} found, the checked-in modules are built with {ZIG_VERSION}: "
            f"pip install ziglang=={ZIG_VERSION}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    # The first compile fills Zig's libc cache; do it alone so the others reuse it.
    first, *rest = MODULES
    paths = [compile_module(first, out_dir)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths += pool.map(lambda cap: compile_module(cap, out_dir), rest)
    (out_dir / "SHA256SUMS").write_text(sha256sums(paths))
    return paths


def stale_files(fresh_dir: Path, dist_dir: Path = DIST) -> list[str]:
    """Names of the files in `fresh_dir` that differ from (or are missing in) `dist_dir`."""
    return sorted(
        p.name
        for p in fresh_dir.iterdir()
        if not (dist_dir / p.name).is_file() or (dist_dir / p.name).read_bytes() != p.read_bytes()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--check", action="store_true", help="rebuild in a temporary folder and compare with dist/"
    )
    parser.add_argument(
        "--any-zig", action="store_true", help="build with whatever Zig version is installed"
    )
    args = parser.parse_args(argv)
    try:
        if not args.check:
            for path in build(DIST, strict_version=not args.any_zig):
                print(f"{path.relative_to(HERE)}  {path.stat().st_size} bytes")
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), strict_version=not args.any_zig)
            stale = stale_files(Path(tmp))
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    if stale:
        print(
            f"build.py: out of date, run `python guest_modules/build.py`: {stale}", file=sys.stderr
        )
        return 1
    print("dist/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
