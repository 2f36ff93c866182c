"""Bearer-token access control for the served protocols (auth.admin_tokens, auth.invoke_tokens).

    admin   everything, including what runs code in the workers (loads, module sources, sessions)
    invoke  calls and reads: each protocol names its own (deployd.v1: Invoke, HasAttr,
            LoadText, LoadBinary, Status; KServe v2: all but loading and unloading models)

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
_STREAMING_REQUESTS = frozenset({"LoadPackage"})
_STREAMING_RESPONSES = frozenset({"OpenSession"})


class BearerTokens:
    """The configured tokens and their roles, for any protocol's Authorization header."""

    def __init__(self, admin_tokens: tuple[str, ...], invoke_tokens: tuple[str, ...]) -> None:
        self._tokens = [(token.encode(), ADMIN) for token in admin_tokens]
        self._tokens += [(token.encode(), INVOKE) for token in invoke_tokens]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def role_of(self, authorization: str) -> str | None:
        """ADMIN or INVOKE for "Bearer <a configured token>", else None."""
        scheme, _, presented = authorization.partition(" ")
        # surrogateescape: an HTTP header's bytes that are not UTF-8 (aiohttp keeps them so) are
        # simply not a token.
        candidate = presented.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""
        role = None
        for token, token_role in self._tokens:  # no early exit: the time taken says nothing
            if hmac.compare_digest(candidate, token) and role is None:
                role = token_role
        return role


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        invoke_methods: dict[str, frozenset[str]],
        admin_tokens: tuple[str, ...],
        invoke_tokens: tuple[str, ...],
        metrics: Metrics,
    ):
        """invoke_methods: service name -> what an invoke token may call; the rest needs admin."""
        self._invoke_methods = invoke_methods
        self._tokens = BearerTokens(admin_tokens, invoke_tokens)
        self._metrics = metrics

    def role_of(self, authorization: str) -> str | None:
        return self._tokens.role_of(authorization)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        service, _, method = details.method.lstrip("/").partition("/")
        invoke_methods = self._invoke_methods.get(service)
        if invoke_methods is None:
            return await continuation(details)  # health, reflection
        authorization = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = str(value)
        role = self.role_of(authorization)
        if role is None:
            return self._refusal(method, grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")
        if role != ADMIN and method not in invoke_methods:
            return self._refusal(method, grpc.StatusCode.PERMISSION_DENIED, f"{method} needs an admin token")
        return await continuation(details)

    def _refusal(self, method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        metrics = self._metrics

        async def refuse(request: Any, context: Any) -> None:
            metrics.observe_call(method, "", code.name, 0.0)
            await context.abort(code, message)

        if method in _STREAMING_REQUESTS:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if method in _STREAMING_RESPONSES:

            async def refuse_stream(request: Any, context: Any) -> Any:
                await refuse(request, context)
                yield  # never reached: abort raises

            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)
