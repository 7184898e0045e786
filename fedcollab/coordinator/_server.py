"""The coordinator process: its studies (each a store, a round engine and a driver
thread), the consortium's records, the gRPC server and the operators' web page."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from fedcollab._listen import LISTEN_OPTIONS, bind_grpc, check_can_listen
from fedcollab._state_lock import StateLock
from fedcollab._tls_files import check_tls_files
from fedcollab.config import FederationConfig
from fedcollab.coordinator._auth import Authenticator, IdentityInterceptor
from fedcollab.coordinator._central_eval import central_evaluator
from fedcollab.coordinator._consortium import Consortium
from fedcollab.coordinator._engine import Evaluator, RoundEngine, RoundResult
from fedcollab.coordinator._limits import CallLimits, Limits
from fedcollab.coordinator._operator import OperatorServicer
from fedcollab.coordinator._servicer import CoordinatorServicer
from fedcollab.coordinator._store import Store
from fedcollab.coordinator._studies import Studies
from fedcollab.coordinator._watchdog import StreamDeadlines, Watchdog
from fedcollab.errors import ConfigError
from fedcollab.lineage._keys import load_or_create_signing_key
from fedcollab.transport import is_loopback, message_limit, server_credentials_from, warn_insecure
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc

if TYPE_CHECKING:  # imported where it starts: the dashboard's modules import this one
    from fedcollab.coordinator._http import OperatorHttpServer

log = logging.getLogger("fedcollab.coordinator")


OPERATOR_TOKEN_FILE = "operator.token"


class Coordinator:
    """Runs a federation's studies: the one in `config.study` (the default study, whose
    `engine` and `store` these attributes are) and those operators submit. Use as a
    context manager, or start()/stop().

    `credentials` are the gRPC server credentials (TLS); None serves plaintext, which
    is logged as a warning at every start. When not given, `config.server.tls` is used.
    With credentials, every call must present a client certificate naming a fedcollab
    identity (mutual TLS); `revoked` tells revoked serials (default: the CRL named by
    `config.server.tls.crl`, re-read when it changes).
    """

    def __init__(
        self,
        *,
        config: FederationConfig,
        credentials: grpc.ServerCredentials | None = None,
        evaluator: Evaluator | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
        revoked: Callable[[int], bool] | None = None,
    ) -> None:
        self.config = config
        server = config.server
        state_dir = Path(server.state_dir)
        tls = server.tls
        # A start that fails leaves the state folder as it was: whatever can refuse it
        # (TLS files, the revocation list, the ports, another coordinator on the folder)
        # is checked before the first write. The gRPC port is bound here, served from start().
        if credentials is None and tls is not None:
            check_tls_files(tls, table="server.tls")
            credentials = server_credentials_from(tls)
        revocations = None
        if revoked is None and tls is not None and tls.crl is not None:
            revocations = _revocation_list(tls.ca_cert, tls.crl)
            revoked = revocations.is_revoked
        if server.http_address is not None:
            check_can_listen(server.http_address, key="server.http_address", role="coordinator's dashboard")
        if evaluator is None and config.study.central_evaluation is not None:
            evaluator = central_evaluator(config=config.study.central_evaluation, model=config.study.model)
        self._credentials = credentials
        authenticator = Authenticator(revoked=revoked) if credentials is not None else None
        self._http: OperatorHttpServer | None = None
        # One thread for every stream's deadline between messages (not one per stream).
        self._watchdog = Watchdog()
        self.limits = CallLimits(Limits(
            calls_per_identity=server.calls_per_identity, uploads_per_identity=server.max_uploads_per_identity,
            polls_per_identity=server.max_polls_per_identity, polls_per_session=server.max_polls_per_session,
            downloads_per_identity=server.max_downloads_per_identity))
        interceptor = IdentityInterceptor(
            authenticator=authenticator, limits=self.limits, watchdog=self._watchdog,
            deadlines=StreamDeadlines(first_message_s=server.stream_first_message_timeout_s,
                                      idle_s=server.stream_idle_timeout_s))
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=server.max_workers, thread_name_prefix="rpc"),
            options=server_options(config, tls=credentials is not None),
            # Calls in flight, the queued ones included: beyond it gRPC itself answers
            # RESOURCE_EXHAUSTED before any handler runs. Room for 3 x max_workers to
            # queue behind busy threads (bursts of short calls), while the call limits
            # keep any one identity to server.calls_per_identity threads (at most half).
            maximum_concurrent_rpcs=server.max_workers * 4,
            interceptors=[interceptor],
        )
        self.port: int = bind_grpc(self._server, server.address, credentials=credentials, key="server.address",
                                   role="coordinator")
        self._registered = False  # the services are added in start(): see _unbind
        self._serving = False
        self._closed = False
        try:
            self._lock = StateLock.acquire(state_dir, key="server.state_dir", role="coordinator")
        except BaseException:
            _unbind(self._server)
            raise
        try:
            # What the checks above cannot see (a model that does not build, a store or a
            # lineage that does not verify) fails here; a folder that was new is emptied again.
            with self._lock.undo_if_new():
                try:
                    self._open_state(state_dir, evaluator=evaluator, on_round=on_round)
                except BaseException:
                    self._close_opened()
                    raise
        except BaseException:
            _unbind(self._server)
            raise
        if revocations is not None:
            # A revocation also ends what the certificate had open: its sessions in every
            # study (their next call must Join, and is refused), its place in open rounds.
            revocations.on_reload(self.studies.forget_serials)
        interceptor.use_operator_token(None if authenticator else self.operator_token)

    def _open_state(self, state_dir: Path, *, evaluator: Evaluator | None,
                    on_round: Callable[[RoundResult], None] | None) -> None:
        """The state folder's stores, lineage key and studies (created on first start)."""
        config = self.config
        self.store = Store(state_dir / "coordinator.sqlite")
        signing_key = load_or_create_signing_key(state_dir)
        self.engine = RoundEngine(
            config=config, store=self.store, models_dir=state_dir / "models",
            spool_dir=state_dir / "spool", evaluator=evaluator, on_round=on_round, signing_key=signing_key,
        )
        self.consortium = Consortium(state_dir / "consortium.sqlite")

        def make_evaluator(study_config: FederationConfig) -> Evaluator | None:
            central = study_config.study.central_evaluation
            return central_evaluator(config=central, model=study_config.study.model) if central else None

        self.studies = Studies(config=config, consortium=self.consortium, default_store=self.store,
                               default_engine=self.engine, signing_key=signing_key, make_evaluator=make_evaluator,
                               on_round=on_round)
        # Over plaintext there is no operator certificate: operator calls carry this
        # token instead (readable only by whoever can read the state folder).
        self.operator_token = _operator_token(state_dir / OPERATOR_TOKEN_FILE)

    def _close_opened(self) -> None:
        """What _open_state had opened when it failed (its attributes exist from then on)."""
        if hasattr(self, "studies"):
            self.studies.stop()
        for name in ("consortium", "store"):
            if hasattr(self, name):
                getattr(self, name).close()

    def start(self) -> int:
        if self._serving or self._closed:
            raise RuntimeError("a Coordinator starts once; make a new one to serve again")
        config = self.config
        if not self._registered:
            pb_grpc.add_CoordinatorServiceServicer_to_server(
                CoordinatorServicer(studies=self.studies, consortium=self.consortium,
                                    require_approval=config.server.require_approval), self._server)
            opb_grpc.add_OperatorServiceServicer_to_server(
                OperatorServicer(studies=self.studies, consortium=self.consortium, federation=config.federation.name),
                self._server)
            self._registered = True
        if self._credentials is None:
            warn_insecure(self.address, role="coordinator")
        if config.server.http_address is not None:  # before serving: a busy port stops nothing running
            self._start_http(config.server.http_address)
        self._server.start()
        self._serving = True
        # Where operators' commands find it (`fedcollab study ... --config`), port 0 resolved.
        (Path(config.server.state_dir) / "coordinator.address").write_text(f"{self.address}\n", encoding="utf-8")
        self.studies.start()
        log.info("coordinator for study %r listening on %s", config.study.name, self.address)
        return self.port

    def _start_http(self, address: str) -> None:
        from fedcollab.coordinator._http import OperatorHttpServer
        from fedcollab.coordinator._snapshot import snapshot_of

        # On loopback the page is the local operator's; off it, it asks for the operator token.
        token = None if is_loopback(address) else self.operator_token
        if token is not None:
            log.warning("server.http_address %s is not a loopback address: the operators' page and /metrics ask for "
                        "the operator token, but travel as plain HTTP; put them behind a TLS proxy", address)
        http = OperatorHttpServer(address=address, snapshot=lambda: snapshot_of(self), token=token,
                                  allowed_hosts=self.config.server.http_allowed_hosts)
        try:
            port = http.start()
        except OSError as e:
            raise ConfigError(f"server.http_address: {e}; choose another port, or remove it to serve no "
                              "dashboard") from None
        self._http = http
        log.info("operators' dashboard on http://%s:%d/ (Prometheus metrics at /metrics)",
                 address.rsplit(":", 1)[0], port)

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    @property
    def address(self) -> str:
        return f"{self.config.server.address.rsplit(':', 1)[0]}:{self.port}"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every study has ended (finished, failed or cancelled); True if so."""
        assert self._serving, "start() first"
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.studies.all_ended():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, *, grace: float = 2.0) -> None:
        """Stops serving and closes the state folder (its lock released: another
        Coordinator may open it now). Also for one never started (close())."""
        if self._closed:
            return
        self._closed = True
        try:
            self.studies.stop()
            if self._http is not None:
                self._http.stop()
            if self._serving:
                # Let institutions see FINISHED before the port closes.
                self._server.stop(grace).wait()
            else:
                _unbind(self._server)
            self._watchdog.close()
            self.store.close()
            self.consortium.close()
        finally:
            self._lock.release()

    def close(self) -> None:
        """stop(), for a Coordinator opened (its state read) but not started."""
        self.stop(grace=0)

    def __enter__(self) -> Coordinator:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()




def server_options(config: FederationConfig, *, tls: bool) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments, each for a reason."""
    server = config.server
    limit = message_limit(server.chunk_bytes)
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Off: a second coordinator on a taken port fails to bind, instead of sharing it
        # with the first (the kernel would split the institutions between them).
        *LISTEN_OPTIONS,
        # Flow control: gRPC's bandwidth-delay probing grows each stream's
        # window on loopback until the coordinator buffers ~30 MB per
        # institution (0.45 -> 0.82 GiB above serving from 4 to 16 institutions
        # at 50M parameters, benchmarks/scale_1b.py). A fixed window of one
        # chunk per stream: 0.37 -> 0.55 GiB, the 16-institution round 25%
        # faster, and a 50 ms link still carries 80 MB/s per stream.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", server.chunk_bytes),
        # Keepalive: the server pings each connection that has calls open every
        # keepalive_time_s (default 60 s, against gRPC's 2 h) and drops it when no ack
        # comes within keepalive_timeout_s, so the threads of a peer that vanished (a
        # cut cable sends no FIN) come back within ~80 s, not when TCP gives up.
        ("grpc.keepalive_time_ms", ms(server.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(server.keepalive_timeout_s)),
        # Keep pinging a peer that sends nothing back (a long-poll or an upload's
        # silence is what keepalive is for); gRPC's default stops after 2 pings.
        ("grpc.http2.max_pings_without_data", 0),
        # Pings the server accepts from clients: the daemon's channel pings every 30 s
        # while it has calls open (fedcollab/transport.py: keepalive_time_ms 30000, not
        # without calls), also during an upload, when the server sends nothing back. The
        # default policy allows one ping per 5 minutes without data and answers the third
        # early one with GOAWAY (too_many_pings): honest daemons would be cut off in the
        # middle of long uploads. 10 s is a third of the daemon's interval; a client
        # pinging faster (a ping flood) still gets GOAWAY after max_ping_strikes.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # With no call open a client has no reason to ping (the daemon does not):
        # such pings count as early, as gRPC's default has it.
        ("grpc.keepalive_permit_without_calls", 0),
        # A connection with no call open for max_connection_idle_s (5 min) is closed
        # with a GOAWAY: an idle TLS connection costs memory and a descriptor, and a
        # client reconnects on its next call without noticing. Daemons call every
        # heartbeat_interval_s, so theirs stay open.
        ("grpc.max_connection_idle_ms", ms(server.max_connection_idle_s)),
        # Every connection is renewed after max_connection_age_s (1 h; gRPC adds
        # +-10% jitter): none lives forever, whatever was negotiated on it. Its calls
        # keep running for max_connection_age_grace_s (1 h), longer than a big upload
        # takes (the daemon's own deadline allows 1 s per MB), before it is closed.
        ("grpc.max_connection_age_ms", ms(server.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(server.max_connection_age_grace_s)),
    ]
    if tls:
        # Streams open at once on one connection (HTTP/2 SETTINGS). An honest agent
        # multiplexes its studies over one connection (2 x studies + 1 calls); more wait
        # at the client, not in the server's queue, so one connection cannot flood
        # the RPC queue (maximum_concurrent_rpcs) with calls that are only refused.
        # Under TLS only: over plaintext the daemons of a simulation in one process
        # share one connection (gRPC's global subchannel pool), two streams each.
        options.append(("grpc.max_concurrent_streams", server.max_streams_per_connection))
    return options


def _unbind(server: grpc.Server) -> None:
    """Frees the port of a server that never served: gRPC holds a bound port until
    the process ends unless the server is started and stopped (no handler is added
    before start(), so a call in that instant gets UNIMPLEMENTED)."""
    server.start()
    server.stop(None).wait()


def _operator_token(path: Path) -> str:
    """The state folder's operator token, created once (mode 0600)."""
    if not path.exists():
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
    return path.read_text(encoding="utf-8").strip()


def _revocation_list(ca_cert: Path, crl: Path):  # type: ignore[no-untyped-def]
    from cryptography import x509

    from fedcollab.errors import ConfigError
    from fedcollab.pki import PkiError, RevocationList

    try:
        ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        return RevocationList(Path(crl), ca_cert=ca)
    except (OSError, ValueError, PkiError) as e:
        raise ConfigError(f"server.tls.crl: cannot use the revocation list {crl}: {e}") from None
