"""``python -m protos``: generate the protobuf/gRPC Python code."""

from protos import PROTO_DIR, generate

generate()
print(f"generated protobuf code in {PROTO_DIR}")
