"""Generated API code (see proto/generate.py)."""
