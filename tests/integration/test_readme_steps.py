"""README's enrolment and mutual-TLS steps, run as written, so the docs cannot drift.

The blocks README.md marks `<!-- tested: ... -->` are read from the file itself: the
enrolment commands, the TOML tables it says to add to which file, and the commands that
run the federation. They are run from a copy of the checkout's config files, as a new
user would from the checkout. Only what a test must change is changed, after the README's
steps and where said below: addresses (port 0, never a fixed port), one round, and the
institutions' trainer (synthetic updates instead of DP-SGD, for speed: the TLS, the files
and the Join are what is tested here). A wrong table name, a path that does not resolve
from the file's folder, a file the README does not name, a command that no longer exists:
each fails here.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedcollab import cli
from fedcollab.config import FederationConfig, InstitutionConfig, TlsConfig, load_config
from fedcollab.errors import ConfigError

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
BLOCK = re.compile(r"^<!-- tested: (?P<what>[\w-]+)(?: (?P<target>[\w./-]+))?[^\n]*-->\n```(?P<lang>\w+)\n"
                   r"(?P<body>.*?)^```$", re.S | re.M)
README_TEXT = (REPO / "README.md").read_text(encoding="utf-8")


@dataclass
class Steps:
    enrolment: list[list[str]] = field(default_factory=list)  # argv after `fedcollab`
    tables: dict[str, list[str]] = field(default_factory=dict)  # config file -> TOML to add at its end
    run: list[list[str]] = field(default_factory=list)


def _commands(body: str) -> list[list[str]]:
    commands = []
    for line in body.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words == [".", ".venv/bin/activate"]:
            continue
        assert words[0] == "fedcollab", f"README step {line!r} is not a fedcollab command: teach this test to run it"
        commands.append(words[1:])
    return commands


def readme_steps(text: str) -> Steps:
    steps = Steps()
    for block in BLOCK.finditer(text):
        what, target, lang, body = block["what"], block["target"], block["lang"], block["body"]
        if what == "enrolment":
            assert lang == "bash" and not steps.enrolment, "one enrolment block, in bash"
            steps.enrolment = _commands(body)
        elif what == "run":
            assert lang == "bash" and not steps.run, "one run block, in bash"
            steps.run = _commands(body)
        elif what == "tls":
            assert lang == "toml" and target, "a tls block is TOML and names its file"
            steps.tables.setdefault(target, []).append(body)
        else:
            raise AssertionError(f"unknown tested block {what!r}")
    assert steps.enrolment and steps.run and steps.tables, "README lost its tested blocks"
    return steps


def _config_of(argv: list[str]) -> str:
    return argv[argv.index("--config") + 1]


@dataclass
class Checkout:
    root: Path
    coordinator: list[str]  # the run block's `coordinator serve` argv
    institutions: list[list[str]]
    status: list[str]


def _main(argv: list[str]) -> str:
    """`fedcollab ARGV` through its entry point, in this process (a fresh one per pki
    step would import torch nine times); what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code in (0, None), f"`fedcollab {shlex.join(argv)}` failed:\n{out.getvalue()}"
    return out.getvalue()


def enrol(steps: Steps, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The enrolment commands, in the checkout, through the `fedcollab` entry point; each
    leaves the files the README says it does."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(cli.console, "_width", 200)
    parser = cli.build_parser()
    for argv in steps.enrolment:
        assert argv[0] == "pki", f"enrolment step `fedcollab {shlex.join(argv)}`: teach this test what it leaves"
        _main(argv)
        args = parser.parse_args(argv)
        if args.action == "init":
            made = [Path(args.dir) / f for f in ("ca.pem", "ca-key.pem", "crl.pem")]
        elif args.action == "request":
            name = args.institution or args.operator or args.coordinator
            made = [Path(args.dir) / f"{name}-key.pem", Path(args.dir) / f"{name}.csr"]
        elif args.action == "sign":
            made = [Path(args.out) if args.out else Path(args.csr).with_suffix(".pem")]
        else:
            raise AssertionError(f"enrolment step `fedcollab {shlex.join(argv)}`: teach this test what it leaves")
        for path in made:
            assert (root / path).is_file(), f"`fedcollab {shlex.join(argv)}` did not leave {path}"


def configure(steps: Steps, root: Path) -> Checkout:
    """Copy the config files the run block uses, add the README's tables to the files it
    names, and check that each file loads with mutual TLS whose every file exists."""
    serve = [a for a in steps.run if a[:2] == ["coordinator", "serve"]]
    daemons = [a for a in steps.run if a[:2] == ["institution", "run"]]
    status = [a for a in steps.run if a[:2] == ["coordinator", "status"]]
    others = [a for a in steps.run if a not in serve + daemons + status]
    assert len(serve) == 1 and daemons and len(status) == 1 and not others, steps.run
    used = [_config_of(a) for a in serve + daemons]
    assert set(steps.tables) == set(used), f"README adds tables to {sorted(steps.tables)}, runs {used}"
    for name in used:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        text = (REPO / name).read_text(encoding="utf-8")
        (root / name).write_text(text + "\n" + "\n".join(steps.tables[name]) + "\n", encoding="utf-8")
    federation = load_config(FederationConfig, root / _config_of(serve[0]))
    _files_exist(federation.server.tls, what=f"{_config_of(serve[0])} [server.tls]", crl=True)
    for argv in daemons:
        _files_exist(load_config(InstitutionConfig, root / _config_of(argv)).tls, what=f"{_config_of(argv)} [tls]")
    return Checkout(root=root, coordinator=serve[0], institutions=daemons, status=status[0])


def _files_exist(tls: TlsConfig | None, *, what: str, crl: bool = False) -> None:
    assert tls is not None, f"{what}: no mutual TLS configured"
    for key in ("ca_cert", "cert", "key", *(("crl",) if crl else ())):
        path = getattr(tls, key)
        assert path is not None and Path(path).is_file(), f"{what} {key} = {path}: no such file"


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout after the README's enrolment: pki/ and keys/ (made once per module)."""
    root = tmp_path_factory.mktemp("enrolled")
    with pytest.MonkeyPatch.context() as monkeypatch:
        enrol(readme_steps(README_TEXT), root, monkeypatch)
    return root


@pytest.fixture
def checkout(enrolled: Path, tmp_path: Path) -> Path:
    """A fresh copy of the enrolled checkout (the config files are added per test)."""
    shutil.copytree(enrolled, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _edit(path: Path, pattern: str, replacement: str) -> None:
    text = path.read_text(encoding="utf-8")
    new, n = re.subn(pattern, replacement, text, flags=re.M)
    assert n == 1, f"{path}: expected one {pattern!r}"
    path.write_text(new, encoding="utf-8")


def _drain(proc: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait_for(what: str, check: object, *, timeout: float, procs: list[subprocess.Popen[str]],
              outputs: dict[str, list[str]]) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := check()) is not None:  # type: ignore[operator]
            return found
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    shown = "\n".join(f"--- {name}\n{''.join(out)}" for name, out in outputs.items())
    raise AssertionError(f"{what}: not within {timeout:g} s, or a process exited:\n{shown}")


@pytest.mark.timeout(420)  # mostly three processes starting: seconds on a quiet machine, minutes on a crowded one
def test_readme_enrolment_and_mutual_tls_run_as_written(checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcollab.coordinator import Store

    steps = readme_steps(README_TEXT)
    run = configure(steps, checkout)
    federation_toml = checkout / _config_of(run.coordinator)
    # For the test only: any free port, one round, synthetic updates (see the docstring).
    _edit(federation_toml, r'^address = "[^"]*"', 'address = "127.0.0.1:0"')
    _edit(federation_toml, r'^http_address = "[^"]*"', 'http_address = "127.0.0.1:0"')
    _edit(federation_toml, r"^rounds = \d+", "rounds = 1")
    state = Path(load_config(FederationConfig, federation_toml).server.state_dir)
    outputs: dict[str, list[str]] = {"coordinator": []}
    procs: list[subprocess.Popen[str]] = []

    def start(argv: list[str], lines: list[str]) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "fedcollab", *argv], cwd=checkout, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        _drain(proc, lines)

    try:
        start(run.coordinator, outputs["coordinator"])
        port = _wait_for("the coordinator says where it listens", lambda: next(
            (m[1] for line in outputs["coordinator"] if (m := re.search(r"serving study .* on 127\.0\.0\.1:(\d+)",
                                                                         line))), None),
            timeout=120, procs=procs, outputs=outputs)
        for argv in run.institutions:
            path = checkout / _config_of(argv)
            _edit(path, r'^coordinator = "[^"]*"', f'coordinator = "127.0.0.1:{port}"')
            _edit(path, r"^\[institution\]$", '[institution]\ntrainer = "synthetic"')
            _edit(path, r"^\[privacy\]\n(?:(?!\[).*\n)*", "")  # DP-SGD needs the torch trainer
            outputs[path.stem] = []
            start(argv, outputs[path.stem])

        def committed() -> dict[str, object] | None:
            if not (state / "coordinator.sqlite").is_file():
                return None
            store = Store(state / "coordinator.sqlite", read_only=True)
            try:
                return next((r for r in store.rounds() if r["status"] == "committed"), None)
            finally:
                store.close()

        first = _wait_for("round 1 commits", committed, timeout=180, procs=procs, outputs=outputs)
        # Every institution of the run block joined over mutual TLS and sent its update.
        assert int(first["metrics"]["num_updates"]) == len(run.institutions), first  # type: ignore[index]
        monkeypatch.chdir(checkout)
        monkeypatch.setattr(cli.console, "_width", 200)
        status = _main(run.status)
        assert re.search(r"│ 1\s+│ 1\s+│ committed", status), status
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for name, lines in outputs.items():
        text = "".join(lines)
        assert "Traceback" not in text and "PLAINTEXT" not in text, f"--- {name}\n{text}"


@pytest.mark.parametrize("old, new, expected", [
    ("[server.tls]\n", "[tls]\n", "tls: unknown key"),  # the coordinator's table, named as an institution's
    ('ca_cert = "../pki/ca.pem"', 'ca_cert = "pki/ca.pem"', "ca_cert = "),  # not resolved from the file's folder
    ('key = "../keys/hospital-b-key.pem"', 'key = "../keys/hospital-b.key"', "key = "),
    ("<!-- tested: tls institutions/hospital-b.toml -->", "<!-- tested: tls institutions/hospital-c.toml -->",
     "README adds tables to"),  # a file the run block does not use
], ids=["table name", "relative path", "file name", "which file"])
def test_this_test_catches_a_drifted_readme(checkout: Path, old: str, new: str, expected: str) -> None:
    """The checks `test_readme_enrolment_and_mutual_tls_run_as_written` relies on fail
    for the mistakes the README once had (so they cannot come back unnoticed)."""
    assert old in README_TEXT, f"{old!r} is no longer in README.md: update this case"
    with pytest.raises((AssertionError, ConfigError)) as failed:
        configure(readme_steps(README_TEXT.replace(old, new, 1)), checkout)
    assert expected in str(failed.value), failed.value


def test_the_institutions_readme_shows_the_same_table() -> None:
    """institutions/README.md repeats hospital-a's [tls] table: it must be README's."""
    ours = readme_steps(README_TEXT).tables
    theirs = [b for b in BLOCK.finditer((REPO / "institutions" / "README.md").read_text(encoding="utf-8"))]
    assert theirs, "institutions/README.md lost its tested [tls] block"
    for block in theirs:
        assert block["what"] == "tls" and block["target"] in ours, block[0]
        assert [tomllib.loads(block["body"])] == [tomllib.loads(t) for t in ours[block["target"]]], block[0]
