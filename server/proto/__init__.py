"""Generated from protos/deployd/v1/deployd.proto by scripts/generate_protos.py."""
