/*
 * anvil_guest.c — the C SDK as an object with external linkage, for guests
 * written in another language that links WASI libc. Zig (0.17 has no
 * @cImport): declare the functions you use as `extern fn` and build with
 *
 *     python -m ziglang build-exe -target wasm32-wasi -O ReleaseFast -lc main.zig anvil_guest.c
 *
 * guest_modules/examples/zig_sdk/main.zig is a complete example.
 */
#define ANVIL_API
#include "anvil_guest.h"
