#!/usr/bin/env bash
# Regenerates the committed Python gRPC code in services/tastemaker/v1/ from protos/.
#
#   scripts/gen_protos.sh                      # uses .venv/bin/python
#   PYTHON=python3 scripts/gen_protos.sh       # any Python with grpcio-tools installed
#
# The output must be committed; tests/unit/test_protos.py fails when it is stale.
# After adding fields, also run scripts/update_proto_lock.py.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-.venv/bin/python}"

"$PYTHON" -m grpc_tools.protoc \
  -Iprotos \
  --python_out=services \
  --grpc_python_out=services \
  --pyi_out=services \
  protos/tastemaker/v1/recommender_service.proto

echo "Regenerated services/tastemaker/v1/recommender_service_pb2{.py,.pyi,_grpc.py}"
