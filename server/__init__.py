"""deployd: a gRPC daemon that serves torch.package models from a pool of worker processes.

Layers, imports pointing one way:
    daemon (composition, signals) -> servicer (gRPC <-> domain) -> service (what is loaded)
        -> pool (supervises workers, routes calls) -> worker_handle -> protocol <- worker/
"""
