"""The full SP-Net objective on a tiny CIFAR ResNet, in plain PyTorch (no DeepSpeed)."""
import pytest
import torch

from spnet_dist.losses import SPNetCriterion
from spnet_dist.models import create_model
from spnet_dist.teacher import EMATeacher


def _setup(seed=0):
    torch.manual_seed(seed)
    model = create_model("spnet_cifar_resnet20", num_classes=10, block_align=False).train()
    teacher = EMATeacher(model, momentum=0.7)
    criterion = SPNetCriterion(cost_weight=1.0, target_rate=0.6)  # every term on
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    # Class-dependent colour offsets: the stage-1 head only sees globally pooled 16-channel
    # features, which cannot tell pure-noise images apart.
    targets = torch.arange(8) % 4
    offsets = torch.randn(4, 3, 1, 1)
    images = torch.randn(8, 3, 32, 32) + 2.0 * offsets[targets]
    return model, teacher, criterion, optimizer, images, targets


def _step(model, teacher, criterion, optimizer, images, targets):
    terms = criterion(model(images), targets, teacher(images))
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    teacher.update(model)
    return terms


def test_one_step_all_terms_finite_and_teacher_has_no_grad():
    model, teacher, criterion, optimizer, images, targets = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    terms = _step(model, teacher, criterion, optimizer, images, targets)
    assert set(terms) == {"cls", "path", "logits", "evo", "cost", "total"}
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())


@pytest.mark.slow  # 50 full SP-Net steps of ResNet-20 at 32x32
def test_fifty_steps_on_a_fixed_batch_overfit():
    model, teacher, criterion, optimizer, images, targets = _setup()
    first = _step(model, teacher, criterion, optimizer, images, targets)["total"].item()
    for _ in range(49):
        last = _step(model, teacher, criterion, optimizer, images, targets)["total"].item()
    assert last < 0.5 * first, (first, last)
    model.eval()
    with torch.no_grad():
        assert (model(images).logits.argmax(1) == targets).float().mean() >= 0.75
