"""Site policy: which studies an institution accepts, and the limits every task meets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcollab._names import PathEscape
from fedcollab.config import InstitutionConfig, PolicyConfig, parse_config
from fedcollab.errors import ConfigError
from fedcollab.institution._agent import name_problem, study_config
from fedcollab.institution._policy import check_task, decide_study
from fedcollab.v1 import coordinator_service_pb2 as pb


def offer(name: str = "cardio", *, kind: str = "mlp", epochs: int = 1, secagg: bool = False,
          default: bool = False) -> pb.StudyOffer:
    return pb.StudyOffer(study=pb.StudyInfo(name=name, model=pb.ModelSpec(kind=kind)), status="running",
                         local_epochs=epochs, secure_aggregation=secagg, is_default=default)


def every(**limits: object) -> PolicyConfig:
    """A policy that names every study ("*"), with these limits."""
    return PolicyConfig(studies=["*"], **limits)  # type: ignore[arg-type]


@pytest.mark.parametrize(("policy", "study", "reason"), [
    # The default policy: the coordinator's default study, never a submitted one.
    (PolicyConfig(), offer(), "STUDY_NOT_ACCEPTED"),
    (PolicyConfig(), offer(default=True), ""),
    (every(), offer(), ""),
    (PolicyConfig(studies=["cardio-*"]), offer("cardio-2026"), ""),
    (PolicyConfig(studies=["cardio-*"]), offer("oncology"), "STUDY_NOT_ACCEPTED"),
    (PolicyConfig(studies=["cardio-*"]), offer("oncology", default=True), "STUDY_NOT_ACCEPTED"),
    (PolicyConfig(studies=[]), offer(), "STUDY_NOT_ACCEPTED"),
    (every(model_kinds=["lora_transformer"]), offer(kind="mlp"), "MODEL_KIND_NOT_ACCEPTED"),
    (every(model_kinds=["mlp", "cnn"]), offer(kind="cnn"), ""),
    (every(budgets={"cardio": 0}), offer(), "NO_PRIVACY_BUDGET"),
    (every(max_local_epochs=2), offer(epochs=3), "EPOCHS_OVER_LIMIT"),
    (every(max_local_epochs=3), offer(epochs=3), ""),
    (every(require_secure_aggregation=True), offer(), "SECURE_AGGREGATION_REQUIRED"),
    (every(require_secure_aggregation=True), offer(secagg=True), ""),
])
def test_a_study_is_accepted_or_declined_with_its_reason(policy: PolicyConfig, study: pb.StudyOffer,
                                                         reason: str) -> None:
    decision = decide_study(policy, study)
    assert decision.accept == (reason == "")
    assert decision.reason == reason
    if reason:
        assert decision.message  # says what in the policy decided it


def test_every_task_meets_the_limits_whatever_the_study_said() -> None:
    policy = PolicyConfig(max_local_epochs=2, max_train_seconds=10)
    task = pb.Task(kind=pb.TASK_KIND_TRAIN, train=pb.TrainPlan(local_epochs=5))
    assert check_task(policy, task, last_train_seconds=None).reason == "EPOCHS_OVER_LIMIT"
    task = pb.Task(kind=pb.TASK_KIND_TRAIN, train=pb.TrainPlan(local_epochs=2))
    assert check_task(policy, task, last_train_seconds=3.0).accept
    slow = check_task(policy, task, last_train_seconds=12.5)
    assert slow.reason == "COMPUTE_TIME_OVER_LIMIT" and "12.5 s" in slow.message


def _config(policy: str = "", privacy: str = "") -> InstitutionConfig:
    import tomllib

    text = f'[institution]\nname = "site"\nstate_dir = "/tmp/site"\n[data]\ndataset = "digits"\n{privacy}{policy}'
    return parse_config(InstitutionConfig, tomllib.loads(text), source="institution.toml")


def test_each_study_gets_its_own_state_folder_and_the_site_keeps_its_budget() -> None:
    config = _config('[policy]\nbudgets = { cardio = 2.0 }\n',
                     '[privacy]\ntarget_epsilon = 4.0\nbudget_epsilon = 6.0\n')
    cardio = study_config(config, offer("cardio"))
    assert str(cardio.institution.state_dir) == str(Path("/tmp/site/studies/cardio").resolve())
    # The budget is the site's, whichever study: the sub-limit is applied inside it
    # (InstitutionPrivacy.study_limit), not by handing the study a budget of its own.
    assert cardio.privacy == config.privacy
    other = study_config(config, offer("other", default=True))
    assert str(other.institution.state_dir) == "/tmp/site"  # the default study keeps the top of the folder
    assert other.privacy is not None and other.privacy.budget == 6.0


BAD_NAMES = ["../../escaped-T", "/abs/path", "a/../../b", "x\x00y", "x\ny", "..", "Cardio", "", "a" * 64]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_no_study_name_is_refused(name: str) -> None:
    assert name_problem(offer(name))
    assert not name_problem(offer("cardio-2026_b"))


@pytest.mark.parametrize("name", ["../../escaped-T", "/abs/path", "a/../../b", "x\x00y", ".."])
def test_a_folder_outside_studies_is_refused_even_past_the_name_check(name: str, tmp_path: Path) -> None:
    config = _config().model_copy(update={"institution": _config().institution.model_copy(
        update={"state_dir": tmp_path / "site"})})
    with pytest.raises(PathEscape):
        study_config(config, offer(name))
    assert not tmp_path.joinpath("site").exists()


def test_a_sub_limit_above_the_site_budget_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"policy\.budgets .* exceed the site's privacy budget"):
        _config('[policy]\nbudgets = { cardio = 9.0 }\n', '[privacy]\ntarget_epsilon = 4.0\nbudget_epsilon = 6.0\n')


@pytest.mark.parametrize(("policy", "expected"), [
    ('[policy]\nbudgets = { cardio = -1 }\n', "policy.budgets"),
    ('[policy]\nmax_local_epochs = 0\n', "policy.max_local_epochs"),
    ('[policy]\nstudy = ["x"]\n', "policy.study"),
])
def test_a_malformed_policy_names_its_key(policy: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        _config(policy)
