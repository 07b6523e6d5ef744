import math

import pytest
import torch

from spnet_dist.models.gates import Router


def router_with_logits(bias, channels: int = 8, **kwargs) -> Router:
    """A router whose logits are exactly ``bias`` for every input: last-layer weight zero."""
    router = Router(channels, init_bias=bias, **kwargs)
    with torch.no_grad():
        router.fc2.weight.zero_()
    return router


def test_initial_bias_opens_blocks_with_p_087():
    router = router_with_logits((0.1, 2.0), 16).eval()
    gate = router(torch.randn(5, 16, 4, 4))
    p_execute = 1.0 / (1.0 + math.exp(-(2.0 - 0.1)))  # softmax of two logits = sigmoid of the gap
    torch.testing.assert_close(gate.prob, torch.full((5,), p_execute))
    assert 0.86 < gate.prob[0].item() < 0.88
    assert torch.equal(gate.decision, torch.ones(5))


@pytest.mark.parametrize(
    "bias, expected",
    [((0.5, 0.5), 0.0),  # a tie skips: execute iff logit1 > logit0, strictly
     ((0.5, 0.5 + 1e-6), 1.0),
     ((0.5 + 1e-6, 0.5), 0.0),
     ((-3.0, -3.0), 0.0)],
    ids=["tie-skips", "execute-by-a-hair", "skip-by-a-hair", "negative-tie-skips"],
)
def test_eval_decision_is_strict_logit1_greater_than_logit0(bias, expected):
    router = router_with_logits(bias).eval()
    for batch in (1, 4):  # deterministic, also at batch size 1
        gate = router(torch.randn(batch, 8, 3, 3))
        assert torch.equal(gate.decision, torch.full((batch,), expected)), (bias, gate.logits)


def test_eval_is_deterministic_at_batch_size_one():
    torch.manual_seed(0)
    router = Router(8).eval()
    x = torch.randn(1, 8, 3, 3)
    first, second = router(x), router(x)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.decision, second.decision)
    assert set(first.decision.tolist()) <= {0.0, 1.0}


def test_training_decisions_are_hard_and_carry_straight_through_gradient():
    torch.manual_seed(0)
    router = Router(8).train()
    gate = router(torch.randn(32, 8, 3, 3))
    assert set(gate.decision.unique().tolist()) <= {0.0, 1.0}
    gate.decision.sum().backward()
    assert router.fc2.weight.grad.abs().sum() > 0
    assert router.fc1.weight.grad.abs().sum() > 0


def _decision_gradient(router: Router, x: torch.Tensor, seed: int = 0):
    """Forward in training mode under ``seed``; d(Σ_i c_i·decision_i)/d(logits) with fixed
    random weights c (so no two samples' gradients can cancel)."""
    torch.manual_seed(seed)
    gate = router(x)
    gate.logits.retain_grad()
    upstream = torch.linspace(0.5, 1.5, x.shape[0])
    (gate.decision * upstream).sum().backward()
    return gate, gate.logits.grad / upstream[:, None]


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_noise_free_straight_through_gradient_is_the_soft_gradient(tau):
    # model.gumbel_noise=false: forward = hard argmax, backward = d softmax(logits / tau)[:, 1].
    torch.manual_seed(0)
    router = Router(8, noise=False, dropout=0.0, tau=tau).train()
    gate, grad = _decision_gradient(router, torch.randn(16, 8, 3, 3))
    logits = gate.logits.detach().double()
    gap = logits[:, 1] - logits[:, 0]
    # Forward: exactly the argmax (no ties with random weights).
    assert torch.equal(gate.decision.detach(), (gap > 0).float())
    # Backward: with p = softmax(l / tau)[1] = sigmoid((l1 - l0) / tau),
    # dp/dl1 = p (1 - p) / tau and dp/dl0 = -p (1 - p) / tau.
    p = torch.sigmoid(gap / tau)
    slope = p * (1 - p) / tau
    expected = torch.stack([-slope, slope], dim=1)
    assert slope.min() > 1e-3  # the check is not vacuous: every sample has a real gradient
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_gumbel_temperature_scales_the_straight_through_gradient():
    # Same seed -> same Gumbel noise g and dropout mask for every tau. The soft sample is
    # y = sigmoid(z / tau) with z = (l1 + g1) - (l0 + g0), and d decision / d l1 = y (1 - y) / tau.
    # tau = 1 reveals |z| (y (1 - y) = G fixes y up to y <-> 1 - y, the hard decision picks
    # which); every other tau must then follow from the formula.
    torch.manual_seed(0)
    router = Router(8, dropout=0.0).train()
    x = torch.randn(64, 8, 3, 3)
    base_gate, base = _decision_gradient(router, x, seed=7)
    g1 = base[:, 1].double()
    torch.testing.assert_close(base[:, 0], -base[:, 1])  # a 2-way softmax: opposite gradients
    y = 0.5 * (1 + torch.sqrt((1 - 4 * g1).clamp(min=0)))  # the root > 1/2
    z_abs = torch.log(y / (1 - y))
    keep = g1 > 1e-4  # saturated samples carry no information about z
    assert keep.sum() > 32
    for tau in (0.5, 2.0, 8.0):
        router.tau = tau
        router.zero_grad()
        gate, grad = _decision_gradient(router, x, seed=7)
        # The hard sample is the argmax of (l + g) / tau: the same for every tau > 0.
        assert torch.equal(gate.decision.detach(), base_gate.decision.detach())
        y_tau = torch.sigmoid(z_abs / tau)
        expected = y_tau * (1 - y_tau) / tau
        torch.testing.assert_close(grad[keep, 1].double(), expected[keep], rtol=2e-3, atol=1e-6)
    # At a high temperature the soft sample is ~1/2 whatever the noise: the gradient is 1 / (4 tau).
    for tau in (400.0, 1000.0):
        router.tau = tau
        router.zero_grad()
        _, grad = _decision_gradient(router, x, seed=7)
        torch.testing.assert_close(tau * grad[:, 1], torch.full((64,), 0.25), rtol=1e-3, atol=0)


def test_noise_free_training_follows_argmax():
    router = router_with_logits((0.3, -0.2), noise=False, dropout=0.0).train()
    assert torch.equal(router(torch.randn(16, 8, 3, 3)).decision.detach(), torch.zeros(16))
    router = router_with_logits((-0.2, 0.3), noise=False, dropout=0.0).train()
    assert torch.equal(router(torch.randn(16, 8, 3, 3)).decision.detach(), torch.ones(16))


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


# --------------------------------------------------------------------------------------------
# The calibrated evaluation threshold (issue 20): eval only, baked into the bias for export.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gap, threshold, expected", [(1.0, 0.5, 1.0), (1.0, 1.0, 0.0), (1.0, 1.5, 0.0),
                                                       (-1.0, -1.5, 1.0), (-1.0, -0.5, 0.0)],
                         ids=["above", "tie-skips", "below", "negative-above", "negative-below"])
def test_eval_executes_iff_the_logit_gap_exceeds_the_threshold(gap, threshold, expected):
    router = router_with_logits((0.0, gap)).eval()
    router.threshold = threshold
    gate = router(torch.randn(3, 8, 2, 2))
    assert torch.equal(gate.decision, torch.full((3,), expected))
    # the probability stays the router's (the threshold is a rule, not a change of the network)
    torch.testing.assert_close(gate.prob, torch.full((3,), 1.0 / (1.0 + math.exp(-gap))))


def test_the_threshold_never_touches_training():
    torch.manual_seed(0)
    router = Router(8).train()
    x = torch.randn(16, 8, 3, 3)
    torch.manual_seed(1)
    plain = router(x)
    router.threshold = 5.0  # would close every block in eval mode
    torch.manual_seed(1)
    shifted = router(x)
    assert torch.equal(plain.decision, shifted.decision) and torch.equal(plain.logits, shifted.logits)


def test_baking_moves_the_threshold_into_the_skip_bias():
    torch.manual_seed(0)
    router = Router(8).eval()
    x = torch.randn(400, 8, 3, 3)
    with torch.no_grad():
        gaps = router(x).logits.diff(dim=1).squeeze(1)
    router.threshold = float(gaps.median())  # half the samples on either side
    with torch.no_grad():
        calibrated = router(x).decision
    assert 0.4 < calibrated.mean().item() < 0.6
    bias0 = router.fc2.bias[0].item()
    router.bake_threshold()
    assert router.threshold == 0.0 and router.fc2.bias[0].item() == pytest.approx(bias0 + float(gaps.median()))
    with torch.no_grad():
        baked = router(x).decision
    # the same decisions up to the rounding of one fp32 addition: only near-ties may differ
    near_tie = (gaps - float(gaps.median())).abs() < 1e-5
    assert torch.equal(baked[~near_tie], calibrated[~near_tie])
