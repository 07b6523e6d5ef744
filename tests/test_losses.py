"""Tests for spnet_dist.losses: exact values, minima, gradient directions, option validation.

Everything runs on synthetic ``SPNetOutput`` objects, so no model code is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from spnet_dist.losses import (
    LOGITS_FORMS,
    PATH_FORMS,
    SPNetCriterion,
    classification_loss,
    code_logits_weights,
    cost_loss,
    evolution_features,
    evolution_loss,
    logits_loss,
    path_loss,
)
from spnet_dist.models.output import SPNetOutput

B, N, K, D, C = 4, 6, 3, 5, 7
BLOCK_STAGE = (0, 0, 1, 1, 1, 2)  # N = 6 blocks over K = 3 stages


def make_output(
    seed: int = 0,
    *,
    k: int = K,
    block_features: bool = True,
    requires_grad: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SPNetOutput:
    """A synthetic SPNetOutput whose tensors are leaves (so tests can read their .grad)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int, fn=lambda t: t) -> torch.Tensor:
        return fn(torch.randn(*shape, generator=g)).to(dtype).requires_grad_(requires_grad)

    stage_logits = [leaf(B, C) for _ in range(k)]
    gate_logits = leaf(B, N, 2)
    return SPNetOutput(
        logits=stage_logits[-1],
        stage_logits=stage_logits,
        gate_probs=leaf(B, N, fn=torch.sigmoid),
        gate_decisions=(torch.rand(B, N, generator=g) > 0.5).to(dtype),
        gate_logits=gate_logits,
        stage_features=[leaf(B, D) for _ in range(k)],
        block_features=[leaf(B, D) for _ in range(N)] if block_features else None,
        block_stage=BLOCK_STAGE,
    )


def clone_output(out: SPNetOutput, requires_grad: bool = False) -> SPNetOutput:
    """Same values, fresh leaves."""

    def c(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(requires_grad)

    stage_logits = [c(y) for y in out.stage_logits]
    return SPNetOutput(
        logits=stage_logits[-1],
        stage_logits=stage_logits,
        gate_probs=c(out.gate_probs),
        gate_decisions=out.gate_decisions.clone(),
        gate_logits=c(out.gate_logits),
        stage_features=[c(f) for f in out.stage_features],
        block_features=None if out.block_features is None else [c(f) for f in out.block_features],
        block_stage=out.block_stage,
    )


TARGET = torch.tensor([0, 3, 6, 2])
EXACT = dict(rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# L_cls
# ---------------------------------------------------------------------------------------------
def test_classification_loss_sums_all_heads():
    out = make_output()
    expected = sum(F.cross_entropy(y, TARGET) for y in out.stage_logits)
    torch.testing.assert_close(classification_loss(out.stage_logits, TARGET, stage_heads=True), expected)


def test_classification_loss_final_head_only():
    out = make_output()
    got = classification_loss(out.stage_logits, TARGET, stage_heads=False)
    assert torch.equal(got, F.cross_entropy(out.logits, TARGET))


# ---------------------------------------------------------------------------------------------
# L_path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["paper", "code"])
def test_path_loss_zero_when_student_equals_teacher(form):
    out = make_output()
    assert path_loss(out, clone_output(out), form).item() == 0.0


def test_path_loss_paper_value():
    s, t = make_output(0), make_output(1)
    # eq. 7: Σ_n (v_t − v_d)², summed over blocks, mean over the batch
    expected = sum(
        sum((t.gate_probs[b, n] - s.gate_probs[b, n]) ** 2 for n in range(N)) for b in range(B)
    ) / B
    torch.testing.assert_close(path_loss(s, t, "paper"), expected, **EXACT)


def test_path_loss_code_value():
    s, t = make_output(0), make_output(1)
    expected = 0.1 * ((s.gate_logits - t.gate_logits) ** 2).sum() / (B * N * 2)
    torch.testing.assert_close(path_loss(s, t, "code"), expected, **EXACT)


def test_path_loss_gradient_pushes_student_toward_teacher_and_not_into_teacher():
    s, t = make_output(0, requires_grad=True), make_output(1, requires_grad=True)
    path_loss(s, t, "paper").backward()
    gap = (t.gate_probs - s.gate_probs).detach()  # (B, N)
    # d/dv_d of Σ(v_t − v_d)²/B = −2(v_t − v_d)/B: descent moves v_d toward v_t.
    torch.testing.assert_close(s.gate_probs.grad, -2 * gap / B, **EXACT)
    assert t.gate_probs.grad is None


def test_path_loss_code_gradient_pushes_student_logits_toward_teacher():
    s, t = make_output(0, requires_grad=True), make_output(1, requires_grad=True)
    path_loss(s, t, "code").backward()
    # d/dg_d of 0.1·mean((g_d − g_t)²) over B·N·2 elements = 0.2·(g_d − g_t)/(B·N·2).
    gap = (s.gate_logits - t.gate_logits).detach()
    torch.testing.assert_close(s.gate_logits.grad, 0.2 * gap / (B * N * 2), **EXACT)


def teacher_leaves(out: SPNetOutput) -> list[torch.Tensor]:
    return [out.gate_probs, out.gate_logits, *out.stage_logits, *out.stage_features]


@pytest.mark.parametrize("form", PATH_FORMS)
def test_path_loss_teacher_gets_no_gradient(form):
    s, t = make_output(0, requires_grad=True), make_output(1, requires_grad=True)
    loss = path_loss(s, t, form)
    assert loss.item() > 0
    loss.backward()
    student_input = s.gate_probs if form == "paper" else s.gate_logits
    assert student_input.grad is not None and student_input.grad.abs().sum() > 0
    assert all(x.grad is None for x in teacher_leaves(t)), form


def test_path_loss_shape_mismatch_raises():
    s = make_output(0)
    t = clone_output(s)
    t.gate_probs = t.gate_probs[:, :-1]
    with pytest.raises(ValueError, match="gate_probs"):
        path_loss(s, t, "paper")


def test_path_loss_unknown_form_raises():
    out = make_output()
    with pytest.raises(ValueError, match="loss.path_form"):
        path_loss(out, out, "l1")


# ---------------------------------------------------------------------------------------------
# L_logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["paper", "code"])
def test_logits_loss_zero_at_minimum(form):
    out = make_output()
    teacher = clone_output(out)
    if form == "code":
        # The code form regresses every head onto the teacher's FINAL logits.
        for y in out.stage_logits:
            y.data.copy_(teacher.logits)
    torch.testing.assert_close(logits_loss(out, teacher, form), torch.tensor(0.0), atol=1e-7, rtol=0)


def test_logits_loss_paper_equals_hand_kl():
    s, t = make_output(0), make_output(1)
    expected = 0.0
    for y_d, y_t in zip(s.stage_logits, t.stage_logits):
        p_t = torch.softmax(y_t, -1)
        # KL(p_t ‖ p_d) = Σ_c p_t (log p_t − log p_d), averaged over the batch
        expected += (p_t * (p_t.log() - torch.softmax(y_d, -1).log())).sum() / B
    got = logits_loss(s, t, "paper")
    torch.testing.assert_close(got, expected, **EXACT)
    assert got.item() > 0


@pytest.mark.parametrize("k, weights", [(3, [0.1, 0.2, 1.0]), (4, [0.01, 0.1, 0.2, 1.0])])
def test_logits_loss_code_equals_hand_weighted_mse(k, weights):
    s, t = make_output(0, k=k), make_output(1, k=k)
    assert code_logits_weights(k) == weights
    final_t = t.stage_logits[-1]
    # The official code multiplies the weighted sum by 0.1 once more (loss_kd = (...) * 0.1).
    expected = 0.1 * sum(w * ((y - final_t) ** 2).mean() for w, y in zip(weights, s.stage_logits))
    torch.testing.assert_close(logits_loss(s, t, "code"), expected, **EXACT)


def test_logits_loss_code_rejects_more_than_four_heads():
    s, t = make_output(0, k=5), make_output(1, k=5)
    with pytest.raises(ValueError, match="K=5"):
        logits_loss(s, t, "code")


@pytest.mark.parametrize("form", LOGITS_FORMS)
def test_logits_loss_teacher_gets_no_gradient(form):
    s, t = make_output(0, requires_grad=True), make_output(1, requires_grad=True)
    logits_loss(s, t, form).backward()
    assert all(y.grad is not None and y.grad.abs().sum() > 0 for y in s.stage_logits)
    assert all(x.grad is None for x in teacher_leaves(t)), form


def test_logits_loss_head_count_mismatch_raises():
    with pytest.raises(ValueError, match="stage heads"):
        logits_loss(make_output(0, k=3), make_output(1, k=4), "paper")


# ---------------------------------------------------------------------------------------------
# L_evo
# ---------------------------------------------------------------------------------------------
def test_evolution_loss_zero_for_collinear_evolution():
    start, direction = torch.randn(B, D), torch.randn(B, D)
    # Steps of different positive lengths along one direction: every cos = 1.
    feats = [start + c * direction for c in (0.0, 0.5, 2.0, 2.1, 7.0)]
    torch.testing.assert_close(evolution_loss(feats), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_evolution_loss_exact_values():
    e0, e1 = torch.eye(2)[0].expand(B, 2), torch.eye(2)[1].expand(B, 2)
    origin = torch.zeros(B, 2)
    # d1 = e0, d2 = e1: orthogonal → ½·(1 − 0) = ½
    assert evolution_loss([origin, e0, e0 + e1]).item() == pytest.approx(0.5)
    # d1 = e0, d2 = −e0: opposite → ½·(1 − (−1)) = 1
    assert evolution_loss([origin, e0, origin]).item() == pytest.approx(1.0)
    # Two pairs, orthogonal then opposite: ½ + 1
    assert evolution_loss([origin, e0, e0 + e1, e0]).item() == pytest.approx(1.5)


def test_evolution_loss_is_a_batch_mean_of_per_sample_cosines():
    origin = torch.zeros(2, 2)
    f1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    f2 = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # sample 0 keeps going (0), sample 1 turns back (1)
    assert evolution_loss([origin, f1, f2]).item() == pytest.approx(0.5)


def test_evolution_loss_fewer_than_three_features_is_zero():
    f = torch.randn(B, D)
    for feats in ([], [f], [f, f + 1]):
        loss = evolution_loss(feats)
        assert isinstance(loss, torch.Tensor) and loss.item() == 0.0


def test_evolution_loss_gradient_straightens_the_path():
    feats = [torch.randn(B, D, requires_grad=True) for _ in range(4)]
    loss = evolution_loss(feats)
    loss.backward()
    with torch.no_grad():
        stepped = [f - 0.05 * f.grad for f in feats]
    assert evolution_loss(stepped).item() < loss.item()


def test_evolution_features_strategies():
    out = make_output()
    (chain,) = evolution_features(out, "stages")
    assert all(a is b for a, b in zip(chain, out.stage_features)) and len(chain) == K
    (chain,) = evolution_features(out, "blocks")
    assert all(a is b for a, b in zip(chain, out.block_features)) and len(chain) == N
    chains = evolution_features(out, "blocks_within_stage")
    assert [len(c) for c in chains] == [2, 3, 1]  # BLOCK_STAGE = (0, 0, 1, 1, 1, 2)
    assert chains[1][0] is out.block_features[2] and chains[2][0] is out.block_features[5]


@pytest.mark.parametrize("strategy", ["blocks", "blocks_within_stage"])
def test_evolution_features_need_block_features(strategy):
    out = make_output(block_features=False)
    with pytest.raises(ValueError, match=f"loss.evo_strategy='{strategy}' needs a model built with block_align=True"):
        evolution_features(out, strategy)


def test_evolution_features_unknown_strategy_raises():
    with pytest.raises(ValueError, match="loss.evo_strategy"):
        evolution_features(make_output(), "layers")


# ---------------------------------------------------------------------------------------------
# L_cost
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["two_sided", "hinge"])
def test_cost_loss_zero_when_rates_equal_target(form):
    # Per-sample probabilities vary, but every block's batch-mean rate is exactly 0.5.
    v = torch.tensor([[0.25, 0.75, 0.5], [0.75, 0.25, 0.5]])
    assert cost_loss(v, 0.5, form).item() == 0.0


def test_cost_loss_two_sided_value_and_gradient():
    v = torch.tensor([[0.9, 0.1], [0.7, 0.3]], requires_grad=True)  # rates (0.8, 0.2)
    loss = cost_loss(v, 0.5, "two_sided")
    assert loss.item() == pytest.approx(0.3**2 + 0.3**2)
    loss.backward()
    # d/dv_bn = 2(r_n − t)/B: above target → positive (descent lowers the rate), below → negative.
    torch.testing.assert_close(v.grad, torch.tensor([[0.3, -0.3], [0.3, -0.3]]), **EXACT)


def test_cost_loss_hinge_only_penalises_rates_above_target():
    v = torch.tensor([[0.9, 0.1], [0.7, 0.3]], requires_grad=True)  # rates (0.8, 0.2)
    loss = cost_loss(v, 0.5, "hinge")
    assert loss.item() == pytest.approx(0.3**2)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.3, 0.0], [0.3, 0.0]]), **EXACT)
    below = torch.full((B, N), 0.2)
    assert cost_loss(below, 0.5, "hinge").item() == 0.0
    assert cost_loss(below, 0.5, "two_sided").item() == pytest.approx(N * 0.3**2)


def test_cost_loss_unknown_form_raises():
    with pytest.raises(ValueError, match="loss.cost_form"):
        cost_loss(torch.rand(B, N), 0.5, "l1")


# ---------------------------------------------------------------------------------------------
# SPNetCriterion
# ---------------------------------------------------------------------------------------------
ALL_OFF = dict(stage_heads=False, gamma=0.0, cost_weight=0.0, teacher_enabled=False)


def test_criterion_everything_off_is_plain_cross_entropy():
    out = make_output()
    for kwargs in (ALL_OFF, {**ALL_OFF, "gamma": 1e-4, "evo_strategy": "none"}):
        terms = SPNetCriterion(**kwargs)(out, TARGET, None)
        assert set(terms) == {"cls", "total"}
        assert torch.equal(terms["total"], F.cross_entropy(out.logits, TARGET))


def test_criterion_total_is_the_weighted_sum_of_the_pure_functions():
    s, t = make_output(0), make_output(1)
    crit = SPNetCriterion(
        alpha=0.7, beta=0.3, gamma=0.2, cost_weight=0.05, target_rate=0.4,
        path_form="code", logits_form="code", evo_strategy="blocks_within_stage", cost_form="hinge",
    )
    terms = crit(s, TARGET, t)
    assert set(terms) == {"cls", "path", "logits", "evo", "cost", "total"}
    expected = {
        "cls": classification_loss(s.stage_logits, TARGET, True),
        "path": path_loss(s, t, "code"),
        "logits": logits_loss(s, t, "code"),
        "evo": sum(evolution_loss(c) for c in evolution_features(s, "blocks_within_stage")),
        "cost": cost_loss(s.gate_probs, 0.4, "hinge"),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, **EXACT)  # unweighted
    total = expected["cls"] + 0.7 * expected["path"] + 0.3 * expected["logits"]
    total = total + 0.2 * expected["evo"] + 0.05 * expected["cost"]
    torch.testing.assert_close(terms["total"], total, **EXACT)


def test_criterion_paper_defaults():
    s, t = make_output(0), make_output(1)
    crit = SPNetCriterion()
    assert (crit.alpha, crit.beta, crit.gamma) == (1.0, 0.5, 1e-4)  # paper §4.1
    terms = crit(s, TARGET, t)
    assert set(terms) == {"cls", "path", "logits", "evo", "total"}  # no cost without a target
    torch.testing.assert_close(terms["path"], path_loss(s, t, "paper"))
    torch.testing.assert_close(terms["logits"], logits_loss(s, t, "paper"))
    torch.testing.assert_close(terms["evo"], evolution_loss(s.stage_features))


def test_criterion_teacher_disabled_allows_none_and_skips_teacher_terms():
    terms = SPNetCriterion(teacher_enabled=False)(make_output(), TARGET, None)
    assert set(terms) == {"cls", "evo", "total"}


def test_criterion_teacher_enabled_but_missing_raises():
    with pytest.raises(ValueError, match="teacher_enabled"):
        SPNetCriterion()(make_output(), TARGET, None)


@pytest.mark.parametrize("path_form", PATH_FORMS)
@pytest.mark.parametrize("logits_form", LOGITS_FORMS)
def test_criterion_teacher_receives_no_gradient(path_form, logits_form):
    s, t = make_output(0, requires_grad=True), make_output(1, requires_grad=True)
    crit = SPNetCriterion(cost_weight=1.0, target_rate=0.5, path_form=path_form, logits_form=logits_form)
    terms = crit(s, TARGET, t)
    assert terms["path"].item() > 0 and terms["logits"].item() > 0
    terms["total"].backward()
    assert s.gate_probs.grad is not None and s.stage_features[0].grad is not None
    if path_form == "code":
        assert s.gate_logits.grad is not None and s.gate_logits.grad.abs().sum() > 0
    assert all(x.grad is None for x in teacher_leaves(t)), (path_form, logits_form)


def test_criterion_computes_in_fp32_under_bf16_inputs():
    s, t = make_output(0, dtype=torch.bfloat16), make_output(1, dtype=torch.bfloat16)
    terms = SPNetCriterion(cost_weight=1.0, target_rate=0.5)(s, TARGET, t)
    assert all(v.dtype == torch.float32 for v in terms.values())


def test_criterion_block_strategy_without_block_features_raises():
    out = make_output(block_features=False)
    with pytest.raises(ValueError, match="block_align=True"):
        SPNetCriterion(evo_strategy="blocks", teacher_enabled=False)(out, TARGET, None)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"path_form": "l2"}, "loss.path_form"),
        ({"logits_form": "kl"}, "loss.logits_form"),
        ({"evo_strategy": "layers"}, "loss.evo_strategy"),
        ({"cost_form": "l1"}, "loss.cost_form"),
        ({"alpha": -1.0}, "loss.alpha"),
        ({"beta": -0.5}, "loss.beta"),
        ({"gamma": float("nan")}, "loss.gamma"),
        ({"cost_weight": -1.0, "target_rate": 0.5}, "loss.cost_weight"),
        ({"target_rate": 1.5}, "loss.target_rate"),
        ({"target_rate": -0.1}, "loss.target_rate"),
        ({"cost_weight": 1.0}, "loss.target_rate"),
        ({"stage_heads": "yes"}, "loss.stage_heads"),
    ],
)
def test_criterion_invalid_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        SPNetCriterion(**kwargs)
    assert "\n" not in str(err.value)


def test_criterion_error_lists_valid_values():
    with pytest.raises(ValueError, match="'stages', 'blocks', 'blocks_within_stage', 'to_final', 'code_cifar', 'none'"):
        SPNetCriterion(evo_strategy="layers")


@dataclass
class _LossConfig:  # stands in for the `loss` dataclass of spnet_dist/config.py
    stage_heads: bool = True
    alpha: float = 0.5
    beta: float = 0.25
    gamma: float = 0.0
    path_form: str = "code"
    logits_form: str = "paper"
    evo_strategy: str = "none"
    cost_weight: float = 2.0
    target_rate: Optional[float] = 0.6
    cost_form: str = "hinge"
    cost_reduction: str = "mean"
    cost_rate: str = "decisions"
    cls_form: str = "code"


def test_criterion_from_config_reads_every_field():
    crit = SPNetCriterion.from_config(_LossConfig(), teacher_enabled=False)
    for name in SPNetCriterion.FIELDS:
        assert getattr(crit, name) == getattr(_LossConfig(), name)
    assert crit.teacher_enabled is False
    terms = crit(make_output(), TARGET, None)
    assert set(terms) == {"cls", "cost", "total"}


def test_criterion_from_config_missing_field_raises():
    cfg = SimpleNamespace(**{k: v for k, v in vars(_LossConfig()).items() if k != "cost_form"})
    with pytest.raises(ValueError, match=r"loss\.cost_form"):
        SPNetCriterion.from_config(cfg, teacher_enabled=True)


def test_criterion_from_config_validates():
    with pytest.raises(ValueError, match=r"loss\.alpha"):
        SPNetCriterion.from_config(_LossConfig(alpha=-1.0), teacher_enabled=True)


def test_weights_of_zero_switch_teacher_terms_off():
    terms = SPNetCriterion(alpha=0.0, beta=0.0, gamma=0.0)(make_output(0), TARGET, make_output(1))
    assert set(terms) == {"cls", "total"}
    assert math.isfinite(terms["total"].item())


def _loop_evolution_loss(features):
    """The definition, pair by pair (the implementation is vectorised over pairs)."""
    diffs = [b.float() - a.float() for a, b in zip(features[:-1], features[1:])]
    return 0.5 * sum((1.0 - F.cosine_similarity(n, p, dim=-1)).mean() for p, n in zip(diffs[:-1], diffs[1:]))


@pytest.mark.parametrize("m", [3, 4, 16, 54])
def test_evolution_loss_vectorised_equals_the_pairwise_definition(m):
    g = torch.Generator().manual_seed(m)
    feats = [torch.randn(5, 12, generator=g).requires_grad_() for _ in range(m)]
    fast, slow = evolution_loss(feats), _loop_evolution_loss(feats)  # both in fp32
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    grads_fast = torch.autograd.grad(fast, feats)
    grads_slow = torch.autograd.grad(slow, feats)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_criterion_on_the_meta_device():
    # Issue 6 CPU guard: every tensor the criterion creates must follow its inputs' device.
    meta = torch.device("meta")
    b, n, c, d = 4, 6, 10, 8
    def output():
        return SPNetOutput(
            logits=torch.empty(b, c, device=meta), stage_logits=[torch.empty(b, c, device=meta) for _ in range(3)],
            gate_probs=torch.empty(b, n, device=meta), gate_decisions=torch.empty(b, n, device=meta),
            gate_logits=torch.empty(b, n, 2, device=meta), stage_features=[torch.empty(b, d, device=meta) for _ in range(3)],
            block_features=[torch.empty(b, d, device=meta) for _ in range(n)], block_stage=(0, 0, 1, 1, 2, 2))
    target = torch.empty(b, dtype=torch.long, device=meta)
    for evo in ("stages", "blocks", "blocks_within_stage"):
        for form in ("paper", "code"):
            criterion = SPNetCriterion(path_form=form, logits_form=form, evo_strategy=evo, cost_weight=1.0,
                                       target_rate=0.5, cost_form="hinge" if form == "code" else "two_sided")
            terms = criterion(output(), target, output())
            assert all(t.device == meta for t in terms.values())
