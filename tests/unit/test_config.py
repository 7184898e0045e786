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
                 'num_malicious = 1\n[study.model]\nkind = "mlp"\n',
                 ["needs at least 7 updates", "min_institutions is 5"],
                 id="bulyan too few institutions"),
    pytest.param(FederationConfig, '[study]\nmin_institutions = 3\n[study.strategy]\nname = "fedmedian"\n'
                 '[study.secure_aggregation]\n[study.model]\nkind = "mlp"\n', ["cannot run with secure_aggregation"],
                 id="median under secure aggregation"),
    pytest.param(FederationConfig,
                 '[study]\nmin_institutions = 3\nupdates_per_round = 2\n[study.model]\nkind = "mlp"\n',
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


def _shipped() -> list[tuple[str, type]]:
    from fedcollab.config import StudyFile

    def cls_of(path: Path) -> type:
        text = path.read_text()
        if path.parent.name == "institutions":
            return InstitutionConfig
        return Scenario if "[simulation" in text else StudyFile if "start_after" in text else FederationConfig

    files = sorted([*REPO.glob("institutions/*.toml"), *REPO.glob("simulations/*.toml")])
    return [(str(p.relative_to(REPO)), cls_of(p)) for p in files]


@pytest.mark.parametrize("path, cls", _shipped())
def test_every_shipped_file_loads(path: str, cls: type) -> None:
    # The checks below (datasets, keys that apply, model params) must not refuse a file we ship.
    assert isinstance(load_config(cls, REPO / path), cls)


def test_every_shipped_file_is_covered() -> None:
    assert len(_shipped()) >= 17  # 2 institutions, 15 simulation and federation files


_INST = '[institution]\nname = "a"\n'
_MLP = '[study.model]\nkind = "mlp"\n'
DATA_AND_MODEL = [
    pytest.param(InstitutionConfig, _INST + '[data]\ndataset = "csv"\n',
                 ["data.dataset", "unknown dataset 'csv'", "digits, breast_cancer, fashion_mnist, npz"],
                 id="unknown dataset lists every source"),
    pytest.param(InstitutionConfig, _INST + '[data]\ndataset = "npz"\npath = "x.npz"\ntest_fraction = 0.3\n',
                 ["data.test_fraction does not apply to dataset 'npz'", "used whole"], id="npz test_fraction"),
    pytest.param(InstitutionConfig, _INST + '[data]\ndataset = "npz"\npath = "x.npz"\n'
                 '[data.partition]\nnum_partitions = 2\nindex = 0\n',
                 ["data.partition does not apply to dataset 'npz'"], id="npz partition"),
    pytest.param(InstitutionConfig, _INST + '[data]\ndataset = "npz"\npath = "x.npz"\ndata_dir = "d"\n'
                 'test_fraction = 0.3\n', ["data.data_dir, data.test_fraction do not apply"], id="npz both"),
    pytest.param(InstitutionConfig, _INST + '[data]\ndataset = "digits"\npath = "x.npz"\n',
                 ["data.path does not apply to dataset 'digits'"], id="digits with a path"),
    pytest.param(InstitutionConfig, _INST + '[data]\ndataset = "fashion_mnist"\n',
                 ['"fashion_mnist" needs `data_dir`'], id="fashion_mnist without data_dir"),
    pytest.param(InstitutionConfig, _INST + '[data]\ndataset = "npz"\npath = "x.npz"\npartiton = 3\n',
                 ["data.partiton", "unknown key"], id="npz typo"),
    pytest.param(FederationConfig, _MLP + '[study.central_evaluation]\ndataset = "npz"\n',
                 ["study.central_evaluation.dataset", "unknown dataset 'npz'", "fashion_mnist"],
                 id="central evaluation on npz"),
    pytest.param(Scenario, '[simulation]\ndataset = "csv"\n' + _MLP, ["simulation.dataset", "unknown dataset 'csv'"],
                 id="simulation of an unknown dataset"),
    pytest.param(FederationConfig, '[study.model]\nkind = "mlp"\nparams = { hiden = [8] }\n'
                 '[study.central_evaluation]\ndataset = "digits"\n',
                 ["study.model.params", "unknown param 'hiden'", "hidden: list[int]"], id="model param typo"),
    pytest.param(FederationConfig, '[study.model]\nkind = "mlp"\nparams = { in_features = "64" }\n',
                 ["study.model.params", "'in_features'", "must be int"], id="model param type"),
    pytest.param(FederationConfig, '[study.model]\nkind = "mlp"\nparams = { dropout = 1.5 }\n',
                 ["study.model.params", "dropout must be in [0, 1)"], id="model param range"),
    pytest.param(FederationConfig, '[study.model]\nkind = "mpl"\n',
                 ["study.model.kind", "unknown model kind 'mpl'", "lora_transformer"], id="model kind typo"),
]


@pytest.mark.parametrize("cls, text, expected", DATA_AND_MODEL)
def test_datasets_keys_and_model_params_are_checked_at_load(tmp_path: Path, cls: type, text: str,
                                                            expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(cls, path)
    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert "central_evaluation" not in message or "central_evaluation.dataset" in message


def test_keys_a_dataset_reads_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(_INST + '[data]\ndataset = "npz"\npath = "x.npz"\nseed = 3\nval_fraction = 0.1\nid = "ward-7"\n')
    assert load_config(InstitutionConfig, path).data.path == tmp_path / "x.npz"  # type: ignore[union-attr]
    path.write_text(_INST + '[data]\ndataset = "fashion_mnist"\ndata_dir = "fm"\ntest_fraction = 0.2\n')
    assert load_config(InstitutionConfig, path).data.data_dir == tmp_path / "fm"  # type: ignore[union-attr]


def test_a_model_built_past_validation_is_blamed_on_the_model_table() -> None:
    # model_copy skips validation: the coordinator's own build still names study.model.
    from fedcollab.config import CentralEvaluationConfig, ModelConfig
    from fedcollab.coordinator._central_eval import central_evaluator

    bad = ModelConfig(kind="mlp").model_copy(update={"params": {"hiden": [8]}})
    with pytest.raises(ConfigError, match=r"^study\.model\.params: unknown param 'hiden'"):
        central_evaluator(config=CentralEvaluationConfig(dataset="digits"), model=bad)
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


def test_an_operator_command_refuses_a_mistyped_coordinator_address(capsys: pytest.CaptureFixture[str]) -> None:
    from fedcollab.cli import main

    with pytest.raises(SystemExit) as done:
        main(["study", "list", "--coordinator", "localhost:50051x", "--insecure", "--token-file", "/dev/null"])
    out = capsys.readouterr().out
    assert done.value.code == 2 and "localhost:50051x" in out and "not a number" in out, out
