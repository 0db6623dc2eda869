//! text:grep again, in Zig 0.17 with WASI libc and the C SDK (the same
//! behaviour as ../zig_grep, which uses only Zig's std): count the lines of
//! input 0 that contain param `needle`, copy them to /output/matches.txt,
//! print {"matches": N}.
//!
//! Zig 0.17 has no @cImport, and `zig translate-c` cannot translate the
//! header's variadic `anvil_fail` (it would become an import the host
//! refuses), so the SDK is compiled as its own C object and declared here.
//! ReleaseFast links the WASI libc that `zig cc -O2` (build.py) already built
//! into Zig's cache; ReleaseSmall would build another (~30 s) for the same size.
//!
//!     python -m ziglang build-exe -target wasm32-wasi -O ReleaseFast -fstrip \
//!         -lc --name text-grep main.zig ../../sdk/anvil_guest.c
const std = @import("std");

const FILE = opaque {};
extern fn anvil_init(name: [*:0]const u8, argc: c_int, argv: [*]const [*:0]const u8) void;
extern fn anvil_check_params(allowed: [*:null]const ?[*:0]const u8) void;
extern fn anvil_param(key: [*:0]const u8) ?[*:0]const u8;
extern fn anvil_input(index: c_int) *FILE;
extern fn anvil_read_all(f: *FILE, len: *usize) [*]u8;
extern fn anvil_output(name: [*:0]const u8) *FILE;
extern fn anvil_output_close(f: *FILE) void;
extern fn anvil_fail(fmt: [*:0]const u8, ...) noreturn;
extern fn fwrite(ptr: [*]const u8, size: usize, n: usize, f: *FILE) usize;
extern fn printf(fmt: [*:0]const u8, ...) c_int;

pub fn main(init: std.process.Init.Minimal) void {
    // With libc the arguments are C strings: exactly what anvil_init takes.
    const argv = init.args.vector;
    anvil_init("text:grep", @intCast(argv.len), argv.ptr);
    anvil_check_params(&[_:null]?[*:0]const u8{"needle"});
    const needle = std.mem.span(anvil_param("needle") orelse anvil_fail("param needle is required"));
    if (needle.len == 0) anvil_fail("param needle is empty");

    var len: usize = 0;
    const text = anvil_read_all(anvil_input(0), &len)[0..len];
    const out = anvil_output("matches.txt");
    var matches: usize = 0;
    var lines = std.mem.splitScalar(u8, text, '\n');
    while (lines.next()) |line| {
        if (std.mem.indexOf(u8, line, needle) == null) continue;
        matches += 1;
        _ = fwrite(line.ptr, 1, line.len, out);
        _ = fwrite("\n", 1, 1, out);
    }
    anvil_output_close(out); // fails the job on a lost write
    _ = printf("{\"matches\": %zu}\n", matches);
}
