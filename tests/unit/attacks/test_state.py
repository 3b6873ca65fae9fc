"""Attacks leave the model as found: modes, requires_grad flags, .grad, buffers, RNG, torch.no_grad, Tensor.detach."""

import pytest
import torch

from anomalib_robust.attacks import APGD, PGD, AutoAttack, Square


@pytest.mark.parametrize("attack_class", [PGD, APGD, Square, AutoAttack])
def test_model_and_global_state_are_restored(detector: torch.nn.Module, batch: tuple, attack_class: type) -> None:
    images, labels = batch
    detector.train()
    detector.model.conv.weight.requires_grad_(True)
    detector.model.conv.bias.requires_grad_(False)
    with torch.inference_mode():
        detector.model.register_buffer("made_in_inference", torch.ones(1))
    buffer = detector.model.made_in_inference
    no_grad, detach = torch.no_grad, torch.Tensor.detach
    rng = torch.get_rng_state()
    settings = {"n_queries": 5} if attack_class in {Square, AutoAttack} else {}
    if attack_class is not Square:
        settings["steps"] = 2
    attack_class(detector, eps=4 / 255, **settings)(images, labels)
    assert all(module.training for module in detector.modules())
    assert detector.model.conv.weight.requires_grad and not detector.model.conv.bias.requires_grad
    assert all(parameter.grad is None for parameter in detector.parameters())
    assert detector.model.made_in_inference is buffer
    assert torch.no_grad is no_grad and torch.Tensor.detach is detach
    assert torch.equal(torch.get_rng_state(), rng)
