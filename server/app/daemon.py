"""The composition root: build the pool, the service and the gRPC server; run until a signal.

The pool is two objects joined by the supervisor's events (server.pool.events):

    Supervisor (spawns, prepares, replaces, stops workers) ──events──> Dispatcher (routes calls)
                                                                ├────> Sessions (end on worker death)
                                                                └────> the daemon (metrics, health)

Shutdown order (first SIGTERM or SIGINT): health NOT_SERVING -> open sessions end -> stop the gRPC and
HTTP servers with a grace period (calls in flight finish) -> stop the pool -> remove the package
store -> exit 0. A second signal skips the grace period.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import logs
from server.api import deployd_v1, kserve_v2, sessions_v1
from server.api.auth import BearerTokens, TokenAuth
from server.api.dataport import DataPortSettings
from server.api.deployd_v1 import EndpointsSnapshot
from server.api.health import Health
from server.api.kserve_calls import V2Calls, V2Repository
from server.api.kserve_http import HttpServer, HttpSettings, KServeHttp, ssl_context
from server.api.metrics import Metrics
from server.api.tls import server_credentials
from server.api.values import ValueLimits
from server.app import eventloop, worker_process
from server.app.config import Config, ConfigError, ServerSection, split_address, worker_user
from server.app.exit_codes import ExitCode
from server.app.tracing import start_tracing
from server.batching.batcher import BatchObserver
from server.errors import DeploydError, InvalidArgument, WorkerCrashed
from server.ipc.cancel_board import CancelBoard
from server.ipc.shm import remove_stale_segments, set_worker_group
from server.malloc import tune_malloc
from server.models.dataports import DataPorts
from server.models.devices import parse_gpus
from server.models.packages import PackageStore
from server.models.registry import Registry
from server.models.repository import ModelLoadFailed, ModelRepository, ReloadReport
from server.models.service import ModelService
from server.models.sessions import Sessions
from server.pool.dispatcher import Dispatcher
from server.pool.events import WorkerEvent, WorkerExited
from server.pool.gpustats import GpuStats
from server.pool.keepers import Keeper
from server.pool.supervisor import Supervisor
from server.pool.worker_handle import WorkerHandle, WorkerTarget
from server.worker.entry import WorkerSettings, run_worker

log = logging.getLogger("deployd")


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


SERVICE_NAME = deployd_v1.SERVICE_NAME


class Daemon:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        """reload_config: reads the config anew, for a reload of its `models:` (SIGHUP, Reload)."""
        self.config = config
        self._reload_config = reload_config
        self._reload_lock = asyncio.Lock()
        self.port = 0
        self._stop_requested = asyncio.Event()
        self._fast_stop = asyncio.Event()
        self._started = False
        self._background: set[asyncio.Future[None]] = set()
        self._health = Health(SERVICE_NAME)
        self._metrics = Metrics()
        store_directory = config.packages.store_directory
        self._store_directory = Path(store_directory or tempfile.mkdtemp(prefix="deployd-store-"))
        self._store_directory.mkdir(parents=True, exist_ok=True)
        self._owns_store_directory = not store_directory
        self._registry = Registry(config.slot_gpus)
        # GPU memory per worker, utilisation per GPU (NVML, never CUDA: server.pool.gpustats).
        self._gpu_stats = GpuStats() if config.pool.gpus else None
        # One keeper per GPU: the weights of its models, once for its workers (server.pool.keepers).
        self._keepers = (
            {gpu: Keeper(gpu, "cuda", config.worker.extra_sys_paths) for gpu, _ in parse_gpus(config.pool.gpus)}
            if config.pool.share_gpu_weights
            else {}
        )
        limits = config.limits
        uid, gid = worker_user(config.worker.user) if config.worker.user else (-1, -1)
        worker_group = gid if uid not in (-1, os.geteuid()) else None
        set_worker_group(worker_group)  # workers of another user map the daemon's segments through it
        value_limits = ValueLimits(
            limits.max_value_depth, limits.max_tensor_rank, limits.max_tensor_elements, limits.max_container_items
        )
        # With pool.data_ports, each worker serves calls itself too (server.app.worker_process).
        self._data_ports: DataPorts | None = None
        target: WorkerTarget = run_worker
        if config.pool.data_ports >= 0:
            self._data_ports = DataPorts(
                config.worker_count,
                config.pool.data_ports,
                config.data_host,
                config.server.advertise_host,
                config.pool.max_call_seconds,
                config.pool.abandoned_call_grace_seconds,
            )
            # Their call series join the daemon's on /metrics (server.api.metrics).
            metrics_directory = self._metrics.share_with_workers(worker_group) if config.metrics.address else ""
            target = functools.partial(
                worker_process.run_worker,
                data=_data_port_settings(config, self._data_ports, value_limits, metrics_directory),
            )
        # Where a worker learns that its call's caller gave up (deployd_worker.cancelled()).
        self._cancel_board = CancelBoard(config.worker_count)
        self._supervisor = Supervisor(
            target=target,
            size=config.worker_count,
            settings=WorkerSettings(
                config.worker.num_threads,
                config.worker.extra_sys_paths,
                config.worker.shm_threshold_bytes,
                config.worker.max_open_files,
                config.worker.max_address_space_bytes,
                uid,
                gid,
                slot_gpus=config.slot_gpus,
            ),
            start_timeout=config.pool.start_timeout_seconds,
            stop_timeout=config.pool.stop_timeout_seconds,
            prepare=self._prepare_worker,
            memory_limit=config.worker.memory_limit_bytes,
            on_call_timing=self._metrics.observe_worker_call,
            cancel_board=self._cancel_board,
            on_output_dropped=self._metrics.worker_output_dropped.inc,
            gpu_stats=self._gpu_stats,
        )
        self._dispatcher = Dispatcher(
            max_queued_calls=config.pool.max_queued_calls,
            abandoned_call_grace=config.pool.abandoned_call_grace_seconds,
            max_call_seconds=config.pool.max_call_seconds,
            on_queue_wait=self._metrics.queue_wait.observe,
            on_run=self._metrics.observe_run,
        )
        store = PackageStore(
            self._store_directory,
            Path(config.packages.directory),
            config.packages.max_bytes,
            limits.max_package_unpacked_bytes,
            limits.max_package_compression_ratio,
            worker_group,
        )
        self._service = ModelService(
            self._supervisor,
            self._dispatcher,
            store,
            self._registry,
            on_objects_changed=self._sync_health,
            replay_step_timeout=config.pool.start_timeout_seconds,
            max_packages=limits.max_packages,
            max_objects=limits.max_objects,
            batch_observer=BatchObserver(self._metrics.observe_batch, self._metrics.observe_batch_wait),
            on_warmup=self._metrics.warmup_duration.observe,
            routes_to_workers=self._data_ports is not None,
            signatures=self._declared_signatures,
            direct_calls=self._data_ports.row if self._data_ports is not None else None,
            slot_gpus=config.slot_gpus,
            keepers=self._keepers,
        )
        self._sessions = Sessions(
            self._dispatcher,
            self._service,
            config.worker_count,
            idle_seconds=config.pool.session_idle_seconds,
            max_sessions=limits.max_sessions,
            max_objects=limits.max_session_objects,
        )
        # In this order: calls stop going to a dead worker before its sessions end.
        self._supervisor.subscribe(self._dispatcher.on_worker_event)
        self._supervisor.subscribe(self._sessions.on_worker_event)
        if self._data_ports is not None:  # before the daemon's own: an exit is kept before it is told
            self._supervisor.subscribe(self._data_ports.on_worker_event)
        self._supervisor.subscribe(self._on_worker_event)
        self._metrics.watch(
            queue_depth=lambda: self._service.queued_calls,
            workers_busy=self._busy_workers,
            packages=lambda: len(self._registry.packages),
            objects=lambda: len(self._registry.objects),
            worker_memory=self._supervisor.memory,
            sessions=lambda: self._sessions.open_count,
            models=lambda: self._known_objects,
            gpu_usage=self._supervisor.gpu_usage,
        )
        self._known_objects: set[str] = set()
        message_limit = config.server.max_message_bytes
        interceptors = []
        if config.auth.admin_tokens or config.auth.invoke_tokens:
            interceptors.append(
                TokenAuth(
                    {
                        SERVICE_NAME: deployd_v1.INVOKE_METHODS,
                        sessions_v1.SERVICE_NAME: sessions_v1.INVOKE_METHODS,
                        kserve_v2.SERVICE_NAME: kserve_v2.INVOKE_METHODS,
                    },
                    config.auth.admin_tokens,
                    config.auth.invoke_tokens,
                    self._metrics,
                )
            )
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                # A second daemon on the same port must fail, not silently share it.
                ("grpc.so_reuseport", 0),
                *_connection_age_options(config.server),
            ],
        )
        self._repository = ModelRepository(self._service, Path(config.packages.directory))
        servicer = deployd_v1.DeploydServicer(
            self._service,
            self._metrics,
            config.server.log_calls,
            value_limits,
            repository=self._repository,
            reload=self.reload_models,
            sessions=self._sessions.snapshot,
            endpoints=self._endpoints if self._data_ports is not None else None,
        )
        deployd_v1.add_to_server(servicer, self._server, self._metrics)
        sessions_servicer = sessions_v1.SessionsServicer(
            self._sessions, self._metrics, config.server.log_calls, value_limits
        )
        sessions_v1.add_to_server(sessions_servicer, self._server, self._metrics)
        # KServe v2 beside it, on the same port, over the same service and repository.
        v2_servicer = kserve_v2.KServeV2Servicer(
            self._service, self._repository, self._metrics, self._is_ready, config.server.log_calls, value_limits
        )
        kserve_v2.add_to_server(v2_servicer, self._server, self._metrics)
        health_pb2_grpc.add_HealthServicer_to_server(self._health.servicer, self._server)
        self._http = _http_server(config, self._service, self._repository, self._metrics, self._is_ready, value_limits)
        self.http_port = 0
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                sessions_v1.SERVICE_NAME,
                kserve_v2.SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )

    def _is_ready(self) -> bool:
        """Ready for calls: serving (started, not stopping) with at least one worker that can serve."""
        return self._started and not self._stop_requested.is_set() and self._supervisor.serving_count > 0

    async def _prepare_worker(self, worker: WorkerHandle) -> None:
        # The supervisor is built before the service that replays into its workers; this closes the loop.
        await self._service.prepare_worker(worker)
        if self._data_ports is not None:
            await self._data_ports.open(worker)

    def _busy_workers(self) -> int:
        """Workers running a call, whichever path it came by (without the service's whole status:
        that reads every worker's memory from /proc)."""
        ports = self._data_ports
        return sum(
            1
            for slot, _, state in self._dispatcher.serving_workers()
            if state == "busy" or (ports is not None and ports.row(slot).in_flight > 0)
        )

    def _declared_signatures(self) -> dict[str, Any]:
        """name -> (inputs, outputs) its model entry declares, for the data ports' v2 answers."""
        return {
            entry.name: (
                [(spec.name, spec.datatype, list(spec.shape)) for spec in entry.inputs],
                [(spec.name, spec.datatype, list(spec.shape)) for spec in entry.outputs],
            )
            for entry in self._repository.entries
            if entry.inputs or entry.outputs
        }

    def _endpoints(self) -> EndpointsSnapshot:
        assert self._data_ports is not None
        serving = [(slot, pid) for slot, pid, _ in self._dispatcher.serving_workers()]
        models = {slot: self._service.direct_targets(slot) for slot, _ in serving}
        exits = list(self._data_ports.exits)
        return EndpointsSnapshot(self._service.generation, self._data_ports.endpoints(serving), models, exits)

    def _on_worker_event(self, event: WorkerEvent) -> None:
        if isinstance(event, WorkerExited):
            self._metrics.on_worker_exit(event.worker.pid)
            if event.stopped:
                return
            self._metrics.worker_restarts.labels(event.cause).inc()
        self._metrics.workers_serving.set(self._supervisor.serving_count)
        task = asyncio.ensure_future(self._sync_health())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # Clients of the data ports learn of it from the next answer's generation.
        task = asyncio.ensure_future(self._service.publish_routes())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sync_health(self) -> None:
        """Health follows the pool and what is loaded, objects by id and models by name; the
        metrics of what went go too."""
        names = self._service.served_names()
        objects = set(self._registry.objects) | names
        for gone in self._known_objects - objects:
            self._metrics.forget_object(gone)
        self._known_objects = objects
        # Before the whole pool is up, and once stopping, the server's health is set by run() alone.
        if self._started and not self._stop_requested.is_set():
            failing = set(self._repository.errors) - names
            serving = self._supervisor.serving_count > 0
            stranded = self._service.without_workers()
            await self._health.sync(serving, objects, self._supervisor.full_capacity, failing, stranded)

    async def reload_models(self) -> ReloadReport:
        """Re-read the config file and bring the served models in line with its `models:`."""
        if self._reload_config is None:
            raise InvalidArgument("the daemon was started without a config file: there is nothing to reload")
        async with self._reload_lock:
            try:
                config = self._reload_config()
            except ConfigError as error:
                raise InvalidArgument(f"the config file cannot be reloaded: {error}") from None
            report = await self._repository.reload(config.models)
        await self._sync_health()
        return report

    def _reload_in_background(self) -> None:
        async def reload() -> None:
            try:
                await self.reload_models()
            except DeploydError as error:
                log.error("reload (SIGHUP): %s", error)

        task = asyncio.ensure_future(reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def request_stop(self) -> None:
        if self._stop_requested.is_set():
            log.warning("second signal: stopping now")
            self._fast_stop.set()
        self._stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        await self._health.not_serving()
        try:
            if self.config.metrics.address:
                metrics_port = self._metrics.serve(*split_address(self.config.metrics.address))
                log.info("metrics on http://%s:%d/metrics", split_address(self.config.metrics.address)[0], metrics_port)
            remove_stale_segments()
            self.port = self._bind(self.config.server.address)
            if self._http is not None:
                try:
                    self.http_port = self._http.bind(*split_address(self.config.server.http_address))
                except OSError as error:
                    raise StartupError(str(error)) from None
            self._check_gpus()
            for keeper in self._keepers.values():
                await keeper.start(self._supervisor.context)
            log.info("starting %d workers", self._supervisor.size)
            await self._supervisor.start()
            if self._data_ports is not None:
                self._data_ports.start_watch(self._supervisor.workers)
            if self.config.models:
                log.info("loading %d models", len(self.config.models))
                await self._repository.load_all(self.config.models, self.config.models_on_error)
            self._sessions.start()
            await self._server.start()
            if self._http is not None:
                await self._http.start()
            self._started = True
            await self._sync_health()
            host = self.config.server.address.rpartition(":")[0]
            if self._http is not None:
                log.info("http on %s:%d", self.config.server.http_address.rpartition(":")[0], self.http_port)
            log.info("listening on %s:%d", host, self.port)
            await self._stop_requested.wait()
            await self._shutdown()
        finally:
            self._sessions.end_all("the daemon is stopping")
            await self._sessions.close()
            self._dispatcher.close()
            await self._supervisor.stop("the daemon is stopping")
            for keeper in self._keepers.values():  # after the workers: they map its weights
                await keeper.stop(self.config.pool.stop_timeout_seconds)
            if self._data_ports is not None:
                self._data_ports.unlink()
            self._cancel_board.unlink()
            self._service.close()
            self._metrics.close()
            if self._gpu_stats is not None:
                self._gpu_stats.close()
            if self._owns_store_directory:
                shutil.rmtree(self._store_directory, ignore_errors=True)
        log.info("stopped")
        return ExitCode.OK  # after a second signal too: it only skips the drain

    def _check_gpus(self) -> None:
        """pool.gpus against the GPUs NVML sees: one it does not is a config error. Without
        NVML (or a driver) the host cannot be asked: a load on cuda says so, in the worker."""
        if self._gpu_stats is None:
            return
        count = self._gpu_stats.device_count()
        gpus = [gpu for gpu, _ in parse_gpus(self.config.pool.gpus)]
        if count is None:
            log.warning("pool.gpus lists GPUs %s, but NVML cannot count this host's GPUs", gpus)
            return
        missing = [gpu for gpu in gpus if gpu >= count]
        if missing:
            raise ConfigError(
                f"bad value for pool.gpus: this host has no GPU {missing[0]} (NVML sees {count} GPUs: 0 to {count - 1})"
            )

    def _bind(self, address: str) -> int:
        """Bind before starting workers, so a taken port fails fast."""
        tls = self.config.tls
        try:
            if tls.cert_file:
                port: int = self._server.add_secure_port(
                    address, server_credentials(tls.cert_file, tls.key_file, tls.client_ca_file)
                )
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError as error:
            raise StartupError(f"cannot bind {address}: {error}") from None
        if port == 0:
            raise StartupError(f"cannot bind {address}")
        return port

    async def _shutdown(self) -> None:
        log.info("shutting down: draining calls for up to %.1fs", self.config.server.shutdown_grace_seconds)
        await self._health.shutdown()
        # Open sessions end now (their steps in flight finish): their streams would otherwise
        # hold the drain for its whole grace.
        self._sessions.end_all("the daemon is stopping")
        grace = self.config.server.shutdown_grace_seconds
        stopping = asyncio.ensure_future(self._server.stop(grace))
        # HTTP drains beside gRPC, with the same grace.
        http = asyncio.ensure_future(self._http.stop(grace)) if self._http is not None else None
        # The data ports drain beside it (a worker stuck in a call never reads the request: the
        # second signal or the grace's end cuts this short, and the workers are stopped next).
        ports: asyncio.Future[None] | None = None
        if self._data_ports is not None:
            ports = asyncio.ensure_future(self._data_ports.close(self._supervisor.workers(), grace))
        fast = asyncio.ensure_future(self._fast_stop.wait())
        drains = {stopping, *(future for future in (ports, http) if future is not None)}
        draining = asyncio.ensure_future(asyncio.wait(drains))
        await asyncio.wait({draining, fast}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            await self._server.stop(0)
        if http is not None and not http.done():
            http.cancel()  # the second signal: calls still running on HTTP are cut short
            await asyncio.gather(http, return_exceptions=True)
        if ports is not None and not ports.done():
            ports.cancel()
            await asyncio.gather(ports, return_exceptions=True)
        fast.cancel()
        await stopping


def _http_server(
    config: Config,
    service: ModelService,
    repository: ModelRepository,
    metrics: Metrics,
    is_ready: Callable[[], bool],
    value_limits: ValueLimits,
) -> HttpServer | None:
    """KServe v2 over HTTP (server.http_address), over the same operations as gRPC's; None: off."""
    if not config.server.http_address:
        return None
    v2_repository = V2Repository(service, repository)
    calls = V2Calls(service, v2_repository.declared, is_ready, value_limits)
    settings = HttpSettings(
        BearerTokens(config.auth.admin_tokens, config.auth.invoke_tokens),
        value_limits,
        config.server.http_max_body_bytes,
        config.server.log_calls,
        config.server.http_max_json_bytes,
    )
    tls = config.tls
    context = ssl_context(tls.cert_file, tls.key_file, tls.client_ca_file) if tls.cert_file else None
    return HttpServer(KServeHttp(calls, v2_repository, metrics, settings).application(), context)


def _data_port_settings(
    config: Config, ports: DataPorts, value_limits: ValueLimits, metrics_directory: str
) -> DataPortSettings:
    return DataPortSettings(
        host=config.data_host,
        board=ports.board.name,
        admin_tokens=config.auth.admin_tokens,
        invoke_tokens=config.auth.invoke_tokens,
        tls_cert_file=config.tls.cert_file,
        tls_key_file=config.tls.key_file,
        tls_client_ca_file=config.tls.client_ca_file,
        max_message_bytes=config.server.max_message_bytes,
        value_limits=value_limits,
        log_calls=config.server.log_calls,
        event_loop=config.server.event_loop,
        max_queued_calls=config.pool.max_queued_calls,
        log_format=config.server.log_format,
        log_level=logging.getLogger().getEffectiveLevel(),
        metrics_directory=metrics_directory,
        tracing=config.tracing if config.tracing.endpoint else None,
    )


def run_daemon(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    logs.use_format(config.server.log_format)
    # Workers inherit the environment, and model code can read it: tokens stay in the config alone.
    for name in ("DEPLOYD_AUTH_ADMIN_TOKENS", "DEPLOYD_AUTH_INVOKE_TOKENS"):
        os.environ.pop(name, None)
    if config.server.tune_malloc and not tune_malloc():
        log.warning("server.tune_malloc: not glibc, malloc left as it is")

    async def main() -> int:
        # Built inside the loop: grpc.aio binds its server to the running loop.
        stop_tracing = start_tracing(config.tracing)
        try:
            return await Daemon(config, reload_config).run()
        except (StartupError, WorkerCrashed) as error:
            log.error("cannot start: %s", error)
            return ExitCode.STARTUP_ERROR
        except (ModelLoadFailed, ConfigError) as error:
            log.error("cannot start: %s", error)
            return ExitCode.CONFIG_ERROR  # models_on_error: stop; a GPU the host lacks
        finally:
            if stop_tracing is not None:
                stop_tracing()

    return eventloop.run(main(), config.server.event_loop)


def _connection_age_options(server: ServerSection) -> list[tuple[str, int]]:
    """gRPC's connection age: each connection gets GOAWAY after the age (gRPC adds its own
    +-10% jitter, so clients do not all reconnect at once); calls in flight on it get the
    shutdown grace to finish. Off (no options) at 0."""
    if server.max_connection_age_seconds <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, round(server.max_connection_age_seconds * 1000))),
        ("grpc.max_connection_age_grace_ms", round(server.shutdown_grace_seconds * 1000)),
    ]
