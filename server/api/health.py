"""grpc.health.v1 statuses: the whole server ("" and the Deployd service) and each loaded
object (service name = its object id).

SERVING while at least one worker can serve; NOT_SERVING while none can, before the pool
is up and from the start of shutdown. A placed model (server.models.placement) is SERVING while
at least one of its workers serves. An unloaded object's name reports SERVICE_UNKNOWN, the
last _REMEMBERED_GONE of them; older ones are forgotten (NOT_FOUND, as a name never loaded), so
a daemon that loads and unloads for months does not keep every name it ever served.

`<service>/capacity` is SERVING only while every worker slot serves: a pool that lost a
worker it cannot replace still serves (the server stays SERVING) but at reduced capacity,
which this name shows (a name with "/" never clashes with an object's).
"""

from __future__ import annotations

from collections import OrderedDict

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_REMEMBERED_GONE = 1024


class Health:
    def __init__(self, service_name: str) -> None:
        self.servicer = HealthServicer()
        self._server_names = ("", service_name)
        self.capacity_name = f"{service_name}/capacity"
        self._objects: set[str] = set()
        self._gone: OrderedDict[str, None] = OrderedDict()  # unloaded names reporting SERVICE_UNKNOWN

    async def sync(
        self,
        serving: bool,
        objects: set[str],
        full_capacity: bool,
        failing: frozenset[str] | set[str] = frozenset(),
        stranded: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """Set every status from the pool's state, the objects and models loaded now, and the
        models of the repository that could not load (failing: NOT_SERVING). stranded: those
        placed on workers none of which serves now (NOT_SERVING until one does)."""
        await self.servicer.set(self.capacity_name, _SERVING if full_capacity else _NOT_SERVING)  # type: ignore[arg-type]
        for gone in self._objects - objects:
            await self.servicer.set(gone, _UNKNOWN)  # type: ignore[arg-type]
            self._gone[gone] = None
        for back in objects & self._gone.keys():
            del self._gone[back]
        while len(self._gone) > _REMEMBERED_GONE:
            forgotten, _ = self._gone.popitem(last=False)
            # grpc_health has no way to remove a name: its table is dropped from directly. A
            # watcher of it still sees SERVICE_UNKNOWN, Watch's answer for a name not in it.
            self.servicer._server_status.pop(forgotten, None)
        self._objects = set(objects)
        status = _SERVING if serving else _NOT_SERVING
        for name in self._server_names:
            await self.servicer.set(name, status)  # type: ignore[arg-type]
        for name in sorted(objects):
            await self.servicer.set(name, _NOT_SERVING if name in stranded else status)  # type: ignore[arg-type]
        for name in sorted(failing):
            await self.servicer.set(name, _NOT_SERVING)  # type: ignore[arg-type]

    async def not_serving(self) -> None:
        for name in (*self._server_names, self.capacity_name):
            await self.servicer.set(name, _NOT_SERVING)  # type: ignore[arg-type]

    async def shutdown(self) -> None:
        """NOT_SERVING for every name, for good: later updates are ignored."""
        await self.servicer.enter_graceful_shutdown()
