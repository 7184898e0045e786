from __future__ import annotations

import pytest
import torch

from fedcollab.data import load_dataset
from fedcollab.institution import TorchTrainer, pick_device
from fedcollab.models import build_model
from fedcollab.v1 import coordinator_service_pb2 as pb

PLAN = pb.TrainPlan(local_epochs=2, batch_size=32, learning_rate=0.01, optimizer="adam")


def _train_and_evaluate(device: torch.device) -> tuple[float, float, float]:
    train, test = load_dataset("digits", seed=0)
    trainer = TorchTrainer(train=train, val=test, device=device, seed=3)
    model = build_model(kind="mlp", params={"hidden": [32]}, seed=0)
    before = trainer.evaluate(model=model).accuracy
    result = trainer.train(model=model, plan=PLAN, round_number=1)
    after = trainer.evaluate(model=model)
    assert result.num_examples == len(train) and after.num_examples == len(test)
    return before, after.accuracy, result.metrics["train_loss"]


def test_local_training_learns_on_cpu() -> None:
    before, after, loss = _train_and_evaluate(torch.device("cpu"))
    assert before < 0.3 and after > 0.85 and loss < 1.0


def test_training_is_reproducible_for_a_seed() -> None:
    train, _ = load_dataset("digits", seed=0)
    states = []
    for _ in range(2):
        model = build_model(kind="mlp", params={"hidden": [8]}, seed=0)
        TorchTrainer(train=train, val=train, device=torch.device("cpu"), seed=5).train(
            model=model, plan=PLAN, round_number=4)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_local_training_learns_on_cuda() -> None:
    assert pick_device("auto").type == "cuda"
    _, after, _ = _train_and_evaluate(torch.device("cuda"))
    assert after > 0.85


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_asking_for_cuda_without_it_says_what_to_do() -> None:
    assert pick_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match='use "auto" or "cpu"'):
        pick_device("cuda")
