"""KServe v2 over HTTP/REST (the Open Inference Protocol's REST binding, with Triton's binary
tensor extension): curl, Kubernetes httpGet probes, gateways, tritonclient.http and KServe's
InferenceRESTClient.

    HTTP request ──> aiohttp (its parser, limits, TLS) ──> _endpoint: token, count, log, errors
        GET  /v2, /v2/health/{live,ready}                      server
        GET  /v2/models/{name}[/versions/{v}][/ready]          V2Calls.model_metadata / model_ready
        POST /v2/models/{name}[/versions/{v}]/infer            kserve_rest body <-> V2Calls.infer
        POST /v2/repository/index, .../models/{name}/{load,unload}   V2Repository (admin)

The operations are KServe v2's own (server.api.kserve_calls), the ones gRPC's ModelInfer runs,
so names, versions, batching, declared tensors, errors and messages are the same; a domain
error becomes an HTTP status and {"error": message} with the gRPC answer's message. Calls
count in the same series as gRPC's, labelled protocol="http", and are logged alike.

The server is aiohttp's, on the daemon's event loop (chosen by measurement, bench/http_servers.py:
README "Benchmarks"). Its parser bounds the request line and headers (max_line_size,
max_field_size, max_headers); the body is refused past server.http_max_body_bytes (413)
before it is read whole. Health stays open without a token, as gRPC's health service does,
for orchestrators' probes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from server import errors, tracing
from server.api.auth import ADMIN, BearerTokens
from server.api.calls import MAX_MESSAGE_BYTES, calls_log
from server.api.kserve_calls import EXTENSIONS, SERVER_NAME, V2Calls, V2Repository, server_version
from server.api.kserve_rest import HEADER_LENGTH, encode_infer_response, parse_header_length, parse_infer_request
from server.api.metrics import HTTP, Metrics
from server.api.model_failures import (
    MAX_REQUEST_ID,
    REQUEST_ID_KEY,
    log_whole_traceback,
    new_call_id,
    where_it_is,
)
from server.api.values import ValueLimits
from server.errors import DeploydError, InvalidArgument

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
MAX_TRACEBACK_BYTES = 16384  # of a model's traceback in an error body
KEEPALIVE_SECONDS = 75.0  # a connection's life without a request on it (aiohttp's keepalive_timeout)
BODY_SECONDS = 60.0  # for a request's body to arrive once its headers have

# Most specific first, as server.api.calls.STATUS_FOR_ERROR; each with its gRPC code's name,
# for the metrics' code label (one vocabulary for both protocols).
STATUS_FOR_ERROR: list[tuple[type[DeploydError], int, str]] = [
    (errors.NotFound, 404, "NOT_FOUND"),
    (errors.InvalidArgument, 400, "INVALID_ARGUMENT"),
    (errors.PathNotAllowed, 403, "PERMISSION_DENIED"),
    (errors.TooLarge, 413, "RESOURCE_EXHAUSTED"),
    # A full queue: the server is busy, not the caller wrong; Retry-After says when to try again.
    (errors.Overloaded, 503, "RESOURCE_EXHAUSTED"),
    (errors.FailedPrecondition, 409, "FAILED_PRECONDITION"),
    (errors.WorkerCrashed, 503, "UNAVAILABLE"),
    (errors.PoolClosed, 503, "UNAVAILABLE"),
    # The model stopped because its caller was gone (deployd_worker): nginx's 499, a 504 for a deadline.
    (errors.DeadlineExceeded, 504, "DEADLINE_EXCEEDED"),
    (errors.CallCancelled, 499, "CANCELLED"),
    (errors.ModelError, 500, "UNKNOWN"),
]
_CODE_FOR_STATUS = {200: "OK", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED"}

_UNLABELLED = frozenset({"NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED"})

Handler = Callable[[web.Request], Awaitable[web.Response]]


class HttpSettings:
    """What the HTTP endpoint needs beside the operations."""

    def __init__(
        self,
        tokens: BearerTokens,
        value_limits: ValueLimits,
        max_body_bytes: int,
        log_calls: bool = True,
        max_json_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.tokens = tokens
        self.value_limits = value_limits
        self.max_body_bytes = max_body_bytes
        self.log_calls = log_calls
        self.max_json_bytes = max_json_bytes


class KServeHttp:
    """The routes and their handlers, over V2Calls (and V2Repository, on the daemon)."""

    def __init__(
        self, calls: V2Calls, repository: V2Repository | None, metrics: Metrics, settings: HttpSettings
    ) -> None:
        self._calls = calls
        self._repository = repository
        self._metrics = metrics
        self._settings = settings

    def application(self) -> web.Application:
        # client_max_size: aiohttp stops reading a body past it (413) instead of holding it all.
        app = web.Application(client_max_size=self._settings.max_body_bytes, middlewares=[self._unrouted])
        endpoint = self._endpoint
        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        app.router.add_get("/v2", endpoint("ServerMetadata", self._server_metadata))
        app.router.add_get("/v2/health/live", endpoint("ServerLive", self._live, open_to_all=True))
        app.router.add_get("/v2/health/ready", endpoint("ServerReady", self._ready, open_to_all=True))
        for prefix in (model, version):
            app.router.add_get(prefix, endpoint("ModelMetadata", self._model_metadata))
            app.router.add_get(f"{prefix}/ready", endpoint("ModelReady", self._model_ready))
            app.router.add_post(f"{prefix}/infer", endpoint("ModelInfer", self._infer, per_model=True))
        if self._repository is not None:
            app.router.add_post("/v2/repository/index", endpoint("RepositoryIndex", self._index, admin=True))
            app.router.add_post(
                "/v2/repository/models/{name}/load", endpoint("RepositoryModelLoad", self._load, admin=True)
            )
            app.router.add_post(
                "/v2/repository/models/{name}/unload", endpoint("RepositoryModelUnload", self._unload, admin=True)
            )
        return app

    # ------------------------------------------------------------------ server

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)})

    async def _live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self._calls.is_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    # ------------------------------------------------------------------ models

    async def _model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model_and_version(request)
        metadata = self._calls.model_metadata(name, version)
        return _json(
            {
                "name": metadata.name,
                "versions": metadata.versions,
                "platform": metadata.platform,
                "inputs": [tensor._asdict() for tensor in metadata.inputs],
                "outputs": [tensor._asdict() for tensor in metadata.outputs],
            }
        )

    async def _model_ready(self, request: web.Request) -> web.Response:
        """200 when ready; 503 when not (an unknown model too: a probe asks before it loads)."""
        name, version = _model_and_version(request)
        ready = self._calls.model_ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def _infer(self, request: web.Request) -> web.Response:
        name, version = self._calls.resolve(*_model_and_version(request))
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH))
        json_limit = self._settings.max_json_bytes
        length = request.content_length
        if header_length is None and length is not None and json_limit < length <= self._settings.max_body_bytes:
            raise errors.TooLarge(_json_over_cap(json_limit))  # before reading it (past both caps: the body's)
        body = await self._body(request)
        if (len(body) if header_length is None else header_length) > json_limit:
            raise errors.TooLarge(_json_over_cap(json_limit))
        parsed = parse_infer_request(body, header_length, self._settings.value_limits)
        answer = await self._calls.infer(name, version, parsed.inputs, [output.name for output in parsed.outputs])
        content, json_length = encode_infer_response(
            answer.model_name, answer.model_version, parsed.id, answer.outputs, parsed
        )
        if json_length is None:
            return web.Response(body=content, content_type=JSON_TYPE)
        return web.Response(body=content, content_type=BINARY_TYPE, headers={HEADER_LENGTH: str(json_length)})

    # ------------------------------------------------------------------ repository (admin)

    async def _index(self, request: web.Request) -> web.Response:
        assert self._repository is not None
        options = await self._json_object(request)
        ready = options.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument('"ready" must be true or false')
        return _json(
            [
                {
                    key: value
                    for key, value in entry._asdict().items()
                    if value or key in ("name", "state")  # as Triton: no empty version or reason
                }
                for entry in self._repository.index(ready)
            ]
        )

    async def _load(self, request: web.Request) -> web.Response:
        assert self._repository is not None
        options = await self._json_object(request)
        parameters = options.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidArgument('"parameters" must be a JSON object')
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            raise InvalidArgument('"parameters.config" must be a string (the entry, as JSON)')
        await self._repository.load(request.match_info["name"], config)
        return _json({})

    async def _unload(self, request: web.Request) -> web.Response:
        assert self._repository is not None
        await self._json_object(request)
        await self._repository.unload(request.match_info["name"])
        return _json({})

    # ------------------------------------------------------------------ what every call shares

    def _endpoint(
        self, method: str, handle: Handler, *, open_to_all: bool = False, admin: bool = False, per_model: bool = False
    ) -> Handler:
        """handle, with the token checked, the call counted and logged, and a domain error turned
        into its status and {"error": message}."""
        metrics = self._metrics
        settings = self._settings

        async def serve(request: web.Request, span: Any = None) -> web.Response:
            started = time.perf_counter()
            metrics.calls_in_flight.inc()
            target = request.match_info.get("name", "")[:200]
            code = "OK"
            call_id = ""  # the id a model's whole traceback is logged under
            response: web.Response | None = None
            try:
                refusal = None if open_to_all else self._refusal(request, method, admin)
                if refusal is not None:
                    code, response = refusal
                else:
                    response = await handle(request)
                    if response.status != 200:
                        code = "UNAVAILABLE"  # health or readiness answering "not ready"
            except DeploydError as error:
                status, code = _status_for(error)
                if error.remote_traceback:
                    call_id = request.headers.get(REQUEST_ID_KEY, "")[:MAX_REQUEST_ID] or new_call_id()
                    log_whole_traceback(call_id, method, target, error)
                response = _error_response(status, error, call_id)
            except RequestPayloadError as payload_error:  # a body not in its Content-Encoding
                code = "INVALID_ARGUMENT"
                response = _json({"error": f"the request body cannot be read: {payload_error}"}, 400)
                response.force_close()  # the rest of the stream cannot be trusted
            except web.HTTPException as http_error:  # from aiohttp: a body over the size cap
                status = http_error.status
                code = "RESOURCE_EXHAUSTED" if status == 413 else "INVALID_ARGUMENT"
                message = _over_cap(settings.max_body_bytes) if status == 413 else http_error.reason
                response = _json({"error": message}, status)
            except asyncio.CancelledError:
                code = "CANCELLED"  # the caller hung up (aiohttp cancels its handler)
                raise
            except Exception as error:  # a bug of ours: the caller gets 500, the log the traceback
                log.exception("internal error in %s (HTTP)", method)
                code = "INTERNAL"
                response = _json({"error": f"internal error: {type(error).__name__}: {error}"}, 500)
            finally:
                seconds = time.perf_counter() - started
                metrics.calls_in_flight.dec()
                # Not a name that is not loaded, nor one a refused caller made up: every such
                # name would be a series for good (gRPC's token check counts refusals alike).
                label = target if per_model and code not in _UNLABELLED else ""
                metrics.observe_call(method, label, code, seconds, HTTP)
                tracing.set_status(span, code, code == "OK")
                sent = response.content_length or 0 if response is not None else 0
                metrics.observe_http_bytes(request.content_length or 0, sent)
                request_id = call_id or request.headers.get(REQUEST_ID_KEY, "")[:MAX_REQUEST_ID] or new_call_id()
                if response is not None:
                    response.headers[REQUEST_ID_KEY] = request_id
                if settings.log_calls:
                    fields = {
                        "request_id": request_id,
                        "method": method,
                        "object": target,
                        "status": code,
                        "http_status": response.status if response is not None else 499,
                        "protocol": HTTP,
                        "duration_ms": round(seconds * 1000, 3),
                    }
                    calls_log.info("call", extra={"fields": fields})
            return response

        if not per_model:
            return serve

        async def traced(request: web.Request) -> web.Response:
            """A call to a model: a span, continuing the caller's traceparent header (server.tracing)."""
            if not tracing.enabled():
                return await serve(request)
            attributes = {
                "http.request.method": request.method,
                "url.path": request.path[:200],
                tracing.MODEL: request.match_info.get("name", "")[:200],
            }
            with tracing.edge(f"HTTP {method}", lambda: request.headers, attributes) as span:
                return await serve(request, span)

        return traced

    def _refusal(self, request: web.Request, method: str, admin: bool) -> tuple[str, web.Response] | None:
        tokens = self._settings.tokens
        if not tokens:
            return None
        role = tokens.role_of(request.headers.get("Authorization", ""))
        if role is None:
            response = _json({"error": "a valid bearer token is required"}, 401)
            response.headers["WWW-Authenticate"] = "Bearer"
            return "UNAUTHENTICATED", response
        if admin and role != ADMIN:
            return "PERMISSION_DENIED", _json({"error": f"{method} needs an admin token"}, 403)
        return None

    async def _body(self, request: web.Request) -> bytes:
        """The whole body; past the cap, 413 before reading it (by its Content-Length) or as
        soon as it passes the cap (a chunked body)."""
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise errors.TooLarge(_over_cap(limit))
        try:
            async with asyncio.timeout(BODY_SECONDS):  # a body dripped in does not hold a call open
                return await request.read()
        except TimeoutError:
            raise InvalidArgument(f"the request body did not arrive within {BODY_SECONDS:.0f} s") from None

    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        """An optional JSON object body (the repository's requests): {} when empty."""
        body = await self._body(request)
        if not body.strip():
            return {}
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise InvalidArgument(f"the body is not JSON: {error}") from None
        if not isinstance(value, dict):
            raise InvalidArgument("the body must be a JSON object")
        return value

    @web.middleware
    async def _unrouted(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """aiohttp's own refusals (no such path, a method the path does not take) as JSON errors,
        counted; our handlers answer for themselves."""
        try:
            return await handler(request)
        except web.HTTPException as refusal:
            if refusal.status < 400:
                raise
            message = {404: f"no such endpoint: {request.path[:200]}", 405: f"{request.method} is not allowed here"}
            self._metrics.observe_call(
                "unrouted", "", _CODE_FOR_STATUS.get(refusal.status, "INVALID_ARGUMENT"), 0.0, HTTP
            )
            response = _json({"error": message.get(refusal.status, refusal.reason)}, refusal.status)
            if refusal.status == 405:
                response.headers["Allow"] = refusal.headers.get("Allow", "")
            return response


class HttpServer:
    """aiohttp's server for an application on the running loop: bind(), start(), stop(grace)."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self._runner = web.AppRunner(
            app,
            access_log=None,  # every call has its line from _endpoint
            handle_signals=False,  # the daemon's signals are its own
            handler_cancellation=True,  # a caller that hangs up cancels its call, as on gRPC
            # Counted from a connection's start, not reset by each byte: a client that drips its
            # headers (slowloris) or idles is closed after this long.
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        # aiohttp logs every request it cannot parse with a traceback at ERROR: a stream of
        # garbage would flood the daemon's log. The caller gets its 400 all the same.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        self._ssl_context = ssl_context
        self._socket: socket.socket | None = None

    def bind(self, host: str, port: int) -> int:
        """Take host:port (0: any free port) now, before the daemon starts its workers, so that a
        taken port fails at once; returns the bound port. Calls are taken from start()."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._socket = socket.create_server((host, port), family=family, backlog=128)
        except OSError as error:
            raise OSError(f"cannot bind {host}:{port} for HTTP: {error.strerror or error}") from None
        bound: int = self._socket.getsockname()[1]
        return bound

    async def start(self) -> None:
        assert self._socket is not None, "bind() first"
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket, ssl_context=self._ssl_context).start()

    async def stop(self, grace: float) -> None:
        """Stop taking calls; those in flight get grace seconds to finish."""
        self._runner._shutdown_timeout = grace  # aiohttp reads it at cleanup
        await self._runner.cleanup()
        if self._socket is not None:
            self._socket.close()


def ssl_context(cert_file: str, key_file: str, client_ca_file: str) -> ssl.SSLContext:
    """The gRPC port's certificate and key; with client_ca_file, clients must present a
    certificate it signed (mutual TLS), as on gRPC."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _model_and_version(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _status_for(error: DeploydError) -> tuple[int, str]:
    for error_type, status, code in STATUS_FOR_ERROR:
        if isinstance(error, error_type):
            return status, code
    return 500, "INTERNAL"


def _error_response(status: int, error: DeploydError, call_id: str = "") -> web.Response:
    """{"error": message} with the model's type and traceback when it raised; call_id: the id
    its whole traceback is logged under, named in the message."""
    message = str(error)
    note = f" ({where_it_is(call_id)})" if call_id else ""
    if len(message.encode()) > MAX_MESSAGE_BYTES - len(note):
        message = message.encode()[: MAX_MESSAGE_BYTES - 40 - len(note)].decode(errors="ignore") + "... (cut)"
    body: dict[str, Any] = {"error": message + note}
    if error.remote_type:
        body["type"] = error.remote_type
    if error.remote_traceback:
        traceback = error.remote_traceback
        if len(traceback) > MAX_TRACEBACK_BYTES:
            traceback = (
                f"... ({len(traceback)} characters of traceback, cut; {where_it_is(call_id)})\n"
                + (traceback[-MAX_TRACEBACK_BYTES:])
            )
        body["traceback"] = traceback
    if call_id:
        body["call_id"] = call_id
    response = _json(body, status)
    if isinstance(error, errors.WorkerCrashed) and error.caused_by_call:
        response.headers["Deployd-Call-Killed-Worker"] = "true"  # do not send it again
    elif status == 503:
        response.headers["Retry-After"] = "1"
    return response


def _over_cap(limit: int) -> str:
    return f"the request body is over {limit} bytes (server.http_max_body_bytes)"


def _json_over_cap(limit: int) -> str:
    return (
        f"the request's JSON is over {limit} bytes (server.http_max_json_bytes): send large tensors"
        " as binary data (Inference-Header-Content-Length)"
    )


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(value).encode(), status=status, content_type=JSON_TYPE)
