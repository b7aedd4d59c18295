"""The checked-in generated gRPC code matches proto/ (run `./dev proto` when this fails)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rpc_of_the_design_is_declared():
    from sidecar.api.v1 import cache_pb2

    methods = set(cache_pb2.DESCRIPTOR.services_by_name["Cache"].methods_by_name)
    assert {"Get", "BatchGet", "Invalidate", "Watch", "Sync", "ListTables"} <= methods
