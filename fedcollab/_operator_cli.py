"""`fedcollab study ...`, `fedcollab institutions ...` (the operator's, through the
Operator service) and `fedcollab model ...` (publish: the operator's; list and pull:
a partner's, with its institution.toml)."""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcollab._address import parse_address
from fedcollab._display import markup
from fedcollab._plaintext import require_tls_or_insecure
from fedcollab._struct import integral
from fedcollab.config import FederationConfig, InstitutionConfig, TlsConfig, load_config
from fedcollab.errors import ConfigError, FedcollabError
from fedcollab.transport import channel_credentials_from, create_channel
from fedcollab.wire import from_rpc_error

# Wide enough for the tables when the output goes to a file or a pipe (scripts, logs).
console = Console(width=None if sys.stdout.isatty() else 160)
ADDRESS_FILE = "coordinator.address"


# ----------------------------------------------------------------- connecting
def _operator_channel(args: argparse.Namespace) -> tuple[grpc.Channel, list[tuple[str, str]]]:
    """The channel to the coordinator and the call metadata: an operator certificate
    (--cert/--key) under mutual TLS, or over plaintext the operator token."""
    address = args.coordinator
    token_file = Path(args.token_file) if args.token_file else None
    ca = Path(args.ca) if args.ca else None
    if args.config:
        config = load_config(FederationConfig, args.config)
        state = Path(config.server.state_dir)
        written = state / ADDRESS_FILE
        if address is None:
            address = written.read_text(encoding="utf-8").strip() if written.is_file() else config.server.address
        if config.server.tls is not None:
            ca = ca or Path(config.server.tls.ca_cert)
        elif token_file is None:
            token_file = state / "operator.token"
    if address is None:
        raise ConfigError("say where the coordinator is: --config federation.toml, or --coordinator HOST:PORT")
    tls: str | None
    if args.cert or args.key or args.ca:
        tls, what = "--cert/--key/--ca", "this command"
    else:
        tls, what = ("its [server.tls] table" if ca is not None else None), args.config or "this command"
    require_tls_or_insecure(tls=tls, insecure=args.insecure, force_insecure=args.force_insecure, address=address,
                            what=what, console=console,
                            no_tls_hint="pass the operator's --cert and --key, with --ca or a --config whose "
                                        "[server.tls] names the CA")
    try:  # a typo'd port is said now, not retried until the call's deadline
        parse_address(address, listen=False)
    except ValueError as e:
        where = "--coordinator" if args.coordinator else f"{args.config} (server.address; is the coordinator running?)"
        raise ConfigError(f"the coordinator's address {address!r} from {where}: {e}") from None
    if args.cert or args.key:
        if not (args.cert and args.key and ca):
            raise ConfigError("mutual TLS needs --cert and --key (the operator's, from `fedcollab pki`) and the CA "
                              "(--ca, or the [server.tls] ca_cert of --config)")
        tls_files = TlsConfig(ca_cert=ca, cert=Path(args.cert), key=Path(args.key))
        return create_channel(address, credentials=channel_credentials_from(tls_files), chunk_bytes=1 << 20), []
    if ca is not None:
        raise ConfigError(f"the coordinator at {address} speaks mutual TLS: pass the operator's --cert and --key")
    if token_file is None:
        raise ConfigError("over plaintext, operator calls need the coordinator's operator token: --token-file "
                          "<state_dir>/operator.token (or --config federation.toml on the coordinator's machine)")
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read the operator token {token_file}: {e}") from None
    return create_channel(address, credentials=None, chunk_bytes=1 << 20), [("authorization", f"Bearer {token}")]


def _operator_call(args: argparse.Namespace, method: str, request: Any) -> Any:
    from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc

    channel, metadata = _operator_channel(args)
    try:
        return getattr(opb_grpc.OperatorServiceStub(channel), method)(request, metadata=metadata, timeout=30)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        channel.close()


_MAX_STATUS_PAGES = 10_000  # 1000 round attempts a page: far beyond any study; a coordinator that never ends is cut


def _study_status(args: argparse.Namespace, study: str) -> tuple[Any, list[Any]]:
    """GetStatus page by page over one channel: the first reply (institutions and the
    study's figures) and every round attempt, oldest first."""
    from fedcollab.v1 import operator_service_pb2 as opb
    from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc

    channel, metadata = _operator_channel(args)
    try:
        stub = opb_grpc.OperatorServiceStub(channel)
        first, rounds, token, seen = None, [], "", set()
        for _ in range(_MAX_STATUS_PAGES):
            reply = stub.GetStatus(opb.GetStatusRequest(study=study, page_size=1000, page_token=token),
                                   metadata=metadata, timeout=30)
            first = first or reply
            rounds.extend(reply.rounds)
            token = reply.next_page_token
            if not token:
                return first, rounds
            if token in seen:
                raise FedcollabError("the coordinator sent the same status page token twice: stopped paging")
            seen.add(token)
        raise FedcollabError(f"the coordinator's status has more than {_MAX_STATUS_PAGES} pages: stopped paging")
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        channel.close()


def _partner_client(args: argparse.Namespace) -> tuple[Any, InstitutionConfig]:
    from fedcollab.institution import CoordinatorClient

    config = load_config(InstitutionConfig, args.config)
    require_tls_or_insecure(tls="its [tls] table" if config.tls is not None else None, insecure=args.insecure,
                            force_insecure=args.force_insecure, address=config.institution.coordinator,
                            what=args.config, no_tls_hint="add a [tls] table with ca_cert, cert and key",
                            console=console)
    credentials = channel_credentials_from(config.tls) if config.tls is not None else None
    return CoordinatorClient(address=config.institution.coordinator, credentials=credentials), config


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else ""


# ----------------------------------------------------------------- studies
def cmd_study_submit(args: argparse.Namespace) -> int:
    from fedcollab.v1 import operator_service_pb2 as opb

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    summary = _operator_call(args, "SubmitStudy", opb.SubmitStudyRequest(study_toml=text))
    console.print(f"study [bold]{markup(summary.name)}[/] submitted: {markup(summary.status)}"
                  + (f" (starts after {markup(summary.start_after)})" if summary.start_after else ""))
    return 0


def cmd_study_list(args: argparse.Namespace) -> int:
    from fedcollab.v1 import operator_service_pb2 as opb

    response = _operator_call(args, "ListStudies", opb.ListStudiesRequest())
    table = Table(title="studies")
    for col in ("study", "status", "rounds", "model", "strategy", "online", "declined by", "submitted", "reason"):
        table.add_column(col)
    for s in response.studies:
        table.add_row(markup(s.name) + (" (default)" if s.is_default else ""), markup(s.status),
                      f"{s.rounds_committed}/{s.total_rounds}", markup(s.model_kind), markup(s.strategy),
                      str(len(s.online)),
                      markup(", ".join(sorted(s.declined))), _when(s.submitted_at), markup(s.reason))
    console.print(table)
    return 0


def cmd_study_status(args: argparse.Namespace) -> int:
    from fedcollab.v1 import operator_service_pb2 as opb

    studies = _operator_call(args, "ListStudies", opb.ListStudiesRequest()).studies
    summary = next((s for s in studies if s.name == args.name or (not args.name and s.is_default)), None)
    if summary is None:
        raise ConfigError(f"no study {args.name!r} at the coordinator; `fedcollab study list` shows them")
    status, rounds = _study_status(args, summary.name)
    console.print(f"study [bold]{markup(summary.name)}[/]: {markup(summary.status)}, {summary.rounds_committed} of "
                  f"{summary.total_rounds} rounds committed; model {markup(summary.model_kind)}, strategy "
                  f"{markup(summary.strategy)}"
                  + (f"; {markup(summary.reason)}" if summary.reason else ""))
    shown = rounds[-args.last:] if args.last else rounds
    table = Table(title="rounds" if len(shown) == len(rounds) else
                  f"rounds: the latest {len(shown)} of {len(rounds)} attempts (--last 0 shows all)")
    for col in ("round", "attempt", "status", "model", "updates", "train loss", "eval acc", "reason"):
        table.add_column(col)
    for r in shown:
        m = r.metrics
        table.add_row(str(r.round), str(r.attempt), markup(r.status), str(r.model_version or ""),
                      str(int(m.get("num_updates", 0)) or ""),
                      f"{m['train_loss']:.4f}" if "train_loss" in m else "",
                      f"{m['eval_accuracy']:.4f}" if "eval_accuracy" in m else "", markup(r.reason))
    console.print(table)
    table = Table(title="institutions")
    for col in ("institution", "online", "examples", "epsilon spent", "budget"):
        table.add_column(col)
    for i in status.institutions:
        table.add_row(markup(i.name), "yes" if i.online else "no", str(i.num_train_examples),
                      f"{i.epsilon:.3f}" if i.budget_epsilon else "",
                      f"{i.budget_epsilon:g}" if i.budget_epsilon else "")
    console.print(table)
    for name, why in sorted(summary.declined.items()):
        console.print(f"declined by {markup(name)}: {markup(why)}")
    return 0


def cmd_study_change(args: argparse.Namespace) -> int:
    from fedcollab.v1 import operator_service_pb2 as opb

    summary = _operator_call(args, "ChangeStudy", opb.ChangeStudyRequest(study=args.name, action=args.change,
                                                                         reason=args.reason or ""))
    console.print(f"study [bold]{markup(summary.name)}[/]: {markup(summary.status)}")
    return 0


# ----------------------------------------------------------------- membership
def cmd_institutions_list(args: argparse.Namespace) -> int:
    from fedcollab.v1 import operator_service_pb2 as opb

    response = _operator_call(args, "ListInstitutions", opb.ListInstitutionsRequest())
    table = Table(title="institutions")
    for col in ("institution", "membership", "online", "last seen", "examples", "changed by", "reason"):
        table.add_column(col)
    for m in response.institutions:
        table.add_row(markup(m.institution), markup(m.status), "yes" if m.online else "no", _when(m.last_seen),
                      str(m.num_train_examples), markup(m.changed_by), markup(m.reason))
    console.print(table)
    return 0


def cmd_institutions_set(args: argparse.Namespace) -> int:
    from fedcollab.v1 import operator_service_pb2 as opb

    status = {"approve": "approved", "suspend": "suspended"}[args.change]
    m = _operator_call(args, "SetMembership", opb.SetMembershipRequest(institution=args.name, status=status,
                                                                       reason=args.reason or ""))
    console.print(f"{markup(m.institution)}: {markup(m.status)}")
    return 0


# ----------------------------------------------------------------- model registry
def cmd_model_publish(args: argparse.Namespace) -> int:
    from fedcollab.v1 import operator_service_pb2 as opb

    r = _operator_call(args, "PublishModel", opb.PublishModelRequest(study=args.study, version=args.version))
    console.print(f"published v{r.version} of study {markup(r.study)} (SHA-256 {r.sha256[:16]}..)")
    return 0


def cmd_model_versions(args: argparse.Namespace) -> int:
    from fedcollab.lineage import LineageError, verify_record
    from fedcollab.v1 import operator_service_pb2 as opb

    response = _operator_call(args, "ListLineage", opb.ListLineageRequest(study=args.study or ""))
    published = set(response.published_versions)
    table = Table(title=f"committed versions of {markup(args.study or 'the default study')} with their lineage")
    for col in ("version", "round", "parent", "sha256", "aggregator", "contributors", "signed", "published", "created"):
        table.add_column(col)
    for e in response.entries:
        try:
            r = verify_record(record_bytes=e.record, signature=e.signature, public_key=response.public_key)
            signed = "ok"
        except LineageError as err:
            r, signed = {}, markup(f"NO: {err.message}")
        table.add_row(str(e.version), markup(r.get("round", "")), markup((r.get("parent_sha256") or "-")[:12]),
                      markup(str(r.get("model_sha256", ""))[:12]), markup((r.get("aggregator") or {}).get("name", "")),
                      markup(", ".join(c["institution"] for c in r.get("contributions", []))), signed,
                      "yes" if e.version in published else "",
                      markup(str(r.get("created_at", ""))[:19]))
    console.print(table)
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    client, _ = _partner_client(args)
    models = client.list_models(study=args.study or "")
    table = Table(title="published models")
    for col in ("study", "version", "round", "size", "contributors", "metrics", "max epsilon", "published", "sha256"):
        table.add_column(col)
    for m in models:
        metrics = markup(", ".join(f"{k} {v:.4g}" for k, v in sorted(m.metrics.items()) if k.endswith("accuracy")))
        table.add_row(markup(m.study), str(m.version), str(m.round), f"{m.size_bytes / 1e6:.2f} MB",
                      markup(", ".join(m.contributors)), metrics,
                      f"{max(m.epsilon.values()):.3f}" if any(m.epsilon.values()) else "", _when(m.published_at),
                      markup(m.sha256[:16]) + "..")
    console.print(table)
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    """Nothing is saved unless what arrives is the version asked for: the description
    names that study and version, the bytes hash to its SHA-256, and the signed lineage
    record names the same study, version and SHA-256. A coordinator that answers with
    another version (an older one, another study's) is refused, and the partial file
    goes with it."""
    from fedcollab._names import NAME, SHA256_HEX
    from fedcollab.lineage import LineageError, check_model, load_public_key, raw_public_key
    from fedcollab.registry import ModelCard, card_path_for, write_card

    if not NAME.fullmatch(args.study):  # it becomes a file name
        raise ConfigError(f"--study {args.study!r}: a study name is letters, digits, '.', '_' or '-'")
    if args.version < 1:
        raise ConfigError(f"version {args.version}: versions start at 1")
    client, config = _partner_client(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / f".{args.study}-v{args.version}.part"
    asked = f"v{args.version} of study {args.study!r}"

    def refuse(problem: str) -> FedcollabError:
        part.unlink(missing_ok=True)
        return FedcollabError(f"{asked}: {problem}: nothing saved")

    info, offset = None, part.stat().st_size if part.is_file() else 0
    digest = hashlib.sha256()
    if offset:
        with part.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    out = None
    try:
        for message in client.pull_model(study=args.study, version=args.version, offset=offset):
            if message.WhichOneof("payload") == "model":
                if info is not None:
                    raise refuse("the coordinator described the model twice")
                info = message.model
                if (info.study, info.version) != (args.study, args.version):
                    raise refuse(f"the coordinator sent v{info.version} of study {info.study[:80]!r} instead")
                if not SHA256_HEX.fullmatch(info.sha256):
                    raise refuse(f"the coordinator names the file by {info.sha256[:80]!r}, not a SHA-256")
                continue
            if info is None:
                raise refuse("the coordinator sent the file before saying which model it is")
            chunk = message.chunk
            if chunk.offset != offset or hashlib.sha256(chunk.data).digest() != chunk.sha256:
                raise refuse(f"chunk at offset {chunk.offset} is corrupt; pull again")
            if offset + len(chunk.data) > info.size_bytes:
                raise refuse(f"the coordinator sends more than the {info.size_bytes} bytes it announced")
            if out is None:
                out = part.open("ab")
            out.write(chunk.data)
            digest.update(chunk.data)
            offset += len(chunk.data)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    if info is None:
        raise refuse("the coordinator sent no model description")
    # Nothing is saved under the final name unless the hash and the signature both check out.
    if digest.hexdigest() != info.sha256:
        raise refuse(f"the file's SHA-256 is {digest.hexdigest()[:16]}.., the registry says {info.sha256[:16]}..; "
                     "pull again")
    pinned = config.institution.lineage_public_key
    key = raw_public_key(load_public_key(pinned)) if pinned is not None else bytes(info.lineage_public_key)
    try:
        record = check_model(record_bytes=info.lineage_record, signature=info.lineage_signature, public_key=key,
                             version=args.version, sha256=info.sha256)
    except LineageError as e:
        raise refuse(f"its signed lineage record does not verify ({e.message})"
                     + ("" if pinned else "; pin the coordinator's key with institution.lineage_public_key")
                     ) from None
    if record.get("study") != args.study:
        raise refuse(f"its signed lineage record is study {str(record.get('study'))[:80]!r}'s")
    final = out_dir / f"{args.study}-v{args.version}.safetensors"
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    from google.protobuf import json_format

    card = ModelCard(
        federation=info.federation, study=info.study, version=info.version, sha256=info.sha256,
        size_bytes=info.size_bytes,
        model={"kind": info.model.kind, "params": integral(json_format.MessageToDict(info.model.params))},
        rounds=info.round, contributors=list(info.contributors), metrics=dict(info.metrics),
        privacy=_privacy_of(record), central_dp=record.get("central_dp"),
        lineage={"record": base64.b64encode(info.lineage_record).decode(),
                 "signature": base64.b64encode(info.lineage_signature).decode(),
                 "public_key": base64.b64encode(key).decode()},
        published_at=datetime.fromtimestamp(info.published_at, UTC).isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        pulled_at=now,
    )
    os.replace(part, final)
    write_card(card, card_path_for(final))
    console.print(f"saved {final} and {card_path_for(final).name} (v{info.version} of {escape(info.study)}, "
                  f"SHA-256 and lineage signature verified); serve it with `fedcollab serve --model {final}`")
    return 0


def _privacy_of(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each contributor's DP spend as the signed record of the version states it."""
    out = {}
    for c in record.get("contributions", []):
        p = c.get("privacy") or {}
        if p.get("epsilon"):
            out[c["institution"]] = {"epsilon": float(p["epsilon"]), "delta": float(p.get("delta", 0.0)),
                                     "budget_epsilon": float(p.get("budget_epsilon", 0.0))}
    return out


# ----------------------------------------------------------------- parsers
def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0, 1, 2, ...)")
    return n


def _operator_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="federation.toml: the coordinator's address, CA and (plaintext) operator token")
    p.add_argument("--coordinator", help="HOST:PORT of the coordinator")
    p.add_argument("--cert", help="the operator's certificate (mutual TLS)")
    p.add_argument("--key", help="the operator's private key")
    p.add_argument("--ca", help="the federation CA's certificate")
    p.add_argument("--token-file", help="over plaintext: the coordinator's <state_dir>/operator.token")
    _insecure_options(p, what="with the operator token, when no mutual TLS is configured")


def _insecure_options(p: argparse.ArgumentParser, *, what: str) -> None:
    p.add_argument("--insecure", action="store_true", help=f"plaintext gRPC {what} (refused next to TLS)")
    p.add_argument("--force-insecure", action="store_true", help="allow --insecure to a non-loopback address")


def add_commands(sub: Any) -> None:
    study = sub.add_parser("study", help="the coordinator's studies (operator)").add_subparsers(dest="action",
                                                                                               required=True)
    p = study.add_parser("submit", help="submit a study file ([study] table, as in federation.toml)")
    p.add_argument("file")
    _operator_options(p)
    p.set_defaults(func=cmd_study_submit)
    p = study.add_parser("list", help="every study, with its status")
    _operator_options(p)
    p.set_defaults(func=cmd_study_list)
    p = study.add_parser("status", help="a study's rounds and institutions")
    p.add_argument("name", nargs="?", default="", help="default: the default study")
    p.add_argument("--last", type=_count, default=100, metavar="N",
                   help="show the latest N round attempts (default: 100; 0: all, slow to draw for thousands)")
    _operator_options(p)
    p.set_defaults(func=cmd_study_status)
    for change, what in (("pause", "open no new round (the one under way ends)"), ("resume", "go on after a pause"),
                         ("cancel", "end the study where it stands")):
        p = study.add_parser(change, help=what)
        p.add_argument("name")
        p.add_argument("--reason", help="recorded with the change")
        _operator_options(p)
        p.set_defaults(func=cmd_study_change, change=change)

    inst = sub.add_parser("institutions", help="membership of the federation (operator)").add_subparsers(
        dest="action", required=True)
    p = inst.add_parser("list", help="every institution known, with its membership")
    _operator_options(p)
    p.set_defaults(func=cmd_institutions_list)
    for change, what in (("approve", "admit it (again)"), ("suspend", "refuse all its calls until approved")):
        p = inst.add_parser(change, help=what)
        p.add_argument("name")
        p.add_argument("--reason", help="recorded, and told to the institution when it is refused")
        _operator_options(p)
        p.set_defaults(func=cmd_institutions_set, change=change)

    model = sub.add_parser("model", help="the model registry").add_subparsers(dest="action", required=True)
    p = model.add_parser("publish", help="publish a committed version (operator)")
    p.add_argument("--study", required=True)
    p.add_argument("--version", type=int, required=True)
    _operator_options(p)
    p.set_defaults(func=cmd_model_publish)
    p = model.add_parser("versions", help="every committed version with its lineage (operator)")
    p.add_argument("--study", help="default: the default study")
    _operator_options(p)
    p.set_defaults(func=cmd_model_versions)
    p = model.add_parser("list", help="published versions (partner: --config institution.toml)")
    p.add_argument("--config", required=True, help="institution.toml")
    p.add_argument("--study", help="only this study")
    _insecure_options(p, what="when institution.toml has no [tls] table")
    p.set_defaults(func=cmd_model_list)
    p = model.add_parser("pull", help="download a published version, verify hash and signature, save it with "
                                      "its model card (partner)")
    p.add_argument("version", type=int)
    p.add_argument("--study", required=True)
    p.add_argument("--config", required=True, help="institution.toml")
    p.add_argument("--out", default="models", help="folder to save into (default: models)")
    _insecure_options(p, what="when institution.toml has no [tls] table")
    p.set_defaults(func=cmd_model_pull)
