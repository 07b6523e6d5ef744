"""The masked forward of gated blocks (models/blocks.py ``forward_masked``)."""
import torch

from spnet_dist.models import create_model

from .test_resnet import _mixed_routers


def test_inference_masked_path_is_bitwise_the_training_arithmetic_and_keeps_its_input():
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20")
    x = torch.randn(8, 3, 32, 32)
    _mixed_routers(model, x)
    x_before = x.clone()
    with torch.no_grad():
        in_place = model(x)  # res.mul_(v).add_(shortcut).relu_()
    assert torch.equal(x, x_before)
    with torch.enable_grad():
        out_of_place = model(x.clone().requires_grad_(True))  # relu(shortcut + res * v), autograd
    assert (in_place.gate_decisions.sum(0) % 8 != 0).any()
    assert torch.equal(in_place.logits, out_of_place.logits.detach())
    assert torch.equal(in_place.gate_decisions, out_of_place.gate_decisions.detach())
