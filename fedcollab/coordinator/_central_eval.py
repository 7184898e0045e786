"""Server-side evaluation of each committed model on a dataset's global test split."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fedcollab import models
from fedcollab.config import CentralEvaluationConfig, ModelConfig
from fedcollab.coordinator._engine import Evaluator
from fedcollab.errors import ConfigError


def central_evaluator(*, config: CentralEvaluationConfig, model: ModelConfig) -> Evaluator:
    # Imported here: the datasets pull in scikit-learn and SciPy (about 60 MiB resident),
    # which a coordinator without central evaluation never needs.
    from fedcollab.data import load_dataset

    try:  # the model first: its errors are study.model's, not central evaluation's
        net = models.build_model(kind=model.kind, params=model.params)
    except ValueError as e:
        raise ConfigError(f"study.model.params: {e}") from None
    try:
        _, test = load_dataset(config.dataset, seed=config.seed, test_fraction=config.test_fraction,
                               data_dir=config.data_dir)
    except ValueError as e:
        raise ConfigError(f"study.central_evaluation: {e}") from None
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)

    @torch.no_grad()
    def evaluate(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        net.load_state_dict(dict(tensors), strict=True)
        net.eval()
        logits = torch.cat([net(x[i : i + 1024]) for i in range(0, len(y), 1024)])
        return {
            "loss": F.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(dim=1) == y).float().mean().item(),
            "examples": float(len(y)),
        }

    return evaluate
