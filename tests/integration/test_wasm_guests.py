"""Guest modules for the WASM executor tests, written as WAT (no toolchain needed).

The other test_wasm_* modules import the builders from here; the tests below
only check that every guest is a valid WASI command.

Preopened descriptors (the executor's ABI): 3 = /input (read-only), 4 = /output.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import wasmtime

INPUT_FD = 3
OUTPUT_FD = 4
RIGHT_READ = 1 << 1
RIGHT_WRITE = 1 << 6
O_CREAT, O_TRUNC = 1, 8
# WASI errno values a sandbox may answer with when it refuses a path.
DENIED_ERRNOS = {2, 63, 69, 76}  # EACCES, EPERM, EROFS, ENOTCAPABLE

_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_unlink_file"
    (func $path_unlink_file (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink"
    (func $path_symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_seek"
    (func $fd_seek (param i32 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_link"
    (func $path_link (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
"""

# Memory layout: 0..63 scratch (iovecs, counts, fds), 64.. strings, 40000.. I/O buffer.
_HELPERS = """
  (func $write (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
  (func $open (param $dir i32) (param $ptr i32) (param $len i32) (param $oflags i32)
              (param $rights i64) (result i32)
    (call $path_open (local.get $dir) (i32.const 0) (local.get $ptr) (local.get $len)
      (local.get $oflags) (local.get $rights) (local.get $rights) (i32.const 0) (i32.const 32)))
"""


def _data(offset: int, text: str) -> str:
    escaped = "".join(f"\\{b:02x}" for b in text.encode())
    return f'(data (i32.const {offset}) "{escaped}")'


def module(body: str, *, data: str = "", pages: int = 1) -> bytes:
    """A WASI command: `body` is the code of `_start`."""
    wat = f"""(module {_IMPORTS}
      (memory (export "memory") {pages})
      {data}
      {_HELPERS}
      (func (export "_start") {body}))"""
    return bytes(wasmtime.wat2wasm(wat))


def write_module(directory: Path, wasm: bytes) -> Path:
    """Store a module under its digest, as the daemon's cache would."""
    path = directory / f"{hashlib.sha256(wasm).hexdigest()}.wasm"
    path.write_bytes(wasm)
    return path


# --- well-behaved guests -----------------------------------------------------


def echo(tag: str = "echo") -> bytes:
    """Prints `tag` + argv (NUL-separated) to stdout, the environment to stderr,
    and copies stdin to /output/copy.txt."""
    return module(
        f"""
        (drop (call $write (i32.const 1) (i32.const 128) (i32.const {len(tag.encode())})))
        (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
        (drop (call $args_get (i32.const 1024) (i32.const 4096)))
        (drop (call $write (i32.const 1) (i32.const 4096) (i32.load (i32.const 20))))
        (drop (call $environ_sizes_get (i32.const 24) (i32.const 28)))
        (drop (call $environ_get (i32.const 2048) (i32.const 20480)))
        (drop (call $write (i32.const 2) (i32.const 20480) (i32.load (i32.const 28))))
        (if (call $open (i32.const {OUTPUT_FD}) (i32.const 64) (i32.const 8) (i32.const {O_CREAT})
              (i64.const {RIGHT_READ | RIGHT_WRITE}))
          (then (unreachable)))
        (block $done
          (loop $copy
            (i32.store (i32.const 40) (i32.const 40000))
            (i32.store (i32.const 44) (i32.const 4096))
            (br_if $done (call $fd_read (i32.const 0) (i32.const 40) (i32.const 1) (i32.const 48)))
            (br_if $done (i32.eqz (i32.load (i32.const 48))))
            (i32.store (i32.const 44) (i32.load (i32.const 48)))
            (drop (call $fd_write (i32.load (i32.const 32)) (i32.const 40) (i32.const 1)
              (i32.const 52)))
            (br $copy)))
        """,
        data=_data(64, "copy.txt") + _data(128, tag),
    )


def cat_input(name: str) -> bytes:
    """Prints /input/<name> to stdout; exits with the errno if it cannot open it."""
    return module(
        f"""
        (local $err i32)
        (local.set $err (call $open (i32.const {INPUT_FD}) (i32.const 64)
          (i32.const {len(name.encode())}) (i32.const 0) (i64.const {RIGHT_READ})))
        (if (local.get $err) (then (call $proc_exit (local.get $err))))
        (block $done
          (loop $copy
            (i32.store (i32.const 40) (i32.const 40000))
            (i32.store (i32.const 44) (i32.const 4096))
            (br_if $done (call $fd_read (i32.load (i32.const 32)) (i32.const 40) (i32.const 1)
              (i32.const 48)))
            (br_if $done (i32.eqz (i32.load (i32.const 48))))
            (drop (call $write (i32.const 1) (i32.const 40000) (i32.load (i32.const 48))))
            (br $copy)))
        """,
        data=_data(64, name),
    )


def write_files(count: int, size: int, *, exit_code: int = 0) -> bytes:
    """Creates /output/f0 .. f<count-1>, each `size` bytes, then exits with `exit_code`."""
    assert count <= 10
    return module(
        f"""
        (local $i i32)
        (loop $files
          (i32.store8 (i32.const 65) (i32.add (i32.const 48) (local.get $i)))
          (if (call $open (i32.const {OUTPUT_FD}) (i32.const 64) (i32.const 2) (i32.const {O_CREAT})
                (i64.const {RIGHT_WRITE}))
            (then (unreachable)))
          (i32.store (i32.const 40) (i32.const 40000))
          (i32.store (i32.const 44) (i32.const {size}))
          (drop (call $fd_write (i32.load (i32.const 32)) (i32.const 40) (i32.const 1)
            (i32.const 52)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $files (i32.lt_u (local.get $i) (i32.const {count}))))
        (call $proc_exit (i32.const {exit_code}))
        """,
        data=_data(64, "f0"),
    )


def exit_with(code: int) -> bytes:
    return module(f"(call $proc_exit (i32.const {code}))")


# --- hostile guests ----------------------------------------------------------


def spin() -> bytes:
    return module("(loop br 0)")


def recurse() -> bytes:
    return bytes(
        wasmtime.wat2wasm(
            '(module (memory (export "memory") 1) (func $f (export "_start") (call $f)))'
        )
    )


def grow_until_refused() -> bytes:
    """memory.grow until refused, then fails the way malloc users do (abort)."""
    return module(
        """
        (loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        (unreachable)
        """
    )


def grow_forever() -> bytes:
    """memory.grow in a loop that ignores every refusal."""
    return module("(loop (drop (memory.grow (i32.const 1))) (br 0))")


def huge_initial_memory(pages: int = 2000) -> bytes:
    return module("", pages=pages)


def sleep(seconds: int) -> bytes:
    """One poll_oneoff on a relative monotonic-clock timeout."""
    return module(
        f"""
        (i64.store (i32.const 1024) (i64.const 1))        ;; userdata
        (i32.store8 (i32.const 1032) (i32.const 0))       ;; tag: clock
        (i32.store (i32.const 1040) (i32.const 1))        ;; clock id: monotonic
        (i64.store (i32.const 1048) (i64.const {seconds * 1_000_000_000}))
        (i64.store (i32.const 1056) (i64.const 0))        ;; precision
        (i32.store16 (i32.const 1064) (i32.const 0))      ;; flags: relative
        (drop (call $poll_oneoff (i32.const 1024) (i32.const 2048) (i32.const 1) (i32.const 3072)))
        """
    )


def read_stdin_forever() -> bytes:
    """fd_read on stdin in a loop, whatever it returns."""
    return module(
        """
        (loop
          (i32.store (i32.const 40) (i32.const 40000))
          (i32.store (i32.const 44) (i32.const 4096))
          (drop (call $fd_read (i32.const 0) (i32.const 40) (i32.const 1) (i32.const 48)))
          (br 0))
        """
    )


def flood(fd: int, total: int, chunk: int = 65536) -> bytes:
    """Writes `total` bytes to `fd` in `chunk`-byte writes, ignoring errors, then exits 0."""
    return module(
        f"""
        (local $left i32)
        (local.set $left (i32.const {total}))
        (block $done
          (loop $more
            (br_if $done (i32.le_s (local.get $left) (i32.const 0)))
            (drop (call $write (i32.const {fd}) (i32.const 0) (i32.const {chunk})))
            (local.set $left (i32.sub (local.get $left) (i32.const {chunk})))
            (br $more)))
        """,
        pages=2,
    )


def _sleep_body(seconds: int) -> str:
    return f"""
        (i64.store (i32.const 1024) (i64.const 1))
        (i32.store8 (i32.const 1032) (i32.const 0))
        (i32.store (i32.const 1040) (i32.const 1))
        (i64.store (i32.const 1048) (i64.const {seconds * 1_000_000_000}))
        (i64.store (i32.const 1056) (i64.const 0))
        (i32.store16 (i32.const 1064) (i32.const 0))
        (drop (call $poll_oneoff (i32.const 1024) (i32.const 2048) (i32.const 1) (i32.const 3072)))
        """


def fill_output(total: int, chunk: int, *, then: str = "exit") -> bytes:
    """Writes `total` bytes to /output/big in `chunk`-byte fd_writes (a single one when
    chunk == total: wasmtime writes it in one host call), ignoring every error. Then
    `exit`s 0, goes on writing `forever` (ignoring ENOSPC), or `sleep`s an hour in
    poll_oneoff, where no epoch reaches it."""
    after = {
        "exit": "",
        "forever": f"""(loop $again
            (drop (call $write (i32.load (i32.const 32)) (i32.const 65536) (i32.const {chunk})))
            (br $again))""",
        "sleep": _sleep_body(3600),
    }[then]
    pages = chunk // 65536 + 2
    return module(
        f"""
        (local $left i64)
        (if (call $open (i32.const {OUTPUT_FD}) (i32.const 64) (i32.const 3) (i32.const {O_CREAT})
              (i64.const {RIGHT_WRITE}))
          (then (unreachable)))
        (local.set $left (i64.const {total}))
        (block $done
          (loop $more
            (br_if $done (i64.le_s (local.get $left) (i64.const 0)))
            (drop (call $write (i32.load (i32.const 32)) (i32.const 65536) (i32.const {chunk})))
            (local.set $left (i64.sub (local.get $left) (i64.const {chunk})))
            (br $more)))
        {after}
        """,
        data=_data(64, "big"),
        pages=pages,
    )


def _name_letters(at: int) -> str:
    """WAT storing $i as five letters a-p (4 bits each, high first) at address `at`."""
    return "".join(
        f"""(i32.store8 (i32.const {at + k})
              (i32.add (i32.const 97)
                (i32.and (i32.shr_u (local.get $i) (i32.const {4 * (4 - k)})) (i32.const 15))))"""
        for k in range(5)
    )


def many_files(count: int) -> bytes:
    """Creates /output/f<5 letters> for 0 <= i < count (one byte each), closing each,
    ignoring every error; then exits 0."""
    letters = _name_letters(65)
    return module(
        f"""
        (local $i i32)
        (block $done
          (loop $files
            (br_if $done (i32.ge_u (local.get $i) (i32.const {count})))
            {letters}
            (if (i32.eqz (call $open (i32.const {OUTPUT_FD}) (i32.const 64) (i32.const 6)
                  (i32.const {O_CREAT}) (i64.const {RIGHT_WRITE})))
              (then
                (drop (call $write (i32.load (i32.const 32)) (i32.const 64) (i32.const 1)))
                (drop (call $fd_close (i32.load (i32.const 32))))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $files)))
        """,
        data=_data(64, "fAAAAA"),
    )


def sparse_file(offset: int) -> bytes:
    """Writes one byte at `offset` of /output/sparse: a file that large, without its pages."""
    return module(
        f"""
        (if (call $open (i32.const {OUTPUT_FD}) (i32.const 64) (i32.const 6) (i32.const {O_CREAT})
              (i64.const {RIGHT_WRITE}))
          (then (unreachable)))
        (if (call $fd_seek (i32.load (i32.const 32)) (i64.const {offset}) (i32.const 0)
              (i32.const 48))
          (then (unreachable)))
        (if (call $write (i32.load (i32.const 32)) (i32.const 64) (i32.const 1))
          (then (unreachable)))
        """,
        data=_data(64, "sparse"),
    )


def hard_links(count: int) -> bytes:
    """Creates /output/f0, then hard links l<5 letters> to it, ignoring every error."""
    letters = _name_letters(129)
    return module(
        f"""
        (local $i i32)
        (if (call $open (i32.const {OUTPUT_FD}) (i32.const 64) (i32.const 2) (i32.const {O_CREAT})
              (i64.const {RIGHT_WRITE}))
          (then (unreachable)))
        (drop (call $write (i32.load (i32.const 32)) (i32.const 64) (i32.const 2)))
        (block $done
          (loop $links
            (br_if $done (i32.ge_u (local.get $i) (i32.const {count})))
            {letters}
            (drop (call $path_link (i32.const {OUTPUT_FD}) (i32.const 0) (i32.const 64)
              (i32.const 2) (i32.const {OUTPUT_FD}) (i32.const 128) (i32.const 6)))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $links)))
        """,
        data=_data(64, "f0") + _data(128, "lAAAAA"),
    )


def try_open(fd: int, path: str, *, oflags: int = 0, rights: int = RIGHT_READ) -> bytes:
    """Exits with path_open's errno (0 = it opened)."""
    return module(
        f"""(call $proc_exit (call $open (i32.const {fd}) (i32.const 64)
              (i32.const {len(path.encode())}) (i32.const {oflags}) (i64.const {rights})))""",
        data=_data(64, path),
    )


def try_unlink(fd: int, path: str) -> bytes:
    return module(
        f"""(call $proc_exit (call $path_unlink_file (i32.const {fd}) (i32.const 64)
              (i32.const {len(path.encode())})))""",
        data=_data(64, path),
    )


def symlink_out(target: str, name: str) -> bytes:
    """Makes /output/<name> a symbolic link to `target` (a host path, if anyone follows it)."""
    return module(
        f"""(call $proc_exit (call $path_symlink (i32.const 64) (i32.const {len(target.encode())})
              (i32.const {OUTPUT_FD}) (i32.const 512) (i32.const {len(name.encode())})))""",
        data=_data(64, target) + _data(512, name),
    )


def unknown_import() -> bytes:
    return bytes(
        wasmtime.wat2wasm(
            '(module (import "env" "escape" (func)) (memory (export "memory") 1)'
            ' (func (export "_start")))'
        )
    )


GARBAGE = b"this is not webassembly at all \x00\x01\x02"


@pytest.mark.parametrize(
    "wasm",
    [
        echo(),
        cat_input("a"),
        write_files(2, 10),
        exit_with(3),
        spin(),
        recurse(),
        grow_until_refused(),
        grow_forever(),
        huge_initial_memory(),
        sleep(1),
        read_stdin_forever(),
        flood(1, 10),
        try_open(INPUT_FD, "a"),
        try_unlink(INPUT_FD, "a"),
        symlink_out("/etc/passwd", "x"),
        fill_output(10, 10),
        fill_output(10, 10, then="forever"),
        fill_output(10, 10, then="sleep"),
        many_files(10),
        sparse_file(10),
        hard_links(10),
    ],
)
def test_guest_is_a_valid_wasi_command(wasm: bytes) -> None:
    engine = wasmtime.Engine()
    module_ = wasmtime.Module(engine, wasm)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.instantiate_pre(module_)
    assert any(e.name == "_start" for e in module_.exports)
