"""The operators' endpoint without a federation: Prometheus exposition, the dashboard's
escaping, the HTTP routes, and JSON log lines."""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import logging
import math
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedcollab._logging import JsonFormatter, configure_logging
from fedcollab.coordinator._dashboard import PAGE_ROWS, line_chart, nice_ticks, render_dashboard, render_study
from fedcollab.coordinator._http import OperatorHttpServer
from fedcollab.coordinator._metrics import escape_label_value, render_metrics
from fedcollab.coordinator._snapshot import ConsortiumSnapshot, StudySnapshot
from fedcollab.errors import ConfigError

HOSTILE_STUDY = 'trial "A"\\b\n<script>alert(1)</script>'
HOSTILE_INSTITUTION = "<img src=x onerror=alert(1)>&co"
HOSTILE_REASON = 'BAD"REASON\\x\ny'


def _round(number: int, attempt: int, status: str, opened: float, closed: float | None, **metrics: float
           ) -> dict[str, Any]:
    return {"round": number, "attempt": attempt, "status": status, "opened_at": opened, "closed_at": closed,
            "base_version": number - 1, "model_version": number if status == "committed" else None,
            "reason": None if status == "committed" else "quorum not met", "metrics": dict(metrics)}


def _snapshot(*, study: str = HOSTILE_STUDY, institution: str = HOSTILE_INSTITUTION) -> ConsortiumSnapshot:
    rounds = [
        _round(1, 1, "committed", 100.0, 103.0, train_loss=1.5, eval_loss=1.2, eval_accuracy=0.61,
               central_accuracy=0.58, num_updates=2, num_examples=900),
        _round(2, 1, "failed", 110.0, 150.0),
        _round(2, 2, "abandoned", 160.0, 161.0),
        _round(2, 3, "committed", 170.0, 245.0, train_loss=0.9, eval_loss=0.7, eval_accuracy=0.8,
               central_accuracy=float("nan"), num_updates=2, num_examples=900),
        _round(3, 1, "open", 250.0, None),
    ]
    privacy = [
        {"round": 1, "attempt": 1, "institution": institution, "status": "done", "epsilon": 0.5, "budget_epsilon": 2.0,
         "delta": 1e-5, "accountant": "rdp"},
        {"round": 2, "attempt": 3, "institution": institution, "status": "done", "epsilon": 1.75,
         "budget_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
        {"round": 2, "attempt": 3, "institution": "lab-b", "status": "done", "epsilon": 3.0, "budget_epsilon": 2.0,
         "delta": 1e-5, "accountant": "rdp"},
    ]
    lineage = [
        {"version": 0, "round": 0, "model_sha256": "a" * 64, "parent_sha256": None, "contributors": [],
         "aggregator": "initial", "created_at": "2025-01-01T00:00:00.000000Z"},
        {"version": 1, "round": 1, "model_sha256": "b" * 64, "parent_sha256": "a" * 64,
         "contributors": [institution, "lab-b"], "aggregator": "fedavg", "created_at": "2025-01-01T00:01:00.000000Z"},
    ]
    history = [
        {"at": 230.0, "kind": "study", "subject": study, "status": "running", "note": "resumed by op",
         "changed_by": ""},
        {"at": 220.0, "kind": "study", "subject": study, "status": "paused", "note": f"paused by op: {HOSTILE_REASON}",
         "changed_by": ""},
    ]
    s = StudySnapshot(name=study, status="running", total_rounds=5, rounds=rounds, evaluations=[], privacy=privacy,
                      lineage=lineage, online=[institution], bytes_in=123456, bytes_out=654321,
                      failures={"ROUND_DEADLINE": 2, HOSTILE_REASON: 1}, history=history)
    institutions = [
        {"name": institution, "status": "approved", "online": True, "num_train_examples": 450, "last_seen": 240.0},
        {"name": "lab-b", "status": "suspended", "online": False, "num_train_examples": 450, "last_seen": 200.0},
        {"name": "lab-c", "status": "pending", "online": False, "num_train_examples": 0, "last_seen": 100.0},
    ]
    membership = [{"at": 225.0, "kind": "membership", "subject": "lab-b", "status": "suspended",
                   "note": "audit <pending>", "changed_by": "operator"}]
    return ConsortiumSnapshot(federation="consortium <x>", taken_at=260.0, studies=[s], institutions=institutions,
                              membership_history=membership)


# ---------------------------------------------------------------- exposition format
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^(?P<name>{_NAME})(?:\{{(?P<labels>.*)\}})? (?P<value>\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"\s*(,|$)')


def _unescape(v: str) -> str:
    return re.sub(r"\\([\\\"n])", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def parse_exposition(text: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, dict[str, str], float]]]:
    """Families {name: (type, help)} and samples, checking the 0.0.4 grammar as it goes:
    HELP and TYPE before a family's samples, each family's samples together, escapes."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    families: dict[str, tuple[str, str]] = {}
    helps: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    finished: set[str] = set()
    current = None
    for line in text.splitlines():
        assert line.strip(), "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and name not in helps, line
            helps[name] = help_text
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name in helps and name not in families, f"TYPE once per family, after HELP: {line}"
            families[name] = (kind, helps[name])
            if current is not None:
                finished.add(current)
            current = name
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels_text, value = m.group("name"), m.group("labels"), m.group("value")
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in families \
                    and families[name[: -len(suffix)]][0] == "histogram":
                family = name[: -len(suffix)]
        assert family == current and family not in finished, f"{name}: outside its family's block"
        labels: dict[str, str] = {}
        rest = labels_text or ""
        while rest:
            lm = _LABEL.match(rest)
            assert lm, f"bad labels in {line!r} at {rest!r}"
            assert lm.group(1) not in labels
            labels[lm.group(1)] = _unescape(lm.group(2))
            rest = rest[lm.end():]
        samples.append((name, labels, float(value)))  # float() takes NaN, +Inf, -Inf
    return families, samples


def _values(samples: list[tuple[str, dict[str, str], float]], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(labels.items())): v for n, labels, v in samples if n == name}


def test_the_exposition_parses_and_carries_the_snapshot_figures() -> None:
    families, samples = parse_exposition(render_metrics(_snapshot()))
    assert all(name.startswith("fedcollab_") for name in families)
    assert families["fedcollab_rounds_committed_total"][0] == "counter"
    assert families["fedcollab_round_duration_seconds"][0] == "histogram"
    study = (("study", HOSTILE_STUDY),)  # the hostile name survives escaping and parsing unchanged
    assert _values(samples, "fedcollab_rounds_committed_total") == {study: 2}
    assert _values(samples, "fedcollab_rounds_failed_total") == {study: 1}
    assert _values(samples, "fedcollab_rounds_abandoned_total") == {study: 1}
    assert _values(samples, "fedcollab_current_round") == {study: 3}
    assert _values(samples, "fedcollab_model_version") == {study: 1}
    assert _values(samples, "fedcollab_received_bytes_total") == {study: 123456}
    assert _values(samples, "fedcollab_sent_bytes_total") == {study: 654321}
    assert _values(samples, "fedcollab_institutions_connected") == {study: 1}
    assert _values(samples, "fedcollab_participations_failed_total") == {
        (("reason", "ROUND_DEADLINE"), *study): 2, (("reason", HOSTILE_REASON), *study): 1}
    assert _values(samples, "fedcollab_epsilon_spent") == {  # the latest report of each institution
        (("institution", HOSTILE_INSTITUTION), *study): 1.75, (("institution", "lab-b"), *study): 3.0}
    assert _values(samples, "fedcollab_institutions") == {
        (("status", "approved"),): 1, (("status", "pending"),): 1, (("status", "suspended"),): 1}
    status = _values(samples, "fedcollab_study_status")
    assert status[(("status", "running"), *study)] == 1 and sum(status.values()) == 1


@pytest.mark.parametrize("status", ["queued", "running", "paused", "cancelled", "finished", "failed"])
def test_every_study_status_has_its_sample(status: str) -> None:
    """An alert such as fedcollab_study_status{status="failed"} == 1 needs the sample:
    every status is exposed for every study, the current one at 1."""
    snapshot = _snapshot(study="s")
    snapshot.studies[0] = dataclasses.replace(snapshot.studies[0], status=status)  # type: ignore[arg-type]
    families, samples = parse_exposition(render_metrics(snapshot))
    values = {labels["status"]: v for n, labels, v in samples if n == "fedcollab_study_status"}
    assert values == {s: float(s == status) for s in ("queued", "running", "paused", "cancelled", "finished",
                                                       "failed")}
    assert "failed" in families["fedcollab_study_status"][1]  # the HELP line names the statuses


def test_the_round_duration_histogram_is_cumulative() -> None:
    _, samples = parse_exposition(render_metrics(_snapshot(study="s"), round_duration_buckets=(5, 60, 120)))
    buckets = {labels["le"]: v for n, labels, v in samples if n == "fedcollab_round_duration_seconds_bucket"}
    # Committed rounds took 3 s and 75 s; failed and abandoned ones are not counted.
    assert buckets == {"5.0": 1, "60.0": 1, "120.0": 2, "+Inf": 2}
    assert _values(samples, "fedcollab_round_duration_seconds_count") == {(("study", "s"),): 2}
    assert _values(samples, "fedcollab_round_duration_seconds_sum") == {(("study", "s"),): 78.0}


@pytest.mark.parametrize("buckets", [(), (5, 1), (1, 1), (0, 1), (1, math.inf), (-1, 2)],
                         ids=["empty", "decreasing", "repeated", "zero", "infinite", "negative"])
def test_bad_buckets_are_refused(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        render_metrics(_snapshot(), round_duration_buckets=buckets)


@pytest.mark.parametrize(("raw", "escaped"), [
    ("plain", "plain"), ('a"b', 'a\\"b'), ("a\\b", "a\\\\b"), ("a\nb", "a\\nb"), ('\\"\n', '\\\\\\"\\n'),
    ("ünï cødé", "ünï cødé"),
])
def test_label_values_are_escaped(raw: str, escaped: str) -> None:
    assert escape_label_value(raw) == escaped
    assert _unescape(escaped) == raw


def test_an_empty_consortium_still_exposes_every_family() -> None:
    families, samples = parse_exposition(render_metrics(ConsortiumSnapshot("f", 0.0, [], [])))
    assert "fedcollab_rounds_committed_total" in families
    assert _values(samples, "fedcollab_institutions")[(("status", "approved"),)] == 0


# ---------------------------------------------------------------- dashboard
def test_the_dashboard_escapes_every_name_from_outside() -> None:
    snapshot = _snapshot()
    for page in (render_dashboard(snapshot), render_study(snapshot, name=HOSTILE_STUDY)):
        assert "<script" not in page and "<img" not in page and "onerror=alert(1)>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "&lt;img src=x onerror=alert(1)&gt;&amp;co" in page
        assert "consortium &lt;x&gt;" in page
        assert "BAD&quot;REASON" in page  # a failure reason (study page), a pause's reason (both)
        assert "audit &lt;pending&gt;" in page
    # A name outside the shared patterns is shown, not linked: no path is built from it.
    assert 'href="/studies/' not in render_dashboard(snapshot)


def test_the_landing_page_lists_the_studies_then_institutions_then_history() -> None:
    snapshot = _snapshot(study="trial-a", institution="hospital-a")
    page = render_dashboard(snapshot)
    assert '<a class="study-link" href="/studies/trial-a">trial-a</a>' in page
    assert '<table class="rounds">' not in page and "<svg" not in page  # the study's details are on its page
    studies, institutions, history = (page.index(f'<table class="{t}">') for t in ("studies", "institutions",
                                                                                  "history"))
    assert studies < institutions < history
    rows = page.split('<table class="history">', 1)[1].split("</table>", 1)[0].split("<tr>")[2:]
    # Newest first, studies' and institutions' changes together.
    assert ["resumed by op" in rows[0], "suspended" in rows[1], "paused by op" in rows[2]] == [True] * 3
    assert "1970-01-01 00:03:45 UTC" in rows[1] and ">operator<" in rows[1]  # when, and by whom


def test_the_dashboard_is_self_contained_and_shows_the_study() -> None:
    snapshot = _snapshot(study="trial-a", institution="hospital-a")
    for page in (render_dashboard(snapshot), render_study(snapshot, name="trial-a")):
        assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
        assert '<meta http-equiv="refresh" content="5">' in page
        # Nothing that a browser would fetch: no scripts, stylesheets, images or fonts from elsewhere.
        for needle in ("<script", "<link", "<img", "src=", "@import", "url("):
            assert needle not in page, needle
        assert "trial-a" in page and "hospital-a" in page and "lab-c" in page
        assert "suspended" in page and "pending" in page and "approved" in page
    page = render_study(snapshot, name="trial-a")
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"] * 2  # the SVG namespace only
    assert page.count("<svg") == 2 and "<polyline" in page  # accuracy and loss plots, drawn
    assert "width:87.5%" in page  # 1.75 of a budget of 2.0
    assert "width:100.0%" in page and "fill over" in page  # lab-b overspent: a full, red bar
    assert "<code>aaaaaaaaaaaa</code>" in page  # v1's parent hash prefix
    assert "quorum not met" in page
    assert '<a href="/">' in page  # back to the list
    # The institutions and the history come before the long tables.
    order = [page.index(f'<table class="{t}">') for t in ("institutions", "history", "rounds", "lineage")]
    assert order == sorted(order)


def test_an_empty_consortium_renders() -> None:
    snapshot = ConsortiumSnapshot("f", 0.0, [StudySnapshot(
        name="s", status="queued", total_rounds=3, rounds=[], evaluations=[], privacy=[], lineage=[], online=[],
        bytes_in=0, bytes_out=0, failures={})], [])
    page = render_study(snapshot, name="s")
    assert "no data yet" in page and "no round has opened yet" in page and "no institution has joined yet" in page
    assert "no institution has joined yet" in render_dashboard(snapshot)
    assert "no study yet" in render_dashboard(ConsortiumSnapshot("f", 0.0, [], []))


def _long_study(rounds: int) -> ConsortiumSnapshot:
    rows = [_round(n, 1, "committed", 10.0 * n, 10.0 * n + 5, train_loss=1.0 / n) for n in range(1, rounds + 1)]
    lineage = [{"version": v, "round": v, "model_sha256": f"{v:064x}", "parent_sha256": None, "contributors": [],
                "aggregator": "fedavg", "created_at": ""} for v in range(rounds + 1)]
    study = StudySnapshot(name="long", status="running", total_rounds=rounds, rounds=rows, evaluations=[],
                          privacy=[], lineage=lineage, online=[], bytes_in=0, bytes_out=0, failures={})
    return ConsortiumSnapshot("f", 0.0, [study], [])


def _table_rounds(page: str, table: str) -> list[int]:
    body = page.split(f'<table class="{table}">', 1)[1].split("</table>", 1)[0]
    cell = r'<tr><td class="n">(\d+)</td>' if table == "rounds" else r'<tr><td class="n">v(\d+)</td>'
    return [int(n) for n in re.findall(cell, body)]


def test_rounds_and_lineage_are_paged_newest_first() -> None:
    snapshot = _long_study(120)  # 120 attempts, 121 lineage versions: 3 pages each
    first = render_study(snapshot, name="long")
    assert _table_rounds(first, "rounds") == list(range(120, 120 - PAGE_ROWS, -1))
    assert _table_rounds(first, "lineage") == list(range(120, 120 - PAGE_ROWS, -1))
    assert "page 1 of 3" in first and 'href="/studies/long?rounds_page=2"' in first
    assert 'href="/studies/long?lineage_page=2"' in first
    third = render_study(snapshot, name="long", rounds_page=3, lineage_page=2)
    assert _table_rounds(third, "rounds") == list(range(20, 0, -1))
    assert _table_rounds(third, "lineage") == list(range(70, 20, -1))
    # Links keep the other table's page.
    assert 'href="/studies/long?lineage_page=2&amp;rounds_page=2"' in third  # rounds: newer
    assert 'href="/studies/long?lineage_page=3&amp;rounds_page=3"' in third  # lineage: older
    assert _table_rounds(render_study(snapshot, name="long", rounds_page=99), "rounds") == list(range(20, 0, -1))
    assert len(render_study(_long_study(2000), name="long")) < 2 * len(first)  # the page does not grow with the study
    with pytest.raises(LookupError):
        render_study(snapshot, name="other")


def test_charts_and_ticks() -> None:
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0, 2.3)[-1] >= 2.3
    assert nice_ticks(5, 5) and nice_ticks(float("nan"), 1)  # degenerate ranges still give ticks
    svg = line_chart("t", [("one point", "#123456", [(1.0, 0.5)])], y_min=0, y_max=1)
    assert svg.count("<circle") == 1 and 'fill="#123456"' in svg


def test_the_snapshot_json_has_no_nan() -> None:
    data = json.loads(_snapshot().to_json())  # strict JSON: NaN would be refused by allow_nan=False
    assert data["studies"][0]["rounds"][3]["metrics"]["central_accuracy"] is None
    assert data["studies"][0]["name"] == HOSTILE_STUDY


# ---------------------------------------------------------------- HTTP
@pytest.fixture
def server() -> Iterator[OperatorHttpServer]:
    calls = {"n": 0}

    def snapshot() -> ConsortiumSnapshot:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the store is closed")  # the first request meets a failure
        return _snapshot()

    s = OperatorHttpServer(address="127.0.0.1:0", snapshot=snapshot)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_routes(server: OperatorHttpServer) -> None:
    assert server.port
    assert _get(server.port, "/metrics")[0] == 503  # a snapshot that fails is an answer, not a dead server
    status, headers, body = _get(server.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    parse_exposition(body.decode())
    status, headers, body = _get(server.port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"] and b'<table class="studies">' in body
    status, headers, body = _get(server.port, "/api/snapshot.json?pretty=0")
    assert status == 200 and json.loads(body)["federation"] == "consortium <x>"
    assert _get(server.port, "/healthz")[:3:2] == (200, b"ok\n")
    status, headers, body = _get(server.port, "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
    assert _get(server.port, "/nowhere")[0] == 404
    status, _, body = _get(server.port, "/studies/" + HOSTILE_STUDY.replace("\n", "%0A").replace(" ", "%20"))
    assert status == 404 and b"<script" not in body  # a name of no shared pattern: not even looked up
    for path in ("/studies/", "/studies/../metrics", "/studies/a/b", "/studies/%2e%2e"):
        assert _get(server.port, path)[0] == 404, path
    assert _get(server.port, "/../etc/passwd")[0] == 404
    for method in ("POST", "PUT", "DELETE", "BREW"):
        status, headers, _ = _get(server.port, "/", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD", method


def test_study_pages_are_routed_by_name_and_paged() -> None:
    snapshot = _long_study(120)
    with OperatorHttpServer(address="127.0.0.1:0", snapshot=lambda: snapshot) as s:
        assert s.port
        status, headers, body = _get(s.port, "/")
        assert status == 200 and b'href="/studies/long"' in body
        status, headers, body = _get(s.port, "/studies/long")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert _table_rounds(body.decode(), "rounds")[0] == 120
        status, _, body = _get(s.port, "/studies/long?rounds_page=3&token=x")
        assert status == 200 and _table_rounds(body.decode(), "rounds")[0] == 20
        status, _, body = _get(s.port, "/studies/missing")
        assert status == 404 and b"no study missing" in body
        for query in ("rounds_page=0", "rounds_page=-1", "lineage_page=abc", "rounds_page=", "rounds_page=1e3",
                      "rounds_page=99999999", "lineage_page=%D9%A3"):
            status, _, body = _get(s.port, f"/studies/long?{query}")
            assert status == 400 and b"whole number" in body, query


def test_garbage_does_not_stop_the_server(server: OperatorHttpServer) -> None:
    assert server.port
    for junk in (b"\x00\xff\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"G" * 70000 + b"\r\n\r\n", b""):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    assert _get(server.port, "/healthz")[0] == 200


def test_a_bad_address_is_refused_with_the_form() -> None:
    for address in ("localhost", "127.0.0.1:http", ":8080", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="host:port"):
            OperatorHttpServer(address=address, snapshot=_snapshot)


# ---------------------------------------------------------------- JSON logs
def test_json_log_lines_are_json() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("fedcollab.test.jsonlogs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.info("round %d committed", 3, extra={"study": "trial-a", "round": 3, "where": Path("/x")})
        logger.warning('two\nlines and "quotes" \u00e9')
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one line per record, whatever the message holds
    records = [json.loads(line) for line in lines]
    assert records[0]["message"] == "round 3 committed" and records[0]["level"] == "INFO"
    assert records[0]["logger"] == "fedcollab.test.jsonlogs"
    assert records[0]["study"] == "trial-a" and records[0]["round"] == 3 and records[0]["where"] == "/x"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["ts"])
    assert records[1]["message"] == 'two\nlines and "quotes" \u00e9'
    assert "ValueError: boom" in records[2]["exc"]
    assert not {"args", "msg", "levelno", "pathname"} & set(records[0])


def test_configure_logging_writes_json_to_stderr() -> None:
    code = ("import logging; from fedcollab._logging import configure_logging; "
            "configure_logging(level=logging.INFO, fmt='json'); "
            "logging.getLogger('fedcollab.x').info('hello', extra={'institution': 'lab-a'}); "
            "logging.getLogger('fedcollab.x').debug('hidden')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert (record["logger"], record["message"], record["institution"]) == ("fedcollab.x", "hello", "lab-a")


def test_log_format_choices() -> None:
    from fedcollab.cli import build_parser

    with pytest.raises(ValueError, match="rich, json"):
        configure_logging(level=logging.INFO, fmt="xml")  # type: ignore[arg-type]
    args = build_parser().parse_args(["--log-format", "json", "coordinator", "status", "--config", "f.toml"])
    assert args.log_format == "json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--log-format", "xml", "coordinator", "status", "--config", "f.toml"])
