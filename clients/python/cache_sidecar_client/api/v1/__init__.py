"""Generated code for cachesidecar.v1 (see proto/generate.py)."""
