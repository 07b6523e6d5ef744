"""Applying an execution plan (execution/network.py ``set_execution``): the skipping network equals the
masked one, the switch leaves the model's parameters and identity alone and is undone exactly, and
training never runs through execution code."""
import copy
import inspect
import pickle

import pytest
import torch

import spnet_dist.execution
from spnet_dist.execution import (InferenceResNet, PoolingRouter, SkippingBlock, execution_plan, reset_execution,
                                  set_execution)
from spnet_dist.models import GatedResNet, create_model
from spnet_dist.models.blocks import GatedBlock
from spnet_dist.models.gates import Router

from ..models.test_resnet import _mixed_routers


@pytest.mark.parametrize("name, size", [("spnet_resnet50", 96), ("spnet_cifar_resnet110", 32)])
def test_skip_path_equals_masked_path(name, size):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(6, 3, size, size)
    _mixed_routers(model, x)
    with torch.no_grad():
        masked = model(x)
        set_execution(model, "skip")
        skipped = model(x)
        set_execution(model, "masked")
    decisions = masked.gate_decisions
    assert 0.2 < decisions.mean().item() < 0.8, "the test needs a real mix of open and closed gates"
    assert (decisions.sum(0) % decisions.shape[0] != 0).any(), "some block must be open for only part of the batch"
    assert torch.equal(decisions, skipped.gate_decisions)
    assert (masked.logits - skipped.logits).abs().max().item() < 1e-5


def _snapshot(model):
    """Every module's class and attribute dict (the objects themselves, not copies)."""
    return {name: (type(module), dict(vars(module))) for name, module in model.named_modules()}


def _assert_same_modules(model, before):
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for name, (cls, attributes) in before.items():
        assert after[name][0] is cls, name
        assert after[name][1].keys() == attributes.keys(), (name, after[name][1].keys() ^ attributes.keys())
        assert all(after[name][1][key] is value for key, value in attributes.items()), name


@pytest.mark.parametrize("name, size", [("spnet_cifar_resnet20", 32), ("spnet_resnet50", 64)])
def test_masked_after_skip_is_the_plain_model_again(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(3, 3, size, size)
    before, keys = _snapshot(model), list(model.state_dict())
    with torch.no_grad():
        want = model(x).logits
        # the trainer's evaluation and eval-mode teacher: gather, per-image stages off
        set_execution(model, "skip")
        assert type(model).__mro__[1] is InferenceResNet and isinstance(model, before[""][0])
        assert all(isinstance(b, SkippingBlock) and isinstance(b.router, PoolingRouter) for b in model.gated_blocks())
        assert execution_plan(model).block_step(x.device) == "gather" and model.count_per_image_stages(x) == 0
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-5)
        set_execution(model, "masked")
    _assert_same_modules(model, before)
    assert execution_plan(model) == spnet_dist.execution.ExecutionPlan()

    # every other setting, then each one back to its default: the plain model only at the very end
    set_execution(model, "skip", skip_strategy="capacity", per_image_stages="auto", per_image_min_bytes=0,
                  capacity_rates=0.5, capacity_margin=1.0, capacity_multiple=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-4)
    for setting in (dict(mode="masked"), dict(skip_strategy="gather"), dict(per_image_stages="off"),
                    dict(per_image_min_bytes=1 << 20), dict(capacity_rates=1.0), dict(capacity_margin=3.0)):
        set_execution(model, **setting)
        assert isinstance(model, InferenceResNet), setting
        assert all(isinstance(b.router, PoolingRouter) and not isinstance(b, SkippingBlock)
                   for b in model.gated_blocks())
    set_execution(model, capacity_multiple=None)  # None keeps a setting
    assert isinstance(model, InferenceResNet)
    assert reset_execution(model) is model  # multiple has no "back to its default" value: reset drops the plan
    _assert_same_modules(model, before)
    reset_execution(model)  # on a plain model: nothing to do
    _assert_same_modules(model, before)


def test_a_switched_model_keeps_its_identity_and_copies_and_pickles():
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20", num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    _mixed_routers(model, x)
    with torch.no_grad():
        want = model(x).logits
    set_execution(model, "skip", per_image_stages="auto", per_image_min_bytes=0)
    assert isinstance(model, GatedResNet) and all(isinstance(b, GatedBlock) for b in model.gated_blocks())
    assert all(isinstance(b.router, Router) for b in model.gated_blocks())
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), model.to(torch.float64).to(torch.float32),
                  model.inference_copy()):
        assert type(other) is type(model) and execution_plan(other) == execution_plan(model)
        with torch.no_grad():
            torch.testing.assert_close(other(x).logits, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="execution: must be one of"):
        set_execution(model, "dense")
    assert execution_plan(model).mode == "skip"  # a refused plan changes nothing
    assert model.set_execution("masked", per_image_stages="off", per_image_min_bytes=1 << 20) is model  # the method
    assert type(model) is type(create_model("spnet_cifar_resnet20"))


def _execution_functions():
    """Every function and method defined in spnet_dist.execution, as (owner, name)."""
    modules = [m for name, m in inspect.getmembers(spnet_dist.execution, inspect.ismodule)
               if m.__name__.startswith("spnet_dist.execution.")]
    assert {m.__name__.rsplit(".", 1)[1] for m in modules} >= {"blocks", "fuse", "network", "plan", "spare"}
    found = []
    for module in modules:
        for name, value in vars(module).items():
            if inspect.isfunction(value) and value.__module__ == module.__name__:
                found.append((module, name))
            elif inspect.isclass(value) and value.__module__ == module.__name__:
                found += [(value, attr) for attr, member in vars(value).items() if inspect.isfunction(member)]
    return found


def test_training_never_runs_execution_code(monkeypatch):
    """The student after the trainer's evaluation (skip, then masked), in training (forward and
    backward) and in a masked eval forward, never calls anything of spnet_dist.execution."""
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20", num_classes=10, block_align=True)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    set_execution(model, "skip")
    with torch.no_grad():
        model(x)
    set_execution(model, "masked")
    entered = []
    functions = _execution_functions()
    assert len(functions) > 30
    for owner, name in functions:
        def refuse(*_args, _name=f"{getattr(owner, '__name__', owner)}.{name}", **_kwargs):
            entered.append(_name)
            raise AssertionError(f"the training forward entered {_name}")

        monkeypatch.setattr(owner, name, refuse)
    model.train()
    out = model(x)
    (out.logits.sum() + sum(f.sum() for f in out.block_features)).backward()
    assert all(b.router.fc2.weight.grad is not None for b in model.gated_blocks())
    model.eval()
    with torch.no_grad():
        model(x)
    model(x).logits.sum().backward()  # eval mode with autograd (e.g. the eval-mode teacher of bench_step)
    model.forward_features(x)
    assert entered == []
