"""Site policy: does this institution take part in a study, and may it run this task.
Decided here, from the institution's own config; the coordinator only hears the answer."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from fedcollab.config import PolicyConfig
from fedcollab.v1 import coordinator_service_pb2 as pb


@dataclass(frozen=True)
class Decision:
    accept: bool
    reason: str = ""  # UPPER_SNAKE when declined
    message: str = ""


ACCEPT = Decision(accept=True)


def decide_study(policy: PolicyConfig, offer: pb.StudyOffer) -> Decision:
    name = offer.study.name
    if not policy.studies:
        # No list: the coordinator's default study only; a submitted one needs the site's yes.
        if not offer.is_default:
            return Decision(False, "STUDY_NOT_ACCEPTED",
                            f"study {name!r} was submitted to the coordinator, and policy.studies is empty (the "
                            "default study only): add its name or a pattern to take part")
    elif not any(fnmatch.fnmatchcase(name, pattern) for pattern in policy.studies):
        return Decision(False, "STUDY_NOT_ACCEPTED",
                        f"study {name!r} matches none of policy.studies ({', '.join(policy.studies) or 'none'})")
    kind = offer.study.model.kind
    if policy.model_kinds and kind not in policy.model_kinds:
        return Decision(False, "MODEL_KIND_NOT_ACCEPTED",
                        f"model kind {kind!r} is not in policy.model_kinds ({', '.join(policy.model_kinds)})")
    if policy.budgets.get(name) == 0:
        return Decision(False, "NO_PRIVACY_BUDGET", f"policy.budgets gives study {name!r} no privacy budget")
    if policy.max_local_epochs is not None and offer.local_epochs > policy.max_local_epochs:
        return Decision(False, "EPOCHS_OVER_LIMIT",
                        f"the study trains {offer.local_epochs} local epochs per round; policy.max_local_epochs is "
                        f"{policy.max_local_epochs}")
    if policy.require_secure_aggregation and not offer.secure_aggregation:
        return Decision(False, "SECURE_AGGREGATION_REQUIRED",
                        "policy.require_secure_aggregation: the study sends updates without secure aggregation")
    return ACCEPT


def check_task(policy: PolicyConfig, task: pb.Task, *, last_train_seconds: float | None) -> Decision:
    """Every TRAIN task, against the limits (a study's plan is the coordinator's to
    change; the limits are not)."""
    if policy.max_local_epochs is not None and task.train.local_epochs > policy.max_local_epochs:
        return Decision(False, "EPOCHS_OVER_LIMIT",
                        f"the task trains {task.train.local_epochs} local epochs; policy.max_local_epochs is "
                        f"{policy.max_local_epochs}")
    limit = policy.max_train_seconds
    if limit is not None and last_train_seconds is not None and last_train_seconds > limit:
        return Decision(False, "COMPUTE_TIME_OVER_LIMIT",
                        f"this study's last round took {last_train_seconds:.1f} s to train here; "
                        f"policy.max_train_seconds is {limit:g}")
    return ACCEPT
