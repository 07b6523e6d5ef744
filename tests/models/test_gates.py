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


def test_bf16_autocast_does_not_change_router_decisions():
    # Issue 6, finding 8: fc2 ran in bf16 under autocast and .float() only upcast rounded logits,
    # so near-tie inputs decided differently from the fp32 (exported) model. The router now runs
    # in fp32 with autocast off: the same input gives bit-identical logits and decisions.
    torch.manual_seed(0)
    router = Router(64).eval()
    with torch.no_grad():  # a near-tie router: execute and skip logits differ by ~1e-3
        router.fc2.weight[1].copy_(router.fc2.weight[0] + 1e-3 * torch.randn(128))
        router.fc2.bias.zero_()
    x = torch.randn(20_000, 64, 1, 1)
    fp32 = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = router(x)
    assert bf16.logits.dtype == torch.float32
    assert torch.equal(bf16.logits, fp32.logits)
    assert torch.equal(bf16.decision, fp32.decision)
    assert 0 < fp32.decision.sum() < len(x)  # a real mix of decisions, not all one way
