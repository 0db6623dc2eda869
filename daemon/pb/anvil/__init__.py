"""Generated protobuf and gRPC stubs (proto/generate.py)."""
