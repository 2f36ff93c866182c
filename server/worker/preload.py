"""Imported once by the fork server, before it forks any worker (see server.pool.supervisor).

Everything a worker needs is imported here, so each fork starts warm and shares these
pages with its siblings. gc.freeze() moves every object made so far out of the
collector's reach: a collection in a worker then never writes to (and so copies) the
pages it shares with the fork server. Nothing here may run a torch op: a fork after
OpenMP's thread pool has started hangs the child.
"""

import gc

import torch
import torch.package  # noqa: F401

import server.worker.main  # noqa: F401

gc.freeze()
