"""The shared-memory store: its byte layout (layout.py) and the daemon's writer (store.py)."""
