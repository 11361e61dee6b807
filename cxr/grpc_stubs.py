"""Python gRPC stubs generated from the `.proto` files shipped inside the installed TorchServe
(`ts/frontend/model-server.jar`, folder `proto/`), so the client always matches the server's version.

    python -m cxr.grpc_stubs        # (re)generate into cxr/_grpc/ (done by `make setup`)
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

STUB_DIR = Path(__file__).resolve().parent / "_grpc"
PROTOS = ("inference.proto", "management.proto")


def _server_jar() -> Path:
    import ts

    return Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"


def generate(out_dir: Path = STUB_DIR) -> Path:
    """Extract TorchServe's protos and compile them with grpc_tools (protoc) into `out_dir`."""
    import google.rpc
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(_server_jar()) as jar:
        for name in PROTOS:
            (Path(scratch) / name).write_bytes(jar.read(f"proto/{name}"))
        googleapis_root = Path(next(iter(google.rpc.__path__))).parent.parent
        arguments = ["protoc", f"-I{scratch}", f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
                     f"-I{googleapis_root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                     *[str(Path(scratch) / name) for name in PROTOS]]
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"protoc failed on TorchServe's protos: {' '.join(arguments)}")
    return out_dir


def load() -> dict[str, ModuleType]:
    """The generated modules (generating them first if needed): inference_pb2(_grpc), management_pb2(_grpc)."""
    if not (STUB_DIR / "inference_pb2_grpc.py").is_file():
        generate()
    if str(STUB_DIR) not in sys.path:
        sys.path.insert(0, str(STUB_DIR))  # generated code imports its siblings as top-level modules
    names = ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")
    return {name: importlib.import_module(name) for name in names}


if __name__ == "__main__":
    print(f"generated {', '.join(PROTOS)} stubs in {generate()}")
