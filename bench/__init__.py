"""deployd's benchmark suite: `python -m bench [--smoke] [--only NAME,...]` (or `make bench`).

Each benchmark compares deployd with a baseline measured in the same run and prints the
ratio against the target from the issue; rows go to bench/results/results.csv in
torch::deploy's benchmark format. Modules: scaling, overhead, bandwidth, memory, startup,
warmup (one benchmark each), common (processes, daemon, statistics, report), models (the
packaged models), echo (the bare gRPC baseline), child (runs a load generator).
"""
