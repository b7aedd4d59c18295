"""Generate the Python gRPC code for the v1 API into the daemon and the client.

    python proto/generate.py            # write the generated files
    python proto/generate.py --check    # exit 1 if the checked-in files are stale

Each distribution carries its own copy (the client must not depend on the
daemon), under ``<package>/api/v1``. protoc writes absolute imports
(``from cachesidecar.v1 import cache_pb2``); they are rewritten to relative
ones so each copy lives inside its own package.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILE = "cachesidecar/v1/cache.proto"
TARGETS = (
    ROOT / "sidecar" / "api" / "v1",
    ROOT / "clients" / "python" / "cache_sidecar_client" / "api" / "v1",
)
GENERATED = ("cache_pb2.py", "cache_pb2.pyi", "cache_pb2_grpc.py")
INIT_TEXT = '"""Generated code for cachesidecar.v1 (see proto/generate.py)."""\n'


def generate() -> dict[str, str]:
    """Run protoc and return the generated files' text, imports rewritten."""
    from grpc_tools import protoc  # a dev dependency, imported only here

    with tempfile.TemporaryDirectory() as out:
        include = Path(protoc.__file__).parent / "_proto"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(PROTO_DIR / PROTO_FILE),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        gen_dir = Path(out) / "cachesidecar" / "v1"
        files = {name: (gen_dir / name).read_text() for name in GENERATED}
    files["cache_pb2_grpc.py"] = files["cache_pb2_grpc.py"].replace(
        "from cachesidecar.v1 import cache_pb2 as", "from . import cache_pb2 as"
    )
    files["__init__.py"] = INIT_TEXT
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    args = parser.parse_args(argv)
    files = generate()
    stale = []
    for target in TARGETS:
        for name, text in files.items():
            path = target / name
            current = path.read_text() if path.exists() else None
            if current == text:
                continue
            if args.check:
                stale.append(path)
                diff = difflib.unified_diff(
                    (current or "").splitlines(), text.splitlines(), str(path), "generated", lineterm=""
                )
                print("\n".join(list(diff)[:40]))
            else:
                target.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            "stale generated code: "
            + ", ".join(str(p.relative_to(ROOT)) for p in stale)
            + "\nrun: python proto/generate.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
