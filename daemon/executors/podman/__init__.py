"""The Podman executor: hardened containers for capabilities that are not WASM."""
