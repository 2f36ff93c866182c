"""The pool: the worker processes, and the daemon's calls to them.

    supervisor     keeps a prepared worker in every slot: spawns, replaces, stops ──events──┐
    events         WorkerServing, WorkerExited: the one stream that joins the two          │
    dispatcher     routes the daemon's calls to free workers <─────────────────────────────┘
    worker_handle  one worker process: its channel, its requests in flight, its state
    procinfo       what /proc says about processes
    deadlines      the caller's deadline, from the servicer to the requests it sends

The supervisor knows nothing of calls, and the dispatcher starts and stops no process.
"""
