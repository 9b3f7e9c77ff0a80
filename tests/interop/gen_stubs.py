"""Generates the Python gRPC stubs from proto/ into a build folder (not committed)."""
import os
import sys

from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, ".build-interop", "stubs")


def generate() -> str:
    os.makedirs(OUT, exist_ok=True)
    proto = os.path.join("accelgate", "v1", "accelerator.proto")
    rc = protoc.main(["protoc", f"-I{os.path.join(ROOT, 'proto')}", f"--python_out={OUT}",
                      f"--grpc_python_out={OUT}", proto])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    for d in ("accelgate", os.path.join("accelgate", "v1")):
        open(os.path.join(OUT, d, "__init__.py"), "a").close()
    return OUT


if __name__ == "__main__":
    print(generate())
