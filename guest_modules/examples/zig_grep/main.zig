//! text:grep — an example guest in Zig (0.17, no libc): count the lines of
//! input 0 that contain param `needle`, copy them to /output/matches.txt,
//! print {"matches": N}.
//!
//!     python -m ziglang build-exe -target wasm32-wasi -O ReleaseSmall \
//!         -fstrip --name text-grep main.zig
const std = @import("std");

fn fail(io: std.Io, comptime fmt: []const u8, args: anytype) noreturn {
    var buf: [512]u8 = undefined;
    var w = std.Io.File.stderr().writerStreaming(io, &buf);
    w.interface.print("text:grep: " ++ fmt ++ "\n", args) catch {};
    w.interface.flush() catch {};
    std.process.exit(1);
}

/// A param: `--key=value` in argv (the last one wins), else env ANVIL_PARAM_<KEY>.
fn param(init: std.process.Init, comptime key: []const u8) !?[]const u8 {
    var found: ?[]const u8 = null;
    const args = try init.minimal.args.toSlice(init.arena.allocator());
    for (args[1..]) |arg| {
        if (std.mem.startsWith(u8, arg, "--" ++ key ++ "=")) found = arg[key.len + 3 ..];
    }
    if (found) |v| return v;
    var env_name: [key.len]u8 = undefined;
    for (key, 0..) |c, i| env_name[i] = if (std.ascii.isAlphanumeric(c)) std.ascii.toUpper(c) else '_';
    return init.environ_map.get("ANVIL_PARAM_" ++ env_name);
}

pub fn main(init: std.process.Init) !void {
    const io = init.io;
    const gpa = init.arena.allocator();
    const needle = (try param(init, "needle")) orelse fail(io, "param needle is required", .{});
    if (needle.len == 0) fail(io, "param needle is empty", .{});

    // Input 0 is stdin; input i > 0 would be init.preopens.get("/input") then "i".
    var in_buf: [64 * 1024]u8 = undefined;
    var stdin = std.Io.File.stdin().readerStreaming(io, &in_buf);
    const text = try stdin.interface.allocRemaining(gpa, .unlimited);

    const out_dir = switch (init.preopens.get("/output") orelse fail(io, "no /output", .{})) {
        .dir => |d| d,
        .file => fail(io, "/output is not a directory", .{}),
    };
    const out_file = try out_dir.createFile(io, "matches.txt", .{});
    defer out_file.close(io);
    var out_buf: [64 * 1024]u8 = undefined;
    var out = out_file.writerStreaming(io, &out_buf);

    var matches: usize = 0;
    var lines = std.mem.splitScalar(u8, text, '\n');
    while (lines.next()) |line| {
        if (std.mem.indexOf(u8, line, needle) == null) continue;
        matches += 1;
        try out.interface.writeAll(line);
        try out.interface.writeByte('\n');
    }
    try out.interface.flush();

    var stdout_buf: [256]u8 = undefined;
    var stdout = std.Io.File.stdout().writerStreaming(io, &stdout_buf);
    try stdout.interface.print("{{\"matches\": {d}}}\n", .{matches});
    try stdout.interface.flush();
}
