"""deployd: a gRPC daemon that serves torch.package models from a pool of worker processes.

Rooms, imports pointing down only (tests/test_layers.py keeps them so):
    app/     daemon (composition root, signals, shutdown order), config, `serve`, event loop
    api/     one module per protocol (deployd_v1, ...): protobuf in, domain calls out; auth,
             health, metrics. With app/, the only place grpc is imported.
    models/  the domain service (what is loaded, by id and by name), the model repository,
             packages, shared weights, the registry replayed into new workers
    batching/  joins a model's concurrent calls into one and splits the result back
    pool/    supervises worker processes and routes calls to them
    ipc/     the daemon <-> worker protocol (messages, framing) and shared memory
    worker/  what runs inside a worker process: the only place model code and torch run
Beside them: errors (the domain errors), logs, malloc, tracing (spans, through OpenTelemetry's API;
server.app.tracing starts it). The gRPC stubs are deployd_wire.proto's; the operator commands
live in deployd_cli (the server never imports the client).
"""
