"""Who is calling: the verified client certificate, checked on every RPC.

Under mutual TLS the caller's identity is the role and name in its certificate (URI
SAN `urn:fedcollab:<role>:<name>`), never a field it fills in itself. The interceptor
resolves it before any handler runs, refuses revoked certificates (the revocation
list is re-read when its file changes, so revoking needs no restart) and callers of
the wrong role, and hands the handler a context that carries the identity.

With plaintext (an explicit --insecure rehearsal) there is no identity: handlers fall
back to the names in requests, and the loud warning at start says so.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509

from fedcollab.errors import Rejected
from fedcollab.wire import to_grpc_status

log = logging.getLogger("fedcollab.coordinator")

# Which role may call which service.
SERVICE_ROLES = {
    "fedcollab.v1.CoordinatorService": "institution",
    "fedcollab.v1.OperatorService": "operator",
}


@dataclass(frozen=True)
class Caller:
    role: str
    name: str
    serial: int


class IdentifiedContext:
    """The handler's context, plus the verified caller (None over plaintext)."""

    def __init__(self, context: grpc.ServicerContext, caller: Caller | None) -> None:
        self._context = context
        self.caller = caller

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def caller_of(context: Any) -> Caller | None:
    return getattr(context, "caller", None)


class Authenticator:
    """Resolves a context's client certificate to a Caller. `revoked` answers whether a
    serial is revoked (fedcollab.pki.RevocationList.is_revoked)."""

    def __init__(self, *, revoked: Callable[[int], bool] | None = None, cache_size: int = 4096) -> None:
        self._revoked = revoked
        self._cache: dict[bytes, Caller] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def identify(self, context: grpc.ServicerContext) -> Caller:
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            raise Rejected(code=grpc.StatusCode.UNAUTHENTICATED, reason="NO_CLIENT_CERTIFICATE",
                           message="this coordinator requires a client certificate from the federation's CA")
        pem = pems[0]
        with self._lock:
            caller = self._cache.get(pem)
        if caller is None:
            caller = _parse(pem)
            with self._lock:
                if len(self._cache) >= self._cache_size:
                    self._cache.clear()
                self._cache[pem] = caller
        if self._revoked is not None and self._revoked(caller.serial):
            raise Rejected(code=grpc.StatusCode.UNAUTHENTICATED, reason="CERTIFICATE_REVOKED",
                           message=f"the certificate of {caller.role} {caller.name!r} (serial {caller.serial:x}) "
                                   "has been revoked by the federation operator",
                           metadata={"serial": f"{caller.serial:x}"})
        return caller


def _parse(pem: bytes) -> Caller:
    from fedcollab.pki import PkiError, identity_from_certificate

    try:
        cert = x509.load_pem_x509_certificate(pem)
        identity = identity_from_certificate(cert)
    except (ValueError, PkiError) as e:
        raise Rejected(code=grpc.StatusCode.UNAUTHENTICATED, reason="CERTIFICATE_IDENTITY_INVALID",
                       message=f"the client certificate names no fedcollab identity: {e}") from None
    return Caller(role=identity.role, name=identity.name, serial=cert.serial_number)


class IdentityInterceptor(grpc.ServerInterceptor):
    """Runs before every handler: identify, check the role for the service, and pass
    the caller on. `authenticator` None means plaintext: no identity to check."""

    def __init__(self, *, authenticator: Authenticator | None, operator_token: str | None = None) -> None:
        """`operator_token`, over plaintext only: what operator calls must present
        (metadata "authorization: Bearer <token>") in place of a certificate."""
        self._auth = authenticator
        self._operator_token = operator_token
        # method -> (the server's handler, its guarded copy). Building the copy (closures,
        # functools.wraps, a new handler) on every call was measurable under load, and a
        # method's handler does not change once the server runs. Bounded: only registered
        # methods have a handler. Two first calls racing only build the same copy twice.
        self._guarded: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded

    def _guard(self, handler: Any, method: str) -> Any:
        """`handler` with the identity and role check before its behavior."""
        service = method.strip("/").split("/")[0]
        role = SERVICE_ROLES.get(service)
        auth = self._auth
        token = self._operator_token if role == "operator" else None

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(behavior)
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                caller = None
                if auth is not None:
                    try:
                        caller = auth.identify(context)
                        if role is not None and caller.role != role:
                            raise Rejected(
                                code=grpc.StatusCode.PERMISSION_DENIED,
                                reason="OPERATOR_ONLY" if role == "operator" else "INSTITUTION_ONLY",
                                message=f"{service} is for {role}s; this certificate is a {caller.role}'s "
                                        f"({caller.name!r})",
                            )
                    except Rejected as e:
                        log.warning("refused %s from %s: %s", method, context.peer(), e.reason)
                        context.abort_with_status(to_grpc_status(e))
                elif token is not None:
                    presented = dict(context.invocation_metadata()).get("authorization", "")
                    if not secrets.compare_digest(presented.encode(), f"Bearer {token}".encode()):
                        log.warning("refused %s from %s: no operator token", method, context.peer())
                        context.abort_with_status(to_grpc_status(Rejected(
                            code=grpc.StatusCode.UNAUTHENTICATED, reason="OPERATOR_CREDENTIAL_REQUIRED",
                            message="operator calls need an operator certificate (mutual TLS) or, over plaintext, "
                                    "the coordinator's operator token: pass --token-file "
                                    "<state_dir>/operator.token (the fedcollab CLI reads it with --config)")))
                    caller = Caller(role="operator", name="operator-token", serial=0)
                return behavior(request, IdentifiedContext(context, caller))

            return wrapped

        kinds = [
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ]
        for attr, make in kinds:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return make(guard(behavior), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


class RateLimiter:
    """A token bucket per key (the caller's identity, or its address over plaintext):
    `rate` calls per second on average, bursts of `burst`."""

    def __init__(self, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self._rate, self._burst, self._max_keys = rate, float(burst), max_keys
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            if len(self._buckets) >= self._max_keys and key not in self._buckets:
                self._buckets.clear()  # bounded memory under a flood of distinct keys
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            return True
