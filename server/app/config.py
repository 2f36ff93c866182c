"""The daemon's settings: defaults < config file < DEPLOYD_SECTION_KEY environment < flags.

Every key lives in a section; `config.yaml` at the repository root lists them all
with their defaults, and README.md ("Configuration") says what each one does. Unknown
keys and bad values stop the daemon at start with a message naming the key and value.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from server.errors import InvalidArgument
from server.models.devices import bind_slots, parse_gpus, resolve_device
from server.models.entry import EntryError, ModelEntry, parse_entries

ENV_PREFIX = "DEPLOYD_"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerSection:
    address: str = "127.0.0.1:50051"
    max_message_bytes: int = 256 * 1024 * 1024
    # Seconds that calls in flight get to finish on shutdown.
    shutdown_grace_seconds: float = 10.0
    event_loop: str = "auto"  # auto (uvloop if installed), asyncio or uvloop
    # Keep large buffers in glibc's heap instead of fresh mmaps (server.malloc).
    tune_malloc: bool = True
    log_format: str = "plain"  # plain or json (one object per line)
    log_calls: bool = True  # one log line per call: request id, object, method, status, duration
    # Close each client connection after this long (gRPC GOAWAY; calls in flight get
    # shutdown_grace_seconds to finish), so that clients balancing over a DNS name resolve it
    # again and find replicas started since (a scaled-up Deployment). 0: connections live on.
    max_connection_age_seconds: float = 0.0
    # The host clients are told to dial for the workers' data ports (deployd.v1 Endpoints): a
    # container's or pod's address when the ports are bound to 0.0.0.0; empty: pool.data_host.
    advertise_host: str = ""
    # host:port for KServe v2 over HTTP/REST (port 0: any free port); empty: no HTTP.
    http_address: str = ""
    # A larger HTTP request body is refused (413) before it is read whole.
    http_max_body_bytes: int = 256 * 1024 * 1024
    # A larger JSON part of an HTTP request (the whole body, or what Inference-Header-Content-
    # Length names) is refused (413): parsed JSON takes about 10x its size in memory, and large
    # tensors travel better as binary data.
    http_max_json_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class PoolSection:
    workers: int = 0  # 0: one per CPU core
    start_timeout_seconds: float = 60.0
    stop_timeout_seconds: float = 5.0
    # Calls that may wait for a free worker; past this they fail at once (RESOURCE_EXHAUSTED).
    max_queued_calls: int = 1000
    # A call whose caller gave up (deadline, cancel) keeps its worker this long; then the
    # worker is taken to be stuck, killed and replaced.
    abandoned_call_grace_seconds: float = 5.0
    # A call still running after this long kills its worker (a hung model whose caller set
    # no deadline); 0: no limit.
    max_call_seconds: float = 0.0
    # A session (acquire_one) with no call for this long ends and its objects are released; 0: never.
    session_idle_seconds: float = 300.0
    # Workers serve calls themselves, each on a port of its own (README: "Two paths"): P gives
    # slot i the port P + i, 0 any free port (kept by the slot's replacements), -1 none (every
    # call through the daemon). On by default: the daemon's one event loop caps a host's calls/s.
    data_ports: int = 0
    # The host the data ports listen on; empty: server.address's host.
    data_host: str = ""
    # The GPUs the pool uses, each "N" (one worker bound to GPU N) or "N=W" (W workers): those
    # workers take the first slots, in order, each seeing only its GPU (CUDA_VISIBLE_DEVICES);
    # the rest of pool.workers run on the CPU. Empty: no GPUs. With pool.workers 0: just the GPUs' workers.
    gpus: tuple[str, ...] = ()
    # A keeper process per GPU holds each model's weights on it once, shared with that GPU's
    # workers (CUDA IPC); false: each worker moves a copy of its own to the GPU.
    share_gpu_weights: bool = True


@dataclass(frozen=True)
class WorkerSection:
    num_threads: int = 1  # torch intra-op threads per worker
    extra_sys_paths: tuple[str, ...] = ()  # appended to sys.path in every worker (externs)
    # Tensors at least this large travel through shared memory; smaller ones inline.
    shm_threshold_bytes: int = 65536
    # Anonymous resident memory (RssAnon) at which a worker is killed and replaced; 0: no
    # limit. A fresh worker starts at about 150 MB (torch, inherited from the fork server).
    memory_limit_bytes: int = 0
    # setrlimit in each worker, soft and hard, before any model code; 0: leave as inherited.
    max_open_files: int = 0  # RLIMIT_NOFILE
    max_address_space_bytes: int = 0  # RLIMIT_AS (virtual memory, shared mappings included)
    # Run workers as this user (name or uid) when the daemon starts as root; empty: the daemon's user.
    user: str = ""


@dataclass(frozen=True)
class PackagesSection:
    directory: str = "packages"  # server-side paths in LoadPackage must lie inside it
    max_bytes: int = 16 * 1024 * 1024 * 1024
    # Where the daemon keeps its copies of loaded packages; empty: a fresh temporary directory.
    store_directory: str = ""


@dataclass(frozen=True)
class LimitsSection:
    """What one request may ask of the daemon; past a limit the request fails with a status naming it."""

    max_value_depth: int = 32  # nesting of lists, tuples and dicts in one value; at most 32
    max_tensor_rank: int = 32
    max_tensor_elements: int = 1 << 31
    max_container_items: int = 1 << 20  # items in one list, tuple or dict
    # A package's entries inflated (sum of their sizes) and that sum over the archive's size.
    max_package_unpacked_bytes: int = 32 * 1024 * 1024 * 1024
    max_package_compression_ratio: float = 100.0
    max_packages: int = 1000  # loaded at once; 0: no limit
    max_objects: int = 10000
    max_sessions: int = 1000  # sessions open at once; 0: no limit
    max_session_objects: int = 10000  # objects one session holds; 0: no limit


@dataclass(frozen=True)
class MetricsSection:
    address: str = ""  # host:port for Prometheus /metrics; empty: off


@dataclass(frozen=True)
class AuthSection:
    # Bearer tokens. admin: everything; invoke: call objects and read (Invoke, HasAttr,
    # LoadText, LoadBinary, Status). No tokens at all: no authentication.
    admin_tokens: tuple[str, ...] = ()
    invoke_tokens: tuple[str, ...] = ()
    # Binding an address other than loopback without tokens refuses to start unless this is true.
    allow_unauthenticated_remote: bool = False


@dataclass(frozen=True)
class TlsSection:
    cert_file: str = ""  # PEM certificate chain; with key_file, the daemon serves TLS only
    key_file: str = ""
    client_ca_file: str = ""  # set: mutual TLS, clients must present a certificate signed by it


@dataclass(frozen=True)
class TracingSection:
    """OpenTelemetry spans of the calls to models, sent over OTLP/gRPC (README: "Tracing")."""

    endpoint: str = ""  # the collector's host:port (OTLP over gRPC); empty: tracing off
    sample_ratio: float = 1.0  # of the traces the daemon starts; a caller's sampled flag is followed
    service_name: str = "deployd"  # the spans' service.name
    insecure: bool = True  # plaintext to the collector; false: TLS, with the system's root certificates
    # How often finished spans are sent (in batches); a call's spans reach the collector within it.
    export_delay_ms: float = 5000.0


@dataclass(frozen=True)
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    pool: PoolSection = field(default_factory=PoolSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    packages: PackagesSection = field(default_factory=PackagesSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    auth: AuthSection = field(default_factory=AuthSection)
    tls: TlsSection = field(default_factory=TlsSection)
    tracing: TracingSection = field(default_factory=TracingSection)
    # Not sections: the model repository, loaded before the daemon serves (README: Models by name).
    models: tuple[ModelEntry, ...] = ()
    models_on_error: str = "stop"  # a model that cannot load: stop (exit 2) or continue without it

    @property
    def data_host(self) -> str:
        """Where the data ports listen: pool.data_host, else server.address's host."""
        return self.pool.data_host or split_address(self.server.address)[0]

    @property
    def worker_count(self) -> int:
        if not self.pool.workers and self.gpu_workers:
            return self.gpu_workers
        return self.pool.workers or os.cpu_count() or 1

    @property
    def gpu_workers(self) -> int:
        """The workers pool.gpus binds to GPUs (checked by load_config)."""
        return sum(workers for _, workers in parse_gpus(self.pool.gpus))

    @property
    def slot_gpus(self) -> tuple[int, ...]:
        """Each worker slot's GPU (-1: none); () when pool.gpus is empty."""
        return bind_slots(parse_gpus(self.pool.gpus), self.worker_count)


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config. overrides are flags, keyed "section.key"."""
    values: dict[str, dict[str, Any]] = {section.name: {} for section in _sections()}
    top: dict[str, Any] = {}
    environ = os.environ if environ is None else environ
    if path is not None:
        data = _read_file(Path(path))
        top = {key: data.pop(key) for key in _TOP_LEVEL if key in data}
        _merge(values, data, f"{path}")
    _merge(values, _from_environment(environ), "environment")
    if "DEPLOYD_MODELS_ON_ERROR" in environ:
        top["models_on_error"] = environ["DEPLOYD_MODELS_ON_ERROR"]
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        values[section][key] = value
    gpus = values["pool"].get("gpus")
    if isinstance(gpus, list):  # YAML gives plain GPU numbers as ints
        values["pool"]["gpus"] = [str(item) if type(item) is int else item for item in gpus]
    sections: dict[str, Any] = {}
    for section_field in _sections():
        section_type = _section_type(section_field.name)
        known = {item.name: item for item in dataclasses.fields(section_type)}
        typed = {
            key: _coerce(f"{section_field.name}.{key}", known[key], value)
            for key, value in values[section_field.name].items()
        }
        sections[section_field.name] = section_type(**typed)
    on_error = top.get("models_on_error", "stop")
    if on_error not in ("stop", "continue"):
        raise ConfigError(f"bad value for models_on_error: {on_error!r} (stop or continue)")
    try:
        models = parse_entries(top.get("models") or [])
    except EntryError as error:
        raise ConfigError(str(error)) from None
    config = Config(**sections, models=models, models_on_error=on_error)
    _validate(config)
    return config


# Top-level keys that are not sections.
_TOP_LEVEL = ("models", "models_on_error")


def _sections() -> list[dataclasses.Field[Any]]:
    return [item for item in dataclasses.fields(Config) if item.name not in _TOP_LEVEL]


def _section_type(name: str) -> Any:
    return {section.name: section.default_factory for section in _sections()}[name]  # type: ignore[misc]


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def _merge(values: dict[str, dict[str, Any]], source: Mapping[str, Any], origin: str) -> None:
    for section, keys in source.items():
        if section not in values:
            raise ConfigError(f"{origin}: unknown config section {section!r} (known: {', '.join(values)})")
        if not isinstance(keys, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping, got {keys!r}")
        known = {item.name for item in dataclasses.fields(_section_type(section))}
        for key, value in keys.items():
            if key not in known:
                raise ConfigError(f"{origin}: unknown key {section}.{key} (known: {', '.join(sorted(known))})")
            values[section][key] = value


def _from_environment(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for section_field in _sections():
        for item in dataclasses.fields(_section_type(section_field.name)):
            name = f"{ENV_PREFIX}{section_field.name}_{item.name}".upper()
            if name in environ:
                value: Any = environ[name]
                if str(item.type).startswith("tuple"):  # a list, os.pathsep-separated like PATH
                    value = [part for part in value.split(os.pathsep) if part]
                found.setdefault(section_field.name, {})[item.name] = value
    return found


def _coerce(key: str, item: dataclasses.Field[Any], value: Any) -> Any:
    """Convert a value from YAML, the environment or a flag to the key's type."""
    kind = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", str(item.type))
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str":
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if kind.startswith("tuple"):
            if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
                raise ValueError
            return tuple(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad value for {key}: {value!r} is not a valid {kind}") from None
    raise AssertionError(f"no coercion for {kind}")


def _validate(config: Config) -> None:
    try:
        parse_gpus(config.pool.gpus)  # first: the pool's size depends on it
    except ValueError as error:
        raise ConfigError(f"bad value for pool.gpus: {error}") from None
    if config.pool.workers and config.pool.workers < config.gpu_workers:
        raise ConfigError(
            f"bad value for pool.workers: {config.pool.workers} is fewer than the {config.gpu_workers}"
            f" workers pool.gpus binds to GPUs ({', '.join(config.pool.gpus)})"
        )
    checks = [
        ("server.address", config.server.address, _is_address(config.server.address)),
        ("server.max_message_bytes", config.server.max_message_bytes, config.server.max_message_bytes > 0),
        (
            "server.shutdown_grace_seconds",
            config.server.shutdown_grace_seconds,
            config.server.shutdown_grace_seconds >= 0,
        ),
        (
            "server.max_connection_age_seconds",
            config.server.max_connection_age_seconds,
            config.server.max_connection_age_seconds >= 0,
        ),
        ("server.event_loop", config.server.event_loop, config.server.event_loop in ("auto", "asyncio", "uvloop")),
        ("pool.workers", config.pool.workers, config.pool.workers >= 0),
        ("pool.start_timeout_seconds", config.pool.start_timeout_seconds, config.pool.start_timeout_seconds > 0),
        ("pool.stop_timeout_seconds", config.pool.stop_timeout_seconds, config.pool.stop_timeout_seconds > 0),
        ("pool.max_queued_calls", config.pool.max_queued_calls, config.pool.max_queued_calls >= 0),
        (
            "pool.abandoned_call_grace_seconds",
            config.pool.abandoned_call_grace_seconds,
            config.pool.abandoned_call_grace_seconds > 0,
        ),
        ("pool.max_call_seconds", config.pool.max_call_seconds, config.pool.max_call_seconds >= 0),
        ("pool.session_idle_seconds", config.pool.session_idle_seconds, config.pool.session_idle_seconds >= 0),
        (
            "pool.data_ports",
            config.pool.data_ports,
            config.pool.data_ports in (-1, 0) or 1 <= config.pool.data_ports <= 65536 - config.worker_count,
        ),
        ("worker.memory_limit_bytes", config.worker.memory_limit_bytes, config.worker.memory_limit_bytes >= 0),
        ("worker.num_threads", config.worker.num_threads, config.worker.num_threads >= 1),
        ("worker.shm_threshold_bytes", config.worker.shm_threshold_bytes, config.worker.shm_threshold_bytes >= 1),
        ("packages.max_bytes", config.packages.max_bytes, config.packages.max_bytes >= 0),
        (  # 0, or room for the worker's own files (stdio, its channel, the package archives)
            "worker.max_open_files",
            config.worker.max_open_files,
            config.worker.max_open_files == 0 or config.worker.max_open_files >= _MIN_OPEN_FILES,
        ),
        (
            "worker.max_address_space_bytes",
            config.worker.max_address_space_bytes,
            config.worker.max_address_space_bytes >= 0,
        ),
        ("metrics.address", config.metrics.address, not config.metrics.address or _is_address(config.metrics.address)),
        (
            "server.http_address",
            config.server.http_address,
            not config.server.http_address or _is_address(config.server.http_address),
        ),
        ("server.http_max_body_bytes", config.server.http_max_body_bytes, config.server.http_max_body_bytes >= 1),
        ("server.http_max_json_bytes", config.server.http_max_json_bytes, config.server.http_max_json_bytes >= 1),
        ("tracing.sample_ratio", config.tracing.sample_ratio, 0.0 <= config.tracing.sample_ratio <= 1.0),
        ("tracing.export_delay_ms", config.tracing.export_delay_ms, config.tracing.export_delay_ms > 0),
        (
            "tracing.endpoint",
            config.tracing.endpoint,
            not config.tracing.endpoint or _is_address(config.tracing.endpoint.split("://")[-1]),
        ),
    ]
    checks += [
        ("server.log_format", config.server.log_format, config.server.log_format in ("plain", "json")),
        *(
            ("auth tokens", "(hidden)", bool(token) and not any(c.isspace() for c in token))
            for token in config.auth.admin_tokens + config.auth.invoke_tokens
        ),
        ("tls.key_file", config.tls.key_file, bool(config.tls.key_file) == bool(config.tls.cert_file)),
        ("tls.client_ca_file", config.tls.client_ca_file, not config.tls.client_ca_file or bool(config.tls.cert_file)),
    ]
    checks += [
        (f"limits.{key}", getattr(config.limits, key), getattr(config.limits, key) >= minimum)
        for key, minimum in _LIMIT_MINIMUMS.items()
    ]
    # Workers refuse deeper values themselves (server.worker.values), so the daemon cannot allow more.
    depth = config.limits.max_value_depth
    checks.append(("limits.max_value_depth", depth, 1 <= depth <= 32))
    for key, value, ok in checks:
        if not ok:
            raise ConfigError(f"bad value for {key}: {value!r}")
    for key in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(config.tls, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"bad value for tls.{key}: {path!r} is not a readable file")
    for entry in config.models:
        try:
            entry.workers.checked(config.worker_count)
        except InvalidArgument as error:
            raise ConfigError(f"model {entry.name!r} workers: {error}") from None
        try:
            resolve_device(entry.device, config.slot_gpus)
        except InvalidArgument as error:
            raise ConfigError(f"model {entry.name!r}: {error}") from None
    if config.worker.user:
        worker_user(config.worker.user)  # refuses an unknown user, or one the daemon cannot become
    host = split_address(config.server.address)[0]
    has_tokens = bool(config.auth.admin_tokens or config.auth.invoke_tokens)
    remote_ok = config.auth.allow_unauthenticated_remote
    if not _is_loopback(host) and not has_tokens and not remote_ok:
        raise ConfigError(
            f"server.address {config.server.address!r} is reachable from other machines but no auth tokens are"
            " set: anyone could load code into the workers. Set auth.admin_tokens (and auth.invoke_tokens),"
            " or auth.allow_unauthenticated_remote: true if something else guards the port"
        )
    if config.server.http_address:
        http_host = split_address(config.server.http_address)[0]
        if not _is_loopback(http_host) and not has_tokens and not remote_ok:
            raise ConfigError(
                f"server.http_address {config.server.http_address!r} is reachable from other machines but no auth"
                " tokens are set: anyone could load models and call them. Set auth.admin_tokens (and"
                " auth.invoke_tokens), or auth.allow_unauthenticated_remote: true if something else guards the port"
            )
    data_host = config.data_host
    if config.pool.data_ports >= 0 and not _is_loopback(data_host) and not has_tokens and not remote_ok:
        raise ConfigError(
            f"pool.data_host {data_host!r} (the workers' data ports) is reachable from other machines but no auth"
            " tokens are set: anyone could call the models. Set auth.invoke_tokens (and auth.admin_tokens),"
            " or auth.allow_unauthenticated_remote: true if something else guards the ports"
        )


_MIN_OPEN_FILES = 32
# The smallest value each limits.KEY accepts (0 where 0 means no limit).
_LIMIT_MINIMUMS: dict[str, float] = {
    "max_tensor_rank": 1,
    "max_tensor_elements": 1,
    "max_container_items": 1,
    "max_package_unpacked_bytes": 0,
    "max_package_compression_ratio": 0,
    "max_packages": 0,
    "max_objects": 0,
    "max_sessions": 0,
    "max_session_objects": 0,
}


def worker_user(user: str) -> tuple[int, int]:
    """worker.user as (uid, gid): a user name, or a numeric uid, from the password database."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"bad value for worker.user: {user!r} is not a user on this host") from None
    if os.geteuid() not in (0, entry.pw_uid):
        raise ConfigError(
            f"bad value for worker.user: {user!r}: only a daemon started as root can run workers as another user"
        )
    return entry.pw_uid, entry.pw_gid


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_address(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 <= int(port) <= 65535


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
