"""gRPC contracts (protobuf, package ``moe.v1``).

The ``*_pb2.py`` modules are generated from the ``.proto`` files by ``make protos`` (grpcio-tools) and
never committed. Only the ``wire.py`` modules of each service import them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("experts.proto", "coordinator.proto")


def generate() -> None:
    """Compiles every .proto here into ``protos/*_pb2.py`` and ``*_pb2_grpc.py`` with grpcio-tools."""
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)

    include = str(Path(protoc.__file__).parent / "_proto")
    root = PROTO_DIR.parent
    for name in PROTO_FILES:
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}",
                f"--grpc_python_out={root}", f"--pyi_out={root}", str(PROTO_DIR / name)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {name}")


def load(name: str) -> ModuleType:
    """Imports a generated module (e.g. ``experts_pb2``), generating the code first if it is missing."""
    if not (PROTO_DIR / f"{name}.py").exists():
        generate()
    return importlib.import_module(f"protos.{name}")

