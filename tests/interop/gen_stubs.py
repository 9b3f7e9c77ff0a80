"""Generates the Python gRPC stubs from proto/ into a build folder (not committed)."""
import os
import sys

from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, ".build-interop", "stubs")


def generate() -> str:
    os.makedirs(OUT, exist_ok=True)
    protos = [os.path.join("accelgate", "v1", "accelerator.proto"), os.path.join("grpc", "health", "v1", "health.proto")]
    rc = protoc.main(["protoc", f"-I{os.path.join(ROOT, 'proto')}", f"--python_out={OUT}",
                      f"--grpc_python_out={OUT}", *protos])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    for d in ("accelgate", os.path.join("accelgate", "v1")):
        open(os.path.join(OUT, d, "__init__.py"), "a").close()
    # The health stubs live under a package name of our own, so they never shadow grpcio's `grpc`.
    health = os.path.join(OUT, "grpc", "health", "v1")
    os.makedirs(os.path.join(OUT, "agstubs_health"), exist_ok=True)
    for name in ("health_pb2.py", "health_pb2_grpc.py"):
        src = open(os.path.join(health, name)).read().replace("from grpc.health.v1 import health_pb2",
                                                              "from agstubs_health import health_pb2")
        open(os.path.join(OUT, "agstubs_health", name), "w").write(src)
    open(os.path.join(OUT, "agstubs_health", "__init__.py"), "a").close()
    import shutil
    shutil.rmtree(os.path.join(OUT, "grpc"))
    return OUT


if __name__ == "__main__":
    print(generate())
