"""The WASM executor: wasmtime sandboxes in a pool of worker processes (WASM first)."""
