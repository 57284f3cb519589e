"""Regenerate (or check) the Python code for the Open Inference Protocol.

    python proto/generate.py          # rewrite the generated files
    python proto/generate.py --check  # exit 1 if they are stale against the .proto

The generated modules are committed so that users need neither protoc nor
grpcio-tools; CI runs --check so that they never drift from the .proto.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["offload/oip/grpc_service.proto"]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

# Triton's, KServe's and MLServer's generated code all register the same
# `inference.*` symbols in protobuf's process-wide default pool, and a second
# registration fails ("duplicate symbol"). Our messages go into a private pool
# instead, so an app can import offload next to tritonclient. The wire format
# does not depend on the pool.
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def use_private_pool(module: Path) -> None:
    text = module.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{module}: expected one default-pool registration; has protoc's output changed?")
    module.write_text(text.replace(DEFAULT_POOL, PRIVATE_POOL))


def generate(out_dir: Path) -> None:
    """Run protoc, with mypy-protobuf's plugins for typed stubs, into out_dir."""
    grpc_include = Path(protoc.__file__).resolve().parent / "_proto"
    for proto in PROTO_FILES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{grpc_include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        use_private_pool(out_dir / (proto.removesuffix(".proto") + "_pb2.py"))


def generated_files(root: Path) -> list[Path]:
    candidates = (Path(proto.removesuffix(".proto") + suffix) for proto in PROTO_FILES for suffix in GENERATED_SUFFIXES)
    return sorted(rel for rel in candidates if (root / rel).exists())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = generated_files(fresh_root)
        if options.check:
            stale = [
                str(rel)
                for rel in fresh
                if not (PROTO_ROOT / rel).exists() or not filecmp.cmp(fresh_root / rel, PROTO_ROOT / rel, shallow=False)
            ]
            if stale:
                print("stale generated code: " + ", ".join(stale) + "\nrun: python proto/generate.py", file=sys.stderr)
                return 1
            print(f"generated code is up to date ({len(fresh)} files)")
            return 0
        for rel in fresh:
            shutil.copyfile(fresh_root / rel, PROTO_ROOT / rel)
            print(f"wrote {PROTO_ROOT.name}/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
