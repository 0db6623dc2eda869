"""Executors: run a job's guest under hard limits and return a typed result.

- `result`: `ExecutionResult` / `Outcome`, shared by every executor.
- `limits`: `Limits` of one run.
- `wasm`: `WasmExecutor`, the daemon's entry point for WASM jobs; under it
  `worker_pool` (worker processes, hard kill), `worker` (the process),
  `sandbox` (linker, limits, one run), `engine` (the one Engine, its epoch
  ticker), `module_cache` (memory → disk → compile; `lru`), `staging`
  (inputs in, outputs out), `protocol` (the pipe between daemon and worker).
- `job_executor`: the adapter the job runner calls.

Nothing is imported here, so that using `result` does not load wasmtime.
"""
