import pytest
import torch

from spnet_dist.models.gates import Router


def test_initial_bias_opens_blocks_with_p_087():
    router = Router(16).eval()
    with torch.no_grad():
        router.fc2.weight.zero_()  # isolate the bias
    gate = router(torch.randn(5, 16, 4, 4))
    torch.testing.assert_close(gate.prob, torch.full((5,), torch.tensor([0.1, 2.0]).softmax(0)[1].item()))
    assert 0.86 < gate.prob[0].item() < 0.88
    assert torch.equal(gate.decision, torch.ones(5))


def test_eval_is_deterministic_at_batch_size_one():
    torch.manual_seed(0)
    router = Router(8).eval()
    x = torch.randn(1, 8, 3, 3)
    first, second = router(x), router(x)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.decision, second.decision)
    expected = (first.logits[:, 1] > first.logits[:, 0]).float()
    assert torch.equal(first.decision, expected)


def test_training_decisions_are_hard_and_carry_straight_through_gradient():
    torch.manual_seed(0)
    router = Router(8).train()
    gate = router(torch.randn(32, 8, 3, 3))
    assert set(gate.decision.unique().tolist()) <= {0.0, 1.0}
    gate.decision.sum().backward()
    assert router.fc2.weight.grad.abs().sum() > 0
    assert router.fc1.weight.grad.abs().sum() > 0


def test_noise_free_training_follows_argmax():
    torch.manual_seed(0)
    router = Router(8, noise=False, dropout=0.0).train()
    gate = router(torch.randn(16, 8, 3, 3))
    assert torch.equal(gate.decision.detach(), (gate.logits[:, 1] > gate.logits[:, 0]).float())


def test_force_overrides_decisions():
    router = Router(4).eval()
    router.force = False
    assert torch.equal(router(torch.randn(3, 4, 2, 2)).decision, torch.zeros(3))
    router.force = True
    assert torch.equal(router(torch.randn(3, 4, 2, 2)).decision, torch.ones(3))


@pytest.mark.parametrize("kwargs, field", [({"init_bias": (1.0,)}, "model.router_bias"), ({"tau": 0.0}, "model.gumbel_tau")])
def test_bad_router_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Router(4, **kwargs)
