"""Not packaged: reaches workers through the config's worker.extra_sys_paths."""


def triple(x):
    return x * 3
