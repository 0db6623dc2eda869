"""`anvil-compute new-guest NAME`: scaffold a guest module to build, try and deploy.

The folder holds a small working guest (C with a copy of the SDK header, or
Zig with only its std), a sample input, and a README with one command each to
build it with the pinned toolchain, try it (`anvil-compute run`) and deploy it.
The guest follows the ABI of guest_modules/GUIDE.md: params from argv or
ANVIL_PARAM_*, input 0 on stdin, the result on stdout, a bad input ends it
with exit status 1 and one line on stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from string import Template
from typing import Any

from daemon.exceptions import FailedPrecondition, InvalidArgument
from daemon.registry.models import validate_capability

EXIT_USAGE = 2
SAMPLE_INPUT = "3\n4\n\n5\n"

C_SOURCE = r"""/*
 * $name — a guest module for anvil-compute, made by `anvil-compute new-guest`:
 * the sum of the integers of input 0, one per line (blank lines skipped), each
 * times param `scale` (default 1).
 *
 * Result on stdout: {"count": N, "sum": S}. Bad input fails the job with one
 * line on stderr and exit status 1: `$name: line 3: expected an integer, got 'x'`.
 * The ABI and the SDK (anvil_guest.h): guest_modules/GUIDE.md of anvil-compute.
 */
#include "anvil_guest.h"

static int is_blank(char c) { return c == ' ' || c == '\t' || c == '\r'; }

int main(int argc, char **argv) {
    anvil_init("$name", argc, argv); /* prefix of error messages */
    static const char *const params[] = {"scale", NULL};
    anvil_check_params(params); /* --sclae=2 fails, not ignored */
    long long scale = anvil_param_int("scale", 1, -1000000, 1000000);

    size_t len;
    char *text = (char *)anvil_read_all(anvil_input(0), &len); /* input 0 = stdin */
    char *text_end = text + len;
    long long count = 0, sum = 0;
    size_t line_no = 0;
    for (char *start = text; start < text_end;) {
        char *newline = memchr(start, '\n', (size_t)(text_end - start));
        char *stop = newline != NULL ? newline : text_end;
        char *next = newline != NULL ? newline + 1 : text_end;
        line_no++;
        while (start < stop && is_blank(*start)) start++;
        while (stop > start && is_blank(stop[-1])) stop--;
        if (start < stop) {
            *stop = '\0';
            char *end;
            errno = 0;
            long long n = strtoll(start, &end, 10);
            if (end != stop || errno != 0 || isspace((unsigned char)*start))
                anvil_fail("line %zu: expected an integer, got '%.40s'", line_no, start);
            long long scaled;
            if (__builtin_mul_overflow(n, scale, &scaled) ||
                __builtin_add_overflow(sum, scaled, &sum))
                anvil_fail("line %zu: the sum overflows 64 bits", line_no);
            count++;
        }
        start = next;
    }
    printf("{\"count\": %lld, \"sum\": %lld}\n", count, sum); /* the inline result */
    return 0;
}
"""

ZIG_SOURCE = r"""//! $name — a guest module for anvil-compute (Zig $zig_version, no libc), made
//! by `anvil-compute new-guest`: the sum of the integers of input 0, one per
//! line (blank lines skipped), each times param `scale` (default 1).
//!
//! Result on stdout: {"count": N, "sum": S}. Bad input fails the job with one
//! line on stderr and exit status 1: `$name: line 3: expected an integer, got 'x'`.
//! The ABI: guest_modules/GUIDE.md of anvil-compute.
const std = @import("std");

const name = "$name";
const allowed_params = [_][]const u8{"scale"};

/// `name: message` on stderr and exit status 1: the job fails with that message.
fn fail(io: std.Io, comptime fmt: []const u8, args: anytype) noreturn {
    var buf: [512]u8 = undefined;
    var w = std.Io.File.stderr().writerStreaming(io, &buf);
    w.interface.print(name ++ ": " ++ fmt ++ "\n", args) catch {};
    w.interface.flush() catch {};
    std.process.exit(1);
}

/// Fail on anything but `--key=value` with a key from `allowed_params` (catches typos).
fn checkParams(io: std.Io, args: []const [:0]const u8) void {
    for (args[1..]) |arg| {
        const eq = std.mem.indexOfScalar(u8, arg, '=') orelse 0;
        if (!std.mem.startsWith(u8, arg, "--") or eq <= 2)
            fail(io, "unexpected argument '{s}' (params are --key=value)", .{arg});
        for (allowed_params) |key| {
            if (std.mem.eql(u8, arg[2..eq], key)) break;
        } else fail(io, "unknown param '{s}'", .{arg[2..eq]});
    }
}

/// A param: `--key=value` in argv (the last one wins), else env ANVIL_PARAM_<KEY>.
fn param(init: std.process.Init, args: []const [:0]const u8, comptime key: []const u8) ?[]const u8 {
    var found: ?[]const u8 = null;
    for (args[1..]) |arg| {
        if (std.mem.startsWith(u8, arg, "--" ++ key ++ "=")) found = arg[key.len + 3 ..];
    }
    if (found) |v| return v;
    var env_name: [key.len]u8 = undefined;
    for (key, 0..) |c, i|
        env_name[i] = if (std.ascii.isAlphanumeric(c)) std.ascii.toUpper(c) else '_';
    return init.environ_map.get("ANVIL_PARAM_" ++ env_name);
}

/// A decimal integer: an optional sign and digits (std.fmt.parseInt also takes '_').
fn parseDecimal(text: []const u8) ?i64 {
    if (std.mem.indexOfScalar(u8, text, '_') != null) return null;
    return std.fmt.parseInt(i64, text, 10) catch null;
}

pub fn main(init: std.process.Init) !void {
    const io = init.io;
    const arena = init.arena.allocator();
    const args = try init.minimal.args.toSlice(arena);
    checkParams(io, args);
    const scale_text = param(init, args, "scale") orelse "1";
    const scale = parseDecimal(scale_text) orelse
        fail(io, "param scale: expected an integer, got '{s}'", .{scale_text});
    if (scale < -1_000_000 or scale > 1_000_000)
        fail(io, "param scale: {d} is outside [-1000000, 1000000]", .{scale});

    // Input 0 is stdin; input i > 0 is init.preopens.get("/input"), then the file "i".
    var in_buf: [64 * 1024]u8 = undefined;
    var stdin = std.Io.File.stdin().readerStreaming(io, &in_buf);
    const text = try stdin.interface.allocRemaining(arena, .unlimited);

    var count: i64 = 0;
    var sum: i64 = 0;
    var line_no: usize = 0;
    var lines = std.mem.splitScalar(u8, text, '\n');
    while (lines.next()) |raw| {
        line_no += 1;
        const line = std.mem.trim(u8, raw, " \t\r");
        if (line.len == 0) continue;
        const n = parseDecimal(line) orelse {
            const shown = line[0..@min(line.len, 40)];
            fail(io, "line {d}: expected an integer, got '{s}'", .{ line_no, shown });
        };
        const scaled = std.math.mul(i64, n, scale) catch
            fail(io, "line {d}: the sum overflows 64 bits", .{line_no});
        sum = std.math.add(i64, sum, scaled) catch
            fail(io, "line {d}: the sum overflows 64 bits", .{line_no});
        count += 1;
    }

    var out_buf: [256]u8 = undefined;
    var stdout = std.Io.File.stdout().writerStreaming(io, &out_buf);
    try stdout.interface.print("{{\"count\": {d}, \"sum\": {d}}}\n", .{ count, sum });
    try stdout.interface.flush();
}
"""

README = """# $name

A guest module for anvil-compute, made by `anvil-compute new-guest`: the sum of
the integers of input 0 (one per line) times param `scale`, printed as
`{"count": N, "sum": S}`. Edit `$source` to make it yours.

Build it with the pinned toolchain (`pip install ziglang==$zig_version`), try it
in the job sandbox, then deploy it (with the operator token):

```sh
$commands
```

Then any peer runs it: `anvil-compute submit $name --input numbers.txt --wait`.
The ABI (params, inputs, `/output`, errors) and deploying: `guest_modules/GUIDE.md`
of anvil-compute.
"""


@dataclass(frozen=True, kw_only=True)
class Language:
    source: str  # the file name of the guest's source
    template: str
    build: str  # the build command; `$wasm` is the module's file name
    sdk: bool  # copy the C SDK header beside the source


LANGUAGES: dict[str, Language] = {
    "c": Language(
        source="main.c",
        template=C_SOURCE,
        build="python -m ziglang cc --target=wasm32-wasi -O2 -s -std=c11 -Wall -Wextra -Werror "
        "-o $wasm main.c",
        sdk=True,
    ),
    "zig": Language(
        source="main.zig",
        template=ZIG_SOURCE,
        build="python -m ziglang build-exe -target wasm32-wasi -O ReleaseSmall -fstrip "
        "-femit-bin=$wasm main.zig",
        sdk=False,
    ),
}


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "new-guest",
        help="scaffold a WASM guest module to build, try and deploy",
        description="Write a folder holding a small working guest module (it sums the "
        "integers of its input), a sample input, and a README with the commands to build it "
        "with the pinned Zig toolchain, try it with `anvil-compute run` and deploy it.",
    )
    parser.add_argument("name", metavar="NAME", help="the capability, e.g. stats:sum")
    parser.add_argument("--lang", choices=sorted(LANGUAGES), default="c", help="default: c")
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="where to write it; must not exist or be empty (default ./NAME, ':' -> '-')",
    )
    parser.set_defaults(handler=new_guest)


def pinned_zig_version() -> str:
    """The ziglang version pinned in anvil-compute's dev extras (its package metadata).

    Raises FailedPrecondition when the package metadata is missing or pins no ziglang.
    """
    try:
        requirements = metadata.requires("anvil-compute") or []
    except metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        match = re.match(r"ziglang\s*==\s*([^\s;,]+)", requirement)
        if match:
            return match.group(1)
    raise FailedPrecondition("no ziglang version pinned in anvil-compute's metadata")


def commands(name: str, lang: str) -> list[str]:
    """The scaffold's commands, run in its folder: build, try, deploy."""
    wasm = name.replace(":", "-") + ".wasm"
    return [
        Template(LANGUAGES[lang].build).substitute(wasm=wasm),
        f"anvil-compute run {wasm} --input sample.txt --param scale=2",
        f"anvil-compute deploy {name} {wasm}",
    ]


def scaffold(name: str, lang: str, target: Path) -> list[Path]:
    """Write the guest `name` in `lang` into `target`; returns the files written.

    Raises InvalidArgument for a bad capability name, or when `target` exists and is
    not an empty folder (nothing is written then).
    """
    validate_capability(name)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise InvalidArgument(f"{target} exists and is not an empty folder")
    language = LANGUAGES[lang]
    zig_version = pinned_zig_version()
    texts = {
        language.source: Template(language.template).substitute(name=name, zig_version=zig_version),
        "sample.txt": SAMPLE_INPUT,
        "README.md": Template(README).substitute(
            name=name,
            source=language.source,
            zig_version=zig_version,
            commands="\n".join(commands(name, lang)),
        ),
    }
    if language.sdk:
        header = resources.files("daemon.guest_sdk").joinpath("anvil_guest.h")
        texts["anvil_guest.h"] = header.read_text("utf-8")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in texts.items():
        (target / file_name).write_text(text, "utf-8")
        written.append(target / file_name)
    return written


def new_guest(args: argparse.Namespace) -> int:
    target: Path = args.dir or Path(args.name.replace(":", "-"))
    try:
        written = scaffold(args.name, args.lang, target)
    except InvalidArgument as exc:
        print(f"anvil-compute new-guest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {target}/: {' '.join(p.name for p in written)}")
    print("build, try and deploy it:")
    print(f"  cd {target}")
    for command in commands(args.name, args.lang):
        print(f"  {command}")
    return 0
