"""Code that runs inside a worker process: it imports torch, never grpc or the pool."""
