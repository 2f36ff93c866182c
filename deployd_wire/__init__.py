"""deployd's wire format, in one place: the daemon, its workers and the client all import it.

- `deployd_wire.dtypes`: the tensor dtypes deployd carries, with their names on every wire
  (packed values, deployd.v1's DType enum, KServe v2's datatype strings). No torch: the daemon
  checks tensors without building them.
- `deployd_wire.tensors`: torch tensors <-> their bytes (little-endian, C order), for the
  workers and the client.
- `deployd_wire.tensor_args`: the tensor-argument language (`deployd invoke`'s ARGs, a model's
  warmup inputs): text -> a value or a tensor; checked without torch, built with it.
- `deployd_wire.proto`: the gRPC stubs generated from protos/ (deployd.v1, KServe v2) by
  scripts/generate_protos.py; never edited. The daemon's edge (server.api) and the client import
  them from here, and no other copy exists.

A new dtype is one line in dtypes.DTYPES (and its enum value in protos/deployd/v1/deployd.proto).
"""
