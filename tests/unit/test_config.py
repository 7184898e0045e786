"""Config files: the shipped examples load; bad files get errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcollab.config import FederationConfig, InstitutionConfig, Scenario, load_config
from fedcollab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path, cls", [
    ("simulations/digits_fedavg.toml", Scenario),
    ("simulations/digits_poisoned.toml", Scenario),
    ("simulations/federation.toml", FederationConfig),
    ("institutions/hospital-a.toml", InstitutionConfig),
    ("institutions/hospital-b.toml", InstitutionConfig),
])
def test_shipped_examples_load(path: str, cls: type) -> None:
    config = load_config(cls, REPO / path)
    assert isinstance(config, cls)


def test_relative_paths_resolve_against_the_file() -> None:
    config = load_config(InstitutionConfig, REPO / "institutions" / "hospital-a.toml")
    assert config.institution.state_dir == REPO / "institutions" / "../runs/hospital-a-state"


BAD = [
    pytest.param(FederationConfig, '[study]\nrounds = 3\n', ["study.model", "required key is missing"],
                 id="missing model"),
    pytest.param(FederationConfig, '[study]\nrounds = 0\n[study.model]\nkind = "mlp"\n',
                 ["study.rounds", "greater than or equal to 1", "(got 0)"], id="zero rounds"),
    pytest.param(FederationConfig, '[study]\nruonds = 3\n[study.model]\nkind = "mlp"\n',
                 ["study.ruonds", "unknown key"], id="typo"),
    pytest.param(FederationConfig, '[server]\nchunk_bytes = "big"\n[study.model]\nkind = "mlp"\n',
                 ["server.chunk_bytes", "valid integer", "'big'"], id="wrong type"),
    pytest.param(FederationConfig, '[study]\nmin_institutions = 3\ninstitutions_per_round = 2\n'
                 '[study.model]\nkind = "mlp"\n', ["below min_institutions"], id="quorum unreachable"),
    pytest.param(InstitutionConfig, '[institution]\nname = "bad name!"\n[data]\ndataset = "digits"\n',
                 ["institution.name", "pattern"], id="bad institution name"),
    pytest.param(InstitutionConfig, '[institution]\nname = "a"\n[data]\ndataset = "npz"\n',
                 ['needs `path`'], id="npz without path"),
    pytest.param(InstitutionConfig, '[institution]\nname = "a"\n[data]\ndataset = "digits"\n'
                 '[data.partition]\nnum_partitions = 2\nindex = 2\n', ["index 2 is out of range"],
                 id="partition index"),
    pytest.param(InstitutionConfig, '[institution]\nname = "a"\n', ["[data] table is needed"], id="no data"),
    pytest.param(FederationConfig, 'study = [1, 2\n', ["not valid TOML"], id="not toml"),
    pytest.param(FederationConfig, '[study.strategy]\nname = "fedavg"\neta = 0.1\n[study.model]\nkind = "mlp"\n',
                 ["eta do not apply to strategy 'fedavg'"], id="stray strategy setting"),
    pytest.param(FederationConfig, '[study.strategy]\nname = "fedsgd"\n[study.model]\nkind = "mlp"\n',
                 ["study.strategy.name", "fedadam"], id="unknown strategy"),
    pytest.param(FederationConfig, '[study]\nmin_institutions = 5\n[study.strategy]\nname = "bulyan"\n'
                 'num_malicious = 1\n[study.model]\nkind = "mlp"\n', ["needs at least 7 updates", "min_institutions is 5"],
                 id="bulyan too few institutions"),
    pytest.param(FederationConfig, '[study]\nmin_institutions = 3\n[study.strategy]\nname = "fedmedian"\n'
                 '[study.secure_aggregation]\n[study.model]\nkind = "mlp"\n', ["cannot run with secure_aggregation"],
                 id="median under secure aggregation"),
    pytest.param(FederationConfig, '[study]\nmin_institutions = 3\nupdates_per_round = 2\n[study.model]\nkind = "mlp"\n',
                 ["updates_per_round (2) is below min_institutions (3)"], id="over-selection below quorum"),
    pytest.param(FederationConfig, '[study]\nmax_update_norm = -1\n[study.model]\nkind = "mlp"\n',
                 ["study.max_update_norm", "greater than 0"], id="negative norm bound"),
    pytest.param(FederationConfig, '[study]\nevaluation_institutions_per_round = -1\n[study.model]\nkind = "mlp"\n',
                 ["study.evaluation_institutions_per_round", "greater than or equal to 0"],
                 id="negative evaluation sample"),
    pytest.param(FederationConfig, '[study]\nevaluation_institutions_per_round = 2.5\n[study.model]\nkind = "mlp"\n',
                 ["study.evaluation_institutions_per_round", "valid integer"], id="fractional evaluation sample"),
]


@pytest.mark.parametrize("cls, text, expected", BAD)
def test_bad_files_name_the_file_and_the_key(tmp_path: Path, cls: type, text: str, expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cls, path)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(FederationConfig, tmp_path / "nope.toml")


def test_the_shipped_study_file_parses_and_its_model_builds() -> None:
    import tomllib
    from pathlib import Path

    from fedcollab.config import StudyFile, parse_config
    from fedcollab.models import build_model

    path = Path(__file__).parents[2] / "simulations" / "study_digits_wide.toml"
    spec = parse_config(StudyFile, tomllib.loads(path.read_text()), source=str(path))
    assert spec.start_after == "digits-mlp"
    build_model(kind=spec.study.model.kind, params=spec.study.model.params)


# ---------------------------------------------------------------- addresses
ADDRESSES = [
    pytest.param("127.0.0.1:50051", True, ("127.0.0.1", 50051), id="IPv4"),
    pytest.param("coordinator.example.org:443", False, ("coordinator.example.org", 443), id="DNS name"),
    pytest.param("localhost:1", False, ("localhost", 1), id="lowest port"),
    pytest.param("0.0.0.0:65535", True, ("0.0.0.0", 65535), id="highest port"),
    pytest.param("[::1]:50051", False, ("::1", 50051), id="IPv6 in brackets"),
    pytest.param("[::]:0", True, ("::", 0), id="IPv6 any, port 0 to listen"),
    pytest.param("127.0.0.1:0", True, ("127.0.0.1", 0), id="port 0: any free one, to listen"),
    pytest.param("127.0.0.1:0", False, "port 0 is out of range", id="bad: port 0 to connect to"),
    pytest.param("127.0.0.1:99999", True, "port 99999 is out of range", id="bad: port above 65535"),
    pytest.param("127.0.0.1:655350", True, "is not a number", id="bad: six digits"),
    pytest.param("localhost:50051x", False, "the port '50051x' is not a number", id="bad: typo in the port"),
    pytest.param("localhost:-1", False, "is not a number", id="bad: negative port"),
    pytest.param("localhost: 80", False, "without a scheme", id="bad: space"),
    pytest.param("localhost", False, "it has no port", id="bad: no port"),
    pytest.param(":50051", True, "'' is not a host name", id="bad: no host"),
    pytest.param("::1:50051", False, "goes in brackets", id="bad: IPv6 without brackets"),
    pytest.param("[::g]:50051", False, "not an IPv6 address", id="bad: not IPv6"),
    pytest.param("[::1]50051", False, "needs its port after them", id="bad: no colon after brackets"),
    pytest.param("http://localhost:50051", False, "without a scheme", id="bad: URL"),
    pytest.param("dns:///localhost:50051", False, "without a scheme", id="bad: gRPC target"),
    pytest.param("", False, "empty", id="bad: empty"),
]


@pytest.mark.parametrize("address, listen, expected", ADDRESSES)
def test_addresses_are_host_and_port(address: str, listen: bool, expected: tuple[str, int] | str) -> None:
    from fedcollab._address import join_address, parse_address

    if isinstance(expected, tuple):
        assert parse_address(address, listen=listen) == expected
        assert join_address(*expected) == address
        return
    with pytest.raises(ValueError, match="not host:port") as err:
        parse_address(address, listen=listen)
    assert expected in str(err.value)


@pytest.mark.parametrize("cls, text, key", [
    pytest.param(FederationConfig, '[server]\naddress = "127.0.0.1:99999"\n', "server.address", id="coordinator"),
    pytest.param(FederationConfig, '[server]\nhttp_address = "127.0.0.1:8080x"\n', "server.http_address",
                 id="dashboard"),
    pytest.param(Scenario, '[server]\naddress = "localhost"\n', "server.address", id="scenario"),
    pytest.param(InstitutionConfig, '[institution]\nname = "a"\ntrainer = "synthetic"\n'
                 'coordinator = "localhost:50051x"\n', "institution.coordinator", id="institution"),
    pytest.param(InstitutionConfig, '[institution]\nname = "a"\ntrainer = "synthetic"\n'
                 'coordinator = "localhost:0"\n', "institution.coordinator", id="institution, port 0"),
])
def test_a_bad_address_is_refused_at_load_naming_its_key(tmp_path: Path, cls: type, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + ('[study.model]\nkind = "mlp"\n' if cls is not InstitutionConfig else ""))
    with pytest.raises(ConfigError) as err:
        load_config(cls, path)
    assert f"  {key}: " in str(err.value) and "not host:port" in str(err.value), str(err.value)


def test_port_0_and_ipv6_still_load_for_the_coordinator(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text('[server]\naddress = "[::1]:0"\nhttp_address = "127.0.0.1:0"\n[study.model]\nkind = "mlp"\n')
    server = load_config(FederationConfig, path).server
    assert (server.address, server.http_address) == ("[::1]:0", "127.0.0.1:0")
