"""Site policy: which studies an institution accepts, and the limits every task meets."""

from __future__ import annotations

import pytest

from fedcollab.config import InstitutionConfig, PolicyConfig, parse_config
from fedcollab.errors import ConfigError
from fedcollab.institution._agent import study_config
from fedcollab.institution._policy import check_task, decide_study
from fedcollab.v1 import coordinator_service_pb2 as pb


def offer(name: str = "cardio", *, kind: str = "mlp", epochs: int = 1, secagg: bool = False,
          default: bool = False) -> pb.StudyOffer:
    return pb.StudyOffer(study=pb.StudyInfo(name=name, model=pb.ModelSpec(kind=kind)), status="running",
                         local_epochs=epochs, secure_aggregation=secagg, is_default=default)


@pytest.mark.parametrize(("policy", "study", "reason"), [
    (PolicyConfig(), offer(), ""),
    (PolicyConfig(studies=["cardio-*"]), offer("cardio-2026"), ""),
    (PolicyConfig(studies=["cardio-*"]), offer("oncology"), "STUDY_NOT_ACCEPTED"),
    (PolicyConfig(studies=[]), offer(), "STUDY_NOT_ACCEPTED"),
    (PolicyConfig(model_kinds=["lora_transformer"]), offer(kind="mlp"), "MODEL_KIND_NOT_ACCEPTED"),
    (PolicyConfig(model_kinds=["mlp", "cnn"]), offer(kind="cnn"), ""),
    (PolicyConfig(budgets={"cardio": 0}), offer(), "NO_PRIVACY_BUDGET"),
    (PolicyConfig(max_local_epochs=2), offer(epochs=3), "EPOCHS_OVER_LIMIT"),
    (PolicyConfig(max_local_epochs=3), offer(epochs=3), ""),
    (PolicyConfig(require_secure_aggregation=True), offer(), "SECURE_AGGREGATION_REQUIRED"),
    (PolicyConfig(require_secure_aggregation=True), offer(secagg=True), ""),
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


def test_each_study_gets_its_own_state_folder_and_the_budget_its_policy_gives() -> None:
    config = _config('[policy]\nbudgets = { cardio = 2.0 }\n', '[privacy]\ntarget_epsilon = 4.0\nbudget_epsilon = 6.0\n')
    cardio = study_config(config, offer("cardio"))
    assert str(cardio.institution.state_dir) == "/tmp/site/studies/cardio"
    assert cardio.privacy is not None and (cardio.privacy.budget, cardio.privacy.target_epsilon) == (2.0, 2.0)
    other = study_config(config, offer("other", default=True))
    assert str(other.institution.state_dir) == "/tmp/site"  # the default study keeps the top of the folder
    assert other.privacy is not None and other.privacy.budget == 6.0


@pytest.mark.parametrize(("policy", "expected"), [
    ('[policy]\nbudgets = { cardio = -1 }\n', "policy.budgets"),
    ('[policy]\nmax_local_epochs = 0\n', "policy.max_local_epochs"),
    ('[policy]\nstudy = ["x"]\n', "policy.study"),
])
def test_a_malformed_policy_names_its_key(policy: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        _config(policy)
