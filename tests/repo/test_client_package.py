"""cache-sidecar-client builds on its own and depends only on grpcio and protobuf."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"


def test_the_client_wheel_stands_alone(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(CLIENT),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("cache_sidecar_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        archive.extractall(tmp_path / "unpacked")
    assert "cache_sidecar_client/api/v1/cache_pb2.py" in names and "cache_sidecar_client/py.typed" in names
    requires = sorted(
        re.split(r"[<>=!~ ;]", line.removeprefix("Requires-Dist:").strip())[0]
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist") and "extra ==" not in line
    )
    assert requires == ["grpcio", "protobuf"]
    extras = [line for line in metadata.splitlines() if line.startswith("Requires-Dist") and "extra ==" in line]
    assert extras == ['Requires-Dist: lmdb>=1.4; extra == "shared-memory"']  # (imported only when used)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cache_sidecar_client as c; "
        "assert c.__file__.startswith(sys.argv[1]); assert 'sidecar' not in sys.modules; "
        "assert 'lmdb' not in sys.modules; print(c.__version__)"
    )
    imported = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(tmp_path / "unpacked")], capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr
