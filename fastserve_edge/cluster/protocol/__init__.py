"""The peer wire contract: peer.proto and its generated stubs (peer_pb2, peer_pb2_grpc).

Nothing else defines message shapes (STYLE #7). Regenerate the stubs with
scripts/gen_proto.sh after editing peer.proto; tests/unit/test_protocol.py checks they
are fresh. The numbers every end of a connection must agree on live here.
"""

PROTOCOL_VERSION = 2  # bump on any incompatible change to peer.proto; Hello refuses a mismatch
                      # (2: every link is mutually authenticated TLS, cluster/auth.py)

# Largest gRPC message either end sends or accepts. Prefill hidden states are [1, S, D] fp32:
# 4096 tokens x 4096 dims is exactly 64 MiB, so a host cuts a long prompt into row chunks
# that fit (KV makes chunked prefill exact). Weights travel in CHUNK_BYTES pieces.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024  # FetchLayer chunk: large enough for link rate, small next to the limit
