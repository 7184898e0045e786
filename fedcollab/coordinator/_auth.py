"""Who is calling: the verified client certificate, checked on every RPC.

Under mutual TLS the caller's identity is the role and name in its certificate (URI
SAN `urn:fedcollab:<role>:<name>`), never a field it fills in itself. The interceptor
resolves it before any handler runs, refuses revoked certificates (the revocation
list is re-read when its file changes, so revoking needs no restart) and callers of
the wrong role, and hands the handler a context that carries the identity.

With plaintext (an explicit --insecure rehearsal) there is no identity: handlers fall
back to the names in requests, and the loud warning at start says so.

Before the handler takes any work the interceptor also takes the call's permit from
the call limits (_limits.py: so many open calls per identity, per kind, per session)
and, for a stream, a timer from the watchdog (_watchdog.py: a deadline between
messages). Both are given back when the call ends, however it ends.
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

from fedcollab.coordinator._limits import KIND_OF_METHOD, POLL, UPLOAD, CallLimits, Permit
from fedcollab.coordinator._watchdog import StreamDeadlines, Watchdog, watched_requests, watched_responses
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

    def __init__(self, context: grpc.ServicerContext, caller: Caller | None,
                 authenticator: Authenticator | None = None) -> None:
        self._context = context
        self.caller = caller
        self._authenticator = authenticator

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def check_not_revoked(self) -> None:
        """Rejected CERTIFICATE_REVOKED if the caller's certificate was revoked since
        the call began (a stream may outlast a revocation)."""
        if self._authenticator is not None and self.caller is not None:
            self._authenticator.check_revoked(self.caller)


def caller_of(context: Any) -> Caller | None:
    return getattr(context, "caller", None)


def check_not_revoked(context: Any) -> None:
    """Asks again whether the caller's certificate is revoked: before something it sent
    counts. A no-op over plaintext, and for contexts the interceptor did not build."""
    check = getattr(context, "check_not_revoked", None)
    if check is not None:
        check()


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
        self.check_revoked(caller)
        return caller

    def check_revoked(self, caller: Caller) -> None:
        if self._revoked is not None and self._revoked(caller.serial):
            raise Rejected(code=grpc.StatusCode.UNAUTHENTICATED, reason="CERTIFICATE_REVOKED",
                           message=f"the certificate of {caller.role} {caller.name!r} (serial {caller.serial:x}) "
                                   "has been revoked by the federation operator",
                           metadata={"serial": f"{caller.serial:x}"})


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
    """Runs before every handler: identify, check the role for the service, take the
    call's permit and stream timer, and pass the caller on. `authenticator` None means
    plaintext: no identity to check. `limits` None: no call limits; `watchdog` None: no
    deadlines between a stream's messages (both are the Coordinator's)."""

    def __init__(self, *, authenticator: Authenticator | None, operator_token: str | None = None,
                 limits: CallLimits | None = None, watchdog: Watchdog | None = None,
                 deadlines: StreamDeadlines | None = None) -> None:
        """`operator_token`, over plaintext only: what operator calls must present
        (metadata "authorization: Bearer <token>") in place of a certificate."""
        self._auth = authenticator
        self._operator_token = operator_token
        self._limits = limits
        self._watchdog = watchdog
        self._deadlines = deadlines or StreamDeadlines()
        # method -> (the server's handler, its guarded copy). Building the copy (closures,
        # functools.wraps, a new handler) on every call was measurable under load, and a
        # method's handler does not change once the server runs. Bounded: only registered
        # methods have a handler. Two first calls racing only build the same copy twice.
        self._guarded: dict[str, tuple[Any, Any]] = {}

    def use_operator_token(self, token: str | None) -> None:
        """The token, once it is known: it lives in the state folder, opened only after
        the server has bound its port (and before it serves)."""
        self._operator_token = token

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

    def _identify(self, context: grpc.ServicerContext, method: str, service: str, role: str | None) -> Caller | None:
        """The caller (None over plaintext), or the call aborted."""
        if self._auth is not None:
            try:
                caller = self._auth.identify(context)
                if role is not None and caller.role != role:
                    raise Rejected(
                        code=grpc.StatusCode.PERMISSION_DENIED,
                        reason="OPERATOR_ONLY" if role == "operator" else "INSTITUTION_ONLY",
                        message=f"{service} is for {role}s; this certificate is a {caller.role}'s ({caller.name!r})",
                    )
            except Rejected as e:
                log.warning("refused %s from %s: %s", method, context.peer(), e.reason)
                context.abort_with_status(to_grpc_status(e))
            return caller
        token = self._operator_token if role == "operator" else None
        if token is None:
            return None
        presented = dict(context.invocation_metadata()).get("authorization", "")
        if not secrets.compare_digest(presented.encode(), f"Bearer {token}".encode()):
            log.warning("refused %s from %s: no operator token", method, context.peer())
            context.abort_with_status(to_grpc_status(Rejected(
                code=grpc.StatusCode.UNAUTHENTICATED, reason="OPERATOR_CREDENTIAL_REQUIRED",
                message="operator calls need an operator certificate (mutual TLS) or, over plaintext, "
                        "the coordinator's operator token: pass --token-file "
                        "<state_dir>/operator.token (the fedcollab CLI reads it with --config)")))
        return Caller(role="operator", name="operator-token", serial=0)

    def _permit(self, context: grpc.ServicerContext, method: str, kind: str | None, identity: str,
                request: Any) -> Permit | None:
        """This call's share of the limits, or the call aborted TOO_MANY_CALLS. Given back
        by the wrapper's `finally` and, should the call end some other way (a stream
        whose generator is never closed), by the call's termination callback."""
        if self._limits is None:
            return None
        session = str(getattr(request, "session_id", "") or "") if kind == POLL else ""
        try:
            permit = self._limits.acquire(identity=identity, kind=kind, session=session)
        except Rejected as e:
            # DEBUG: a caller over its limit may call thousands of times a second.
            log.debug("refused %s from %s (%s): %s", method, identity, context.peer(), e.reason)
            context.abort_with_status(to_grpc_status(e))
        context.add_callback(permit.release)
        return permit

    def _guard(self, handler: Any, method: str) -> Any:
        """`handler` with the identity and role check, the call's permit and its stream
        deadlines around its behavior."""
        service = method.strip("/").split("/")[0]
        role = SERVICE_ROLES.get(service)
        kind = KIND_OF_METHOD.get(method)
        auth, limits, watchdog, deadlines = self._auth, self._limits, self._watchdog, self._deadlines
        requests_stream = handler.request_streaming
        responses_stream = handler.response_streaming

        def admit(request: Any, context: grpc.ServicerContext) -> tuple[IdentifiedContext, list[Permit]]:
            caller = self._identify(context, method, service, role)
            permits: list[Permit] = []
            # Over plaintext a client stream names its session only in its first message:
            # it is counted from then (watched_requests' `on_first`), under that session.
            if limits is not None and not (requests_stream and caller is None):
                permit = self._permit(context, method, kind, _identity_key(caller, context, request), request)
                if permit is not None:
                    permits.append(permit)
            return IdentifiedContext(context, caller, auth), permits

        def counted_from_header(context: grpc.ServicerContext, permits: list[Permit]) -> Callable[[Any], None] | None:
            if limits is None or auth is not None:
                return None

            def on_first(message: Any) -> None:
                session = str(getattr(getattr(message, "header", None), "session_id", "") or "")
                key = f"session:{session}" if session else f"peer:{context.peer()}"
                permit = limits.acquire(identity=key, kind=kind)  # Rejected goes to the handler
                context.add_callback(permit.release)
                permits.append(permit)

            return on_first

        def release(permits: list[Permit]) -> None:
            for permit in permits:
                permit.release()

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if not responses_stream:
                @functools.wraps(behavior)
                def unary_response(request: Any, context: grpc.ServicerContext) -> Any:
                    ctx, permits = admit(None if requests_stream else request, context)
                    timer = None
                    try:
                        if requests_stream and watchdog is not None:
                            timer = watchdog.timer(context.cancel)
                            request = watched_requests(request, timer=timer, deadlines=deadlines,
                                                       upload=kind == UPLOAD,
                                                       on_first=counted_from_header(context, permits))
                        return behavior(request, ctx)
                    finally:
                        if timer is not None:
                            timer.disarm()
                        release(permits)

                return unary_response

            @functools.wraps(behavior)
            def stream_response(request: Any, context: grpc.ServicerContext) -> Any:
                ctx, permits = admit(None if requests_stream else request, context)
                try:
                    if requests_stream and watchdog is not None:
                        request = watched_requests(request, timer=watchdog.timer(context.cancel), deadlines=deadlines,
                                                   upload=kind == UPLOAD,
                                                   on_first=counted_from_header(context, permits))
                    responses = behavior(request, ctx)
                    if watchdog is not None:
                        responses = watched_responses(
                            responses, timer=watchdog.timer(context.cancel), deadlines=deadlines,
                            what=lambda: f"{method} to {context.peer()}")
                    yield from responses
                finally:
                    release(permits)

            return stream_response

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


def _identity_key(caller: Caller | None, context: grpc.ServicerContext, request: Any) -> str:
    """Whose calls these are, for the call limits. Under mutual TLS the certificate's
    role and name. Over plaintext nothing is verified, so the limits can only bound
    what a request claims: its session (one institution in one study), else its
    institution's name, else the connection (address and port; the address alone would
    put every institution of a simulation on loopback, or behind one NAT, together)."""
    if caller is not None:
        return f"{caller.role}:{caller.name}"
    session = getattr(request, "session_id", "")
    if isinstance(session, str) and session:
        return f"session:{session}"
    name = getattr(request, "institution", "")
    if isinstance(name, str) and name:
        return f"name:{name}"
    return f"peer:{context.peer()}"


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
