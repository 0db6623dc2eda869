"""Generated code; see proto/generate.py."""
