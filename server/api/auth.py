"""Bearer-token access control for the Deployd service (auth.admin_tokens, auth.invoke_tokens).

    admin   everything, including what runs code in the workers (loads, module sources)
    invoke  calls and reads: Invoke, HasAttr, LoadText, LoadBinary, Status

No token or an unknown one: UNAUTHENTICATED; a known token whose role may not call the
method: PERMISSION_DENIED. Health and reflection stay open, for orchestrators' probes.
Tokens are compared in constant time (every configured token, every call) and never
logged; only the role is.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.api.metrics import Metrics

ADMIN = "admin"
INVOKE = "invoke"
# What an invoke token may call; anything else in the service needs admin.
INVOKE_METHODS = frozenset({"Invoke", "HasAttr", "LoadText", "LoadBinary", "Status"})
_STREAMING_REQUESTS = frozenset({"LoadPackage"})


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, service: str, admin_tokens: tuple[str, ...], invoke_tokens: tuple[str, ...], metrics: Metrics):
        self._prefix = f"/{service}/"
        self._tokens = [(token.encode(), ADMIN) for token in admin_tokens]
        self._tokens += [(token.encode(), INVOKE) for token in invoke_tokens]
        self._metrics = metrics

    def role_of(self, authorization: str) -> str | None:
        scheme, _, presented = authorization.partition(" ")
        candidate = presented.strip().encode() if scheme.lower() == "bearer" else b""
        role = None
        for token, token_role in self._tokens:  # no early exit: the time taken says nothing
            if hmac.compare_digest(candidate, token) and role is None:
                role = token_role
        return role

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        if not details.method.startswith(self._prefix):
            return await continuation(details)  # health, reflection
        method = details.method[len(self._prefix) :]
        authorization = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = str(value)
        role = self.role_of(authorization)
        if role is None:
            return self._refusal(method, grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")
        if role != ADMIN and method not in INVOKE_METHODS:
            return self._refusal(method, grpc.StatusCode.PERMISSION_DENIED, f"{method} needs an admin token")
        return await continuation(details)

    def _refusal(self, method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        metrics = self._metrics

        async def refuse(request: Any, context: Any) -> None:
            metrics.observe_call(method, "", code.name, 0.0)
            await context.abort(code, message)

        if method in _STREAMING_REQUESTS:
            return grpc.stream_unary_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)
