"""The operators' endpoint over a real federation: 2 institutions run 2 rounds, then
/metrics and /api/snapshot.json are checked against the coordinator's store, and a
real headless browser (Debian's chromium) loads the dashboard."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcollab.coordinator import Coordinator
from fedcollab.coordinator._dashboard import BLUE, GREEN, ORANGE, render_study
from fedcollab.coordinator._http import OperatorHttpServer
from fedcollab.coordinator._snapshot import snapshot_of
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until
from tests.unit.test_metrics_and_dashboard import parse_exposition

pytestmark = pytest.mark.integration
NAMES = ["hospital-a", "lab-b"]
STUDY = "dashboard-trial"
APT = "apt-get install -y --no-install-recommends chromium"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Coordinator, OperatorHttpServer]]:
    root = tmp_path_factory.mktemp("dashboard")
    config = tiny_federation(root / "coordinator", name=STUDY, rounds=2, min_institutions=2)
    with Coordinator(config=config) as coordinator:
        daemons = [recording_daemon(institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i,
                                                       parts=len(NAMES), state_root=root))[0]
                   for i, n in enumerate(NAMES)]
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=90), "the study did not finish"
            wait_until(lambda: len(outcome) == len(NAMES), timeout=20, what="daemons to finish")
        assert coordinator.engine.failure is None, coordinator.engine.failure
        http = OperatorHttpServer(address="127.0.0.1:0", snapshot=lambda: snapshot_of(coordinator))
        http.start()
        try:
            yield coordinator, http
        finally:
            http.stop()


def _fetch(port: int | None, path: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.headers["Content-Type"], r.read()


def test_the_endpoints_tell_what_the_store_holds(federation: tuple[Coordinator, OperatorHttpServer]) -> None:
    coordinator, http = federation
    store, engine = coordinator.store, coordinator.engine
    rounds = store.rounds()
    committed = [r for r in rounds if r["status"] == "committed"]
    assert [r["round"] for r in committed] == [1, 2]

    kind, body = _fetch(http.port, "/api/snapshot.json")
    assert kind == "application/json"
    snap = json.loads(body)
    assert snap["federation"] == coordinator.config.federation.name
    [study] = snap["studies"]
    assert (study["name"], study["status"], study["total_rounds"]) == (STUDY, "finished", 2)
    assert study["rounds"] == json.loads(json.dumps(rounds))  # every row, metrics included
    assert study["evaluations"] == json.loads(json.dumps(store.evaluations()))
    assert {"eval_accuracy", "central_accuracy", "train_loss", "eval_loss"} <= set(committed[-1]["metrics"])
    assert (study["bytes_in"], study["bytes_out"]) == (engine.bytes_in, engine.bytes_out) and engine.bytes_in > 0
    models = {m.version: m.sha256 for m in store.models()}
    assert [e["version"] for e in study["lineage"]] == [0, 1, 2]
    for e in study["lineage"][1:]:
        assert e["model_sha256"] == models[e["version"]] and e["parent_sha256"] == models[e["version"] - 1]
        assert e["contributors"] == NAMES and e["aggregator"] == "fedavg"
    assert [(i["name"], i["status"], i["num_train_examples"]) for i in snap["institutions"]] == [
        (i["name"], "approved", i["num_train_examples"]) for i in store.institutions()]
    assert [i["name"] for i in snap["institutions"]] == NAMES

    kind, body = _fetch(http.port, "/metrics")
    assert kind.startswith("text/plain; version=0.0.4")
    families, samples = parse_exposition(body.decode())
    by = {(n, tuple(sorted(labels.items()))): v for n, labels, v in samples}
    s = (("study", STUDY),)
    assert by[("fedcollab_rounds_committed_total", s)] == 2
    assert by[("fedcollab_rounds_failed_total", s)] == 0
    assert by[("fedcollab_current_round", s)] == 2
    assert by[("fedcollab_model_version", s)] == 2
    assert by[("fedcollab_received_bytes_total", s)] == engine.bytes_in
    assert by[("fedcollab_sent_bytes_total", s)] == engine.bytes_out
    assert by[("fedcollab_study_status", (("status", "finished"), *s))] == 1
    assert by[("fedcollab_institutions", (("status", "approved"),))] == 2
    assert by[("fedcollab_round_duration_seconds_count", s)] == 2
    durations = [r["closed_at"] - r["opened_at"] for r in committed]
    assert by[("fedcollab_round_duration_seconds_sum", s)] == pytest.approx(sum(durations))
    assert by[("fedcollab_round_duration_seconds_bucket", (("le", "+Inf"), *s))] == 2
    assert by[("fedcollab_institutions_connected", s)] == len(engine.online_institutions())
    assert by[("fedcollab_study_status", (("status", "failed"), *s))] == 0  # there, for an alert to watch

    # The landing page lists the study and links to its page, which has the rounds.
    kind, body = _fetch(http.port, "/")
    assert kind.startswith("text/html")
    page = body.decode()
    assert f'<a class="study-link" href="/studies/{STUDY}">{STUDY}</a>' in page and '<table class="rounds">' not in page
    history = page.split('<table class="history">', 1)[1].split("</table>", 1)[0]
    assert ">finished<" in history and all(f"<td>{name}</td>" in history for name in NAMES)  # their first joins
    _, body = _fetch(http.port, f"/studies/{STUDY}")
    assert body.decode().count('<table class="rounds">') == 1
    with pytest.raises(urllib.error.HTTPError) as e:
        _fetch(http.port, "/studies/no-such-study")
    assert e.value.code == 404


def test_pauses_and_suspensions_are_in_the_history(tmp_path: Path) -> None:
    """What the operator did, with when and by whom, as the page shows it: a pause and
    a resume of the study, an institution suspended and approved again."""
    config = tiny_federation(tmp_path / "coordinator", name=STUDY, rounds=2, min_institutions=2,
                             central_evaluation=None)
    with Coordinator(config=config) as coordinator:
        coordinator.studies.change(name=STUDY, action="pause", reason="site maintenance", by="alice")
        coordinator.consortium.set_membership("lab-b", status="suspended", reason="audit", changed_by="bob")
        coordinator.studies.change(name=STUDY, action="resume", reason="", by="alice")
        coordinator.consortium.set_membership("lab-b", status="approved", changed_by="bob")
        snapshot = snapshot_of(coordinator)
    [study] = snapshot.studies
    assert [(h["status"], h["note"]) for h in study.history] == [
        ("running", "resumed by alice"), ("paused", "paused by alice: site maintenance"),
        ("running", "the federation's default study")]
    assert [(h["subject"], h["status"], h["note"], h["changed_by"]) for h in snapshot.membership_history] == [
        ("lab-b", "approved", "", "bob"), ("lab-b", "suspended", "audit", "bob")]
    times = [h["at"] for h in sorted([*study.history, *snapshot.membership_history], key=lambda h: h["at"])]
    assert times == sorted(times) and snapshot.taken_at - 60 < times[0] <= times[-1] <= snapshot.taken_at
    page = render_study(snapshot, name=STUDY)
    rows = page.split('<table class="history">', 1)[1].split("</table>", 1)[0].split("<tr>")[2:]
    assert ["resumed by alice" in rows[1], ">approved<" in rows[0], "audit" in rows[2],
            "site maintenance" in rows[3]] == [True] * 4


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no chromium on PATH: the dashboard's browser test needs it (Debian/Ubuntu: `{APT}`)")


def test_a_headless_browser_renders_the_dashboard(federation: tuple[Coordinator, OperatorHttpServer],
                                                  tmp_path: Path) -> None:
    browser = _chromium()
    coordinator, http = federation
    url = f"http://127.0.0.1:{http.port}/studies/{STUDY}"  # the study's own page (/ lists the studies)
    png = tmp_path / "dash.png"

    def command(profile: str, *args: str) -> list[str]:
        return [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / profile}", *args, url]

    # Both at once, each with its own profile: the test's time is one browser start.
    dom = subprocess.Popen(command("dom", "--dump-dom"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shot = subprocess.Popen(command("shot", f"--screenshot={png}", "--window-size=1280,2000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dom_out, dom_err = dom.communicate(timeout=90)
        _, shot_err = shot.communicate(timeout=90)
    finally:
        for p in (dom, shot):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert dom.returncode == 0, dom_err[-2000:]
    assert shot.returncode == 0 and png.is_file(), shot_err[-2000:]

    # What the browser built from the page: the study, its rounds, the institutions, the plots.
    assert f'<span class="study-name">{STUDY}</span>' in dom_out
    assert ">finished<" in dom_out
    rounds_table = dom_out.split('<table class="rounds">', 1)[1].split("</table>", 1)[0]
    assert rounds_table.count("<tr>") == 1 + len(coordinator.store.rounds())
    for number in (1, 2):
        assert f'<td class="n">{number}</td>' in rounds_table
    for name in NAMES:
        assert f'<td class="inst">{name}</td>' in dom_out
    assert dom_out.count("<svg") == 2 and dom_out.count('class="series"') == 5  # 2 accuracy + 3 loss series

    # What it drew: a full-size, non-blank picture with the series' colours in the plots.
    width, height, pixels = decode_png(png.read_bytes())
    assert (width, height) == (1280, 2000)
    rgb = pixels[..., :3].astype(np.int16)
    ink = np.any(rgb < 235, axis=-1)
    assert ink.mean() > 0.02, f"the screenshot is blank: {ink.mean():.2%} of its pixels are not white"
    for colour in (BLUE, ORANGE, GREEN):
        target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
        ys, xs = np.nonzero(np.all(np.abs(rgb - target) <= 24, axis=-1))
        assert len(ys) >= 40, f"{colour}: {len(ys)} pixels of the series colour in the screenshot"
        # The plots come first, under the study's figures: every pixel of the colour is up there.
        assert ys.max() < 1000 and xs.max() < 1280, (colour, ys.max(), xs.max())


def decode_png(data: bytes) -> tuple[int, int, Any]:
    """(width, height, pixels as a height x width x channels uint8 array) of an 8-bit,
    non-interlaced RGB or RGBA PNG: what Chromium writes. No imaging library needed."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0], kind
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    assert header is not None, "no IHDR"
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    assert raw.size == height * (stride + 1), "truncated image data"
    rows = raw.reshape(height, stride + 1)
    out = np.empty((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # Sub: a running sum along the row, per channel
            cur = (np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint32) % 256).astype(np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = line + prev
        else:  # Average and Paeth depend on the pixel just decoded: byte by byte
            cur = np.frombuffer(_unfilter(int(kind), line.tobytes(), prev.tobytes(), bpp), dtype=np.uint8)
        out[y] = cur
        prev = cur
    return width, height, out.reshape(height, width, bpp)


def _unfilter(kind: int, line: bytes, prev: bytes, bpp: int) -> bytearray:
    assert kind in (3, 4), f"unknown PNG filter {kind}"
    cur = bytearray(len(line))
    for i, x in enumerate(line):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (x + ((a + b) >> 1)) & 0xFF
            continue
        c = prev[i - bpp] if i >= bpp else 0
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
        cur[i] = (x + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    return cur
