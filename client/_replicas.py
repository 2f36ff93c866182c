"""Several replicas behind one target, and the changes the client refuses to send through it.

A target may name several daemons: an `ipv4:`/`ipv6:` list (`ipv4:10.0.0.1:50051,10.0.0.2:50051`)
or a `dns:` name with several records (a Kubernetes headless Service). The channel spreads calls
over them (round_robin, see client._requests.channel_options), which is right for calls and
wrong for changes: a package loaded, a module registered or an object unloaded through it would
reach whichever replica the balancer picked, and from then on a call by name would succeed or
fail depending on where it landed; a replica started later (a restart, the autoscaler) would
never see it. So such changes are refused before anything is sent. Replicas get their models
from the model repository they share (config `models:`), or a change is sent to each replica's
own address. A target without a scheme (`host:port`) is one daemon: it is never checked, so
`localhost:50051` works whatever localhost resolves to.
"""

from __future__ import annotations

import socket
from typing import Any, Sequence

import grpc

from client._errors import FailedPreconditionError

_LIST_SCHEMES = ("ipv4:", "ipv6:")


def listed_addresses(target: str) -> list[str] | None:
    """The addresses an `ipv4:`/`ipv6:` target lists; None for any other target."""
    for scheme in _LIST_SCHEMES:
        if target.startswith(scheme):
            return [address for address in target[len(scheme) :].split(",") if address]
    return None


def dns_host_and_port(target: str) -> tuple[str, str] | None:
    """(host, port) of a `dns:` target (`dns:///host:port`, `dns://authority/host:port`, `dns:host:port`)."""
    if not target.startswith("dns:"):
        return None
    name = target[len("dns:") :]
    if name.startswith("//"):
        name = name[2:].partition("/")[2]  # drop the DNS server authority, if any
    if name.startswith("["):  # [v6 address]:port
        host, _, rest = name[1:].partition("]")
        return host, rest.lstrip(":") or "443"
    host, _, port = name.rpartition(":")
    return (host, port) if host else (name, "443")


def distinct_hosts(addrinfo: Sequence[tuple[Any, ...]]) -> int:
    """How many hosts a getaddrinfo answer names (one per address, whatever its socket types)."""
    return len({sockaddr[0] for *_, sockaddr in addrinfo})


def refuse_change(target: str, what: str, replicas: int) -> None:
    """Raise the refusal of `what` through a target of several replicas (a no-op for one)."""
    if replicas <= 1:
        return
    raise FailedPreconditionError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"{what} through {target!r} would reach one of its {replicas} replicas, chosen by the load"
        " balancer, and the replicas would no longer serve the same models. Put the package in the"
        " model repository the replicas share (config `models:`, then `deployd reload` on each),"
        " or send the change to each replica's own address.",
    )


def replicas_listed(target: str) -> int:
    """How many daemons a target names without a DNS lookup: an `ipv4:`/`ipv6:` list's
    addresses, else 1 (a plain `host:port` is one daemon, whatever it resolves to)."""
    listed = listed_addresses(target)
    return 1 if listed is None else len(listed)


def replicas_now(target: str) -> int:
    """How many daemons a target reaches, as far as the client can tell (1 for a plain target).
    A `dns:` name is resolved now: blocking, so the asyncio client asks its loop instead
    (client/aio/_backend.py)."""
    host_port = dns_host_and_port(target)
    if host_port is None:
        return replicas_listed(target)
    try:
        return distinct_hosts(socket.getaddrinfo(*host_port, type=socket.SOCK_STREAM))
    except OSError:
        return 1  # unresolvable: the call itself will fail UNAVAILABLE, saying so
