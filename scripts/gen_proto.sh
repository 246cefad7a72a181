#!/usr/bin/env bash
# Regenerate the committed gRPC stubs from fastserve_edge/cluster/protocol/peer.proto.
#   scripts/gen_proto.sh              with .venv/bin/python (scripts/setup.sh test), else python3
#   PYTHON=/path/to/python scripts/gen_proto.sh
# Needs the grpcio-tools version pinned in pyproject.toml's test extra: another version
# writes different stubs and tests/unit/test_protocol.py will say they are stale.
#
# The proto is compiled from the repository root (-I .), so the stubs import each other
# package-qualified (`from fastserve_edge.cluster.protocol import peer_pb2`): no sed needed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

"$PYTHON" -m grpc_tools.protoc -I . \
    --python_out=. --pyi_out=. --grpc_python_out=. \
    fastserve_edge/cluster/protocol/peer.proto
echo "regenerated fastserve_edge/cluster/protocol/peer_pb2{.py,.pyi,_grpc.py} with $("$PYTHON" -m grpc_tools.protoc --version)" >&2
