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


def _drift(*, mu: float, private: bool) -> float:
    """How far local training moves the model from the round's base, with FedProx's mu."""
    from fedcollab.privacy._opacus import train_private

    train, _ = load_dataset("digits", seed=0)
    model = build_model(kind="mlp", params={"hidden": [16]}, seed=0)
    base = [p.detach().clone() for p in model.parameters()]
    plan = pb.TrainPlan(local_epochs=2, batch_size=64, learning_rate=0.1, optimizer="sgd", proximal_mu=mu)
    if private:
        train_private(model=model, x=torch.from_numpy(train.x), y=torch.from_numpy(train.y), epochs=2, batch_size=64,
                      optimizer="sgd", learning_rate=0.1, noise_multiplier=0.5, max_grad_norm=1.0, mode="hooks",
                      generator=torch.Generator().manual_seed(0), proximal_mu=mu)
    else:
        TorchTrainer(train=train, val=train, device=torch.device("cpu"), seed=1).train(model=model, plan=plan,
                                                                                      round_number=1)
    return float(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), base, strict=True)) ** 0.5)


@pytest.mark.parametrize("private", [False, True])
def test_fedprox_keeps_local_training_near_the_round_base(private: bool) -> None:
    free, held = _drift(mu=0.0, private=private), _drift(mu=2.0, private=private)
    assert held < 0.8 * free, (free, held)
