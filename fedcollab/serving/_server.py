"""ModelServer: one checked model version behind gRPC (PredictionService) and,
optionally, HTTP/JSON. Use as a context manager, or start()/stop()."""

from __future__ import annotations

import logging
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcollab._listen import LISTEN_OPTIONS, listen_error
from fedcollab.errors import ConfigError
from fedcollab.registry import ModelCard, card_path_for, read_card
from fedcollab.serving._addresses import DEFAULT_GRPC_ADDRESS, DEFAULT_HTTP_ADDRESS, join_address, split_address
from fedcollab.serving._connections import HttpLimits
from fedcollab.serving._grpc import PredictionServicer
from fedcollab.serving._http import MAX_BODY_BYTES, HttpFrontEnd
from fedcollab.serving._inputs import ServingError
from fedcollab.serving._model import LoadedModel
from fedcollab.transport import is_loopback
from fedcollab.v1 import serving_service_pb2_grpc as spb_grpc

log = logging.getLogger("fedcollab.serving")

_FRAMING_BYTES = 64 * 1024


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e.strerror})") from None


class ModelServer:
    """Serves `model_file` once it has checked it against its card (`card`, or the
    `<stem>.card.json` next to it) and the card's signed lineage, with `public_key`
    when the partner pinned the coordinator's key. A file that does not check out is
    refused here, in the constructor (CardError), and nothing is started.

    `tls_cert` and `tls_key` (PEM files) put both endpoints behind TLS (server
    authentication only: callers need no certificate). Without them, a non-loopback
    address is served in plaintext, with a warning at every start. Port 0 picks a free
    port: read `grpc_port` and `http_port` after start(). `http_limits` bounds the HTTP
    connections and their timeouts (HttpLimits' defaults: 64 connections, 5 s)."""

    def __init__(
        self,
        *,
        model_file: Path,
        card: ModelCard | Path | None = None,
        public_key: bytes | Ed25519PublicKey | None = None,
        grpc_address: str = DEFAULT_GRPC_ADDRESS,
        http_address: str | None = DEFAULT_HTTP_ADDRESS,
        max_batch: int = 1024,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        workers: int = 8,
        http_limits: HttpLimits | None = None,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key), or neither")
        self._grpc_host, self._grpc_port = split_address(grpc_address, what="--grpc-address")
        self._http = split_address(http_address, what="--http-address") if http_address is not None else None
        self.model_file = Path(model_file)
        if not isinstance(card, ModelCard):
            card = read_card(Path(card) if card is not None else card_path_for(self.model_file))
        self.card = card
        self.max_batch = max_batch
        self.tls = tls_cert is not None
        self._cert_pem = _read(tls_cert, "--tls-cert") if tls_cert is not None else None
        self._key_pem = _read(tls_key, "--tls-key") if tls_key is not None else None
        self._tls_files = (tls_cert, tls_key)
        self._workers = workers
        self.http_limits = http_limits or HttpLimits()
        self.model = LoadedModel.load(model_file=self.model_file, card=card, public_key=public_key)
        self._grpc: grpc.Server | None = None
        self._httpd: HttpFrontEnd | None = None
        self._http_thread: threading.Thread | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None

    # ----------------------------------------------------------------- life cycle
    def start(self) -> None:
        if self._grpc is not None:
            raise RuntimeError("ModelServer already started")
        self._warn_plaintext()
        limit = MAX_BODY_BYTES + _FRAMING_BYTES
        reply = max(limit, self.max_batch * (self.model.num_classes * 5 + 16) + _FRAMING_BYTES)
        server = grpc.server(ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="fedcollab-serve"),
                             options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", reply),
                                      *LISTEN_OPTIONS])  # a port in use is an error, not shared
        spb_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(model=self.model, max_batch=self.max_batch), server)
        address = join_address(self._grpc_host, self._grpc_port)
        try:
            if self.tls:
                credentials = grpc.ssl_server_credentials([(self._key_pem, self._cert_pem)])
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:  # why (in use, not this machine's address, privileged), naming the option to change
            why = listen_error(address, key="--grpc-address", role="prediction server")
            raise ServingError(f"cannot serve gRPC: {why}") from None
        server.start()
        self._grpc, self.grpc_port = server, port
        if self._http is not None:
            try:
                self._start_http(*self._http)
            except BaseException:
                self.stop()
                raise
        log.info("serving v%d of %s over gRPC on %s%s", self.card.version, self.card.study, self.grpc_address,
                 f" and HTTP on {self.http_url}" if self._httpd else "")

    def _start_http(self, host: str, port: int) -> None:
        context = None
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(*self._tls_files)  # type: ignore[arg-type]
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"--tls-cert/--tls-key: not a usable certificate and key ({e})") from None
        try:
            httpd = HttpFrontEnd(host, port, model=self.model, max_batch=self.max_batch, ssl_context=context,
                                 limits=self.http_limits)
        except OSError as e:
            raise ServingError(f"cannot serve HTTP on {join_address(host, port)}: {e.strerror} (in use? pick another "
                               "--http-address, or --no-http)") from None
        self._httpd, self.http_port = httpd, httpd.port
        self._http_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                             name="fedcollab-serve-http", daemon=True)
        self._http_thread.start()

    def stop(self, grace: float = 1.0) -> None:
        """Stops taking calls; calls in flight get `grace` seconds to finish."""
        if self._httpd is not None:
            self._httpd.shutdown()  # waits for serve_forever to return
            self._httpd.server_close()
            self._httpd = None
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ----------------------------------------------------------------- where
    @property
    def grpc_address(self) -> str:
        return join_address(self._grpc_host, self.grpc_port if self.grpc_port is not None else self._grpc_port)

    def http_connections(self) -> dict[str, int]:
        """The HTTP connections held now, by state ("idle", "headers", "working")."""
        return self._httpd.slots.states() if self._httpd is not None else {}

    @property
    def http_url(self) -> str | None:
        if self._http is None:
            return None
        host, port = self._http
        return f"{'https' if self.tls else 'http'}://{join_address(host, self.http_port or port)}"

    def _warn_plaintext(self) -> None:
        for address in self.plaintext_exposed:
            log.warning("serving predictions on %s WITHOUT TLS, REACHABLE FROM THE NETWORK: inputs and predictions "
                        "travel unencrypted and callers are not authenticated; pass --tls-cert and --tls-key, or "
                        "bind 127.0.0.1", address)

    @property
    def plaintext_exposed(self) -> list[str]:
        """The non-loopback addresses served without TLS (for the CLI's warning)."""
        if self.tls:
            return []
        addresses = [self.grpc_address]
        if self._http is not None:
            addresses.append(join_address(self._http[0], self.http_port or self._http[1]))
        return [a for a in addresses if not is_loopback(a)]

