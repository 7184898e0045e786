"""`fedcollab serve`: serve a pulled model version until Ctrl-C or SIGTERM.

Only argparse here at import time: `fedcollab --help` does not load torch."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fedcollab._display import print_facts
from fedcollab.serving._addresses import DEFAULT_GRPC_ADDRESS, DEFAULT_HTTP_ADDRESS

console = Console()

_EXAMPLE_MAX_NUMBERS = 64  # a curl example with at most this many numbers is printed whole


def add_serve_command(sub: Any) -> None:
    """Registers `serve` on the `fedcollab` command's subparsers."""
    p = sub.add_parser("serve", help="answer predictions from a pulled model version over gRPC and HTTP/JSON",
                       description="Check a pulled model against its card and signed lineage, then answer "
                                   "predictions until Ctrl-C.")
    p.add_argument("--model", required=True, metavar="FILE", help="the .safetensors file `fedcollab model pull` saved")
    p.add_argument("--card", metavar="FILE", help="its model card (default: <model stem>.card.json next to it)")
    p.add_argument("--public-key", metavar="FILE",
                   help="the coordinator's lineage-public-key.pem to pin (default: the card's own key, which "
                        "proves the file is intact but not who signed it)")
    p.add_argument("--grpc-address", default=DEFAULT_GRPC_ADDRESS,
                   help=f"host:port for gRPC PredictionService (default: {DEFAULT_GRPC_ADDRESS})")
    http = p.add_mutually_exclusive_group()
    http.add_argument("--http-address", default=DEFAULT_HTTP_ADDRESS,
                      help=f"host:port for HTTP/JSON (default: {DEFAULT_HTTP_ADDRESS})")
    http.add_argument("--no-http", action="store_true", help="serve gRPC only")
    p.add_argument("--max-batch", type=int, default=1024, help="most examples per request (default: 1024)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve both endpoints over TLS")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.set_defaults(func=cmd_serve)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_serve(args: argparse.Namespace) -> int:
    from fedcollab.lineage import load_public_key
    from fedcollab.serving._server import ModelServer

    public_key = load_public_key(Path(args.public_key)) if args.public_key else None
    server = ModelServer(
        model_file=Path(args.model), card=Path(args.card) if args.card else None, public_key=public_key,
        grpc_address=args.grpc_address, http_address=None if args.no_http else args.http_address,
        max_batch=args.max_batch, tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
    )
    stop = _stop_on_signals()
    with server:
        _print_serving(server)
        while not stop.wait(0.5):  # a deadline, so the signal handler's set() is seen promptly
            pass
    console.print("stopped", markup=False)
    return 0


def _print_serving(server: Any) -> None:
    info = server.model.info(max_batch=server.max_batch)
    card = server.model.card
    rows = [
        ("model", f"{server.model_file} ({info['kind']}, {info['num_classes']} classes)"),
        ("sha256", info["sha256"]),
        ("input", info["input"]["description"]),
        ("rounds", f"{info['rounds']}; contributors: {', '.join(info['contributors']) or 'none'}"),
        ("metrics", ", ".join(f"{k} {v:.4g}" for k, v in sorted(info["metrics"].items())) or "none recorded"),
        ("privacy", _privacy_line(info["privacy"])),
        ("lineage", f"signature verified with {info['lineage_key_fingerprint']} "
                    + ("(pinned)" if info["lineage_key_pinned"] else "(the card's own key, not pinned)")),
        ("gRPC", f"{server.grpc_address} (fedcollab.v1.PredictionService{', TLS' if server.tls else ''})"),
        ("HTTP", server.http_url or "off (--no-http)"),
        ("published", f"{card.published_at}, pulled {card.pulled_at}"),
    ]
    # Whole lines: the SHA-256 and the key's fingerprint are compared, never cut at the width.
    print_facts(console, rows, title=f"serving {info['study']} v{info['version']} ({info['federation']})")
    if not info["lineage_key_pinned"]:
        console.print("[yellow]warning:[/] no --public-key: the lineage signature proves this file is intact, not "
                      "that your federation's coordinator signed it. Pin the key its operator gives you "
                      "(lineage-public-key.pem).")
    for address in server.plaintext_exposed:
        console.print(f"[bold red]PLAINTEXT on {escape(address)}, reachable from the network: predictions and inputs "
                      "are unencrypted and anyone who can reach it can query the model. Use --tls-cert/--tls-key or "
                      "bind 127.0.0.1.[/]")
    if server.http_url:
        console.print("try it:", markup=False)
        console.print(_curl_example(server.http_url, info["input"], insecure_tls=server.tls), markup=False,
                      highlight=False, soft_wrap=True)
    console.print("Ctrl-C stops it.", markup=False)


def _privacy_line(privacy: dict[str, Any]) -> str:
    parts = []
    if privacy["institutions"]:
        parts.append(f"max epsilon {privacy['max_epsilon']:.3g} reported by {len(privacy['institutions'])} "
                     "institution(s)")
    if privacy["central_dp"]:
        parts.append(f"federation epsilon {privacy['central_epsilon']:.3g} at delta {privacy['central_delta']:g}")
    return "; ".join(parts) or "no differential privacy reported"


def _example(spec: dict[str, Any]) -> Any:
    """One example of zeros in the shape the model takes."""
    value: Any = 0  # JSON integers are accepted as floats too
    for size in reversed(spec["shape"]):
        value = [value] * size
    return value


def _curl_example(url: str, spec: dict[str, Any], *, insecure_tls: bool) -> str:
    numbers = 1
    for size in spec["shape"]:
        numbers *= size
    flag = "--cacert CA.pem " if insecure_tls else ""
    if numbers <= _EXAMPLE_MAX_NUMBERS:
        body = json.dumps({"instances": [_example(spec)]}, separators=(",", ":"))
        return f"  curl -s {flag}-H 'Content-Type: application/json' -d '{body}' {url}/v1/predict"
    return (f"  curl -s {flag}-H 'Content-Type: application/json' -d @request.json {url}/v1/predict\n"
            f"  where request.json is {{\"instances\": [example, ...]}}, each example {spec['description']} "
            f"(shape {spec['shape']}); GET {url}/v1/model describes it")
