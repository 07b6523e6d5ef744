"""Hand-computed values of the official-code loss forms and the paper-fidelity fixes (issue 11).

Every expected number is worked out on paper from tensors of 2-4 elements, so a wrong reduction,
a missing factor or a head that should not be there changes the result.
"""
from __future__ import annotations

import math

import pytest
import torch

from spnet_dist.losses import (
    SPNetCriterion,
    classification_loss,
    cost_loss,
    evolution_features,
    evolution_loss,
    logits_loss,
    needs_aux_heads,
    needs_block_features,
    to_final_evolution_loss,
)
from spnet_dist.models.output import SPNetOutput

LN2, LN3 = math.log(2.0), math.log(3.0)


def output(stage_logits, *, gate_probs=None, gate_decisions=None, stage_features=None,
           block_pooled=None, block_features=None, block_stage=()) -> SPNetOutput:
    stage_logits = [torch.tensor(y, dtype=torch.float32, requires_grad=True) for y in stage_logits]
    b = stage_logits[0].shape[0]
    probs = torch.tensor(gate_probs if gate_probs is not None else [[0.5]] * b, requires_grad=True)
    return SPNetOutput(
        logits=stage_logits[-1],
        stage_logits=stage_logits,
        gate_probs=probs,
        gate_decisions=torch.tensor(gate_decisions) if gate_decisions is not None else (probs > 0.5).float(),
        gate_logits=torch.zeros(b, probs.shape[1], 2),
        stage_features=[torch.tensor(f) for f in (stage_features or [[[0.0]]] * len(stage_logits))],
        block_features=None if block_features is None else [torch.tensor(f) for f in block_features],
        block_stage=tuple(block_stage),
        block_pooled=None if block_pooled is None else [torch.tensor(f) for f in block_pooled],
    )


# ------------------------------------------------------------------------------------- L_cost
# decisions of 2 samples x 2 blocks: block rates r = (1.0, 0.5); t = 0.8
DECISIONS = [[1.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize("form, reduction, expected", [
    ("two_sided", "sum", 0.2**2 + 0.3**2),        # 0.13  (paper §4.3: Σ_n)
    ("two_sided", "mean", (0.2**2 + 0.3**2) / 2),  # 0.065 (official code: / len(activation_rates))
    ("hinge", "sum", 0.2**2),                      # only r_0 = 1.0 is above t
    ("hinge", "mean", 0.2**2 / 2),
])
def test_cost_loss_reductions_by_hand(form, reduction, expected):
    assert cost_loss(torch.tensor(DECISIONS), 0.8, form, reduction).item() == pytest.approx(expected)


def test_cost_loss_unknown_reduction_raises():
    with pytest.raises(ValueError, match="loss.cost_reduction"):
        cost_loss(torch.tensor(DECISIONS), 0.8, "two_sided", "max")


def test_criterion_official_cifar_cost_reads_decisions_and_is_much_weaker():
    # probabilities say rates (0.6, 0.6), the hard samples say (1.0, 0.5)
    out = output([[[0.0, 0.0], [0.0, 0.0]]], gate_probs=[[0.6, 0.6], [0.6, 0.6]], gate_decisions=DECISIONS)
    target = torch.tensor([0, 1])
    official = SPNetCriterion(stage_heads=False, gamma=0.0, teacher_enabled=False, cost_weight=2.0,
                              target_rate=0.8, cost_reduction="mean", cost_rate="decisions")
    paper = SPNetCriterion(stage_heads=False, gamma=0.0, teacher_enabled=False, cost_weight=1.0, target_rate=0.8)
    assert official(out, target)["cost"].item() == pytest.approx(0.065)       # mean over blocks of (0.04, 0.09)
    assert official(out, target)["total"].item() == pytest.approx(LN2 + 2.0 * 0.065)
    assert paper(out, target)["cost"].item() == pytest.approx(2 * 0.2**2)    # Σ over blocks of (0.04, 0.04)


# ------------------------------------------------------------------------------------- L_cls
# three heads, 2 classes, one sample with label 1:
#   [0, 0]     -> CE = ln 2
#   [0, ln 3]  -> p1 = 3/4, CE = ln 4/3
#   [ln 3, 0]  -> p1 = 1/4, CE = ln 4          (the final head)
HEADS = [[[0.0, 0.0]], [[0.0, LN3]], [[LN3, 0.0]]]


def test_classification_code_weights_by_hand():
    out, y = output(HEADS), torch.tensor([1])
    paper = classification_loss(out.stage_logits, y, True, "paper")
    code = classification_loss(out.stage_logits, y, True, "code")
    assert paper.item() == pytest.approx(LN2 + math.log(4 / 3) + math.log(4))
    # official train_cifar.py: final 1.0, middle 0.2, first 0.1
    assert code.item() == pytest.approx(0.1 * LN2 + 0.2 * math.log(4 / 3) + 1.0 * math.log(4))
    assert classification_loss(out.stage_logits, y, False, "code").item() == pytest.approx(math.log(4))


def test_classification_code_rejects_five_heads():
    with pytest.raises(ValueError, match="loss.cls_form='code'"):
        classification_loss([torch.zeros(1, 2)] * 5, torch.tensor([0]), True, "code")


# ------------------------------------------------------------------------------------- L_logits
def test_logits_code_has_the_official_extra_tenth():
    # one head: student [1, 2], teacher [0, 0] -> MSE = (1 + 4) / 2 = 2.5, official x 0.1 -> 0.25
    s, t = output([[[1.0, 2.0]]]), output([[[0.0, 0.0]]])
    assert logits_loss(s, t, "code").item() == pytest.approx(0.25)


def test_logits_without_stage_heads_distils_only_the_final_head():
    # teacher final [0, 0] -> p = (1/2, 1/2); student final [0, ln 3] -> q = (1/4, 3/4)
    # KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3); the first head's (large) KL must not count
    s = output([[[5.0, -5.0]], [[0.0, LN3]]])
    t = output([[[-5.0, 5.0]], [[0.0, 0.0]]])
    crit = SPNetCriterion(stage_heads=False, alpha=0.0, beta=1.0, gamma=0.0)
    terms = crit(s, torch.tensor([1]), t)
    assert terms["logits"].item() == pytest.approx(0.5 * LN2 + 0.5 * math.log(2 / 3))
    terms["total"].backward()
    assert s.stage_logits[0].grad is None  # no gradient into the unsupervised head
    with_heads = SPNetCriterion(stage_heads=True, alpha=0.0, beta=1.0, gamma=0.0)(s, torch.tensor([1]), t)
    assert with_heads["logits"].item() > terms["logits"].item() + 1.0


# ------------------------------------------------------------------------------------- L_evo
def test_to_final_evolution_loss_by_hand():
    f = [[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]]  # d_1 = f3 - f1 = (1, 1), d_2 = f3 - f2 = (0, 1)
    assert to_final_evolution_loss([torch.tensor(x) for x in f]).item() == pytest.approx(1 - 1 / math.sqrt(2))
    # K = 4 (ImageNet): d = (1,1), (0,1), (1,0); pairs (0,1), (1,2), (0,2): cos 1/√2, 0, 1/√2
    f4 = [[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]
    assert to_final_evolution_loss([torch.tensor(x) for x in f4]).item() == pytest.approx(3 - math.sqrt(2))
    assert to_final_evolution_loss([torch.zeros(1, 2)] * 2).item() == 0.0


def test_criterion_to_final_strategy_uses_the_pairwise_form():
    feats = [[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]]
    out = output(HEADS, stage_features=feats)
    terms = SPNetCriterion(teacher_enabled=False, gamma=1.0, evo_strategy="to_final")(out, torch.tensor([1]))
    assert terms["evo"].item() == pytest.approx(1 - 1 / math.sqrt(2))  # no ½: cosine_embedding_loss


def test_code_cifar_and_within_stage_chains_use_raw_pooled_features():
    # 7 blocks: stage 0 has 4 (first, middle = index 2, last), stage 1 has 3
    pooled = [[[float(i), 0.0]] for i in range(7)]
    aligned = [[[0.0, float(i)]] for i in range(7)]
    out = output(HEADS, block_pooled=pooled, block_features=aligned, block_stage=(0, 0, 0, 0, 1, 1, 1))
    chains = evolution_features(out, "code_cifar")
    assert [[c[0, 0].item() for c in chain] for chain in chains] == [[0.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    within = evolution_features(out, "blocks_within_stage")
    assert [[c[0, 0].item() for c in chain] for chain in within] == [[0, 1, 2, 3], [4, 5, 6]]
    across = evolution_features(out, "blocks")
    assert [c[0, 1].item() for c in across[0]] == list(range(7))  # aligned ones across stages
    # code_cifar chain of stage 0: diffs (2, 0) and (1, 0) point the same way -> ½(1 − 1) = 0
    assert evolution_loss(chains[0]).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("stage_heads, gamma, strategy, aux, blocks", [
    (True, 1e-4, "stages", True, False),
    (False, 0.0, "none", False, False),        # Table 3 baseline / EXP-1: no stage heads built
    (False, 1e-4, "none", False, False),
    (False, 1e-4, "stages", True, False),      # aligners needed by L_evo
    (False, 1e-4, "to_final", True, False),
    (True, 1e-4, "blocks", True, True),
    (False, 1e-4, "code_cifar", False, True),
    (True, 0.0, "blocks_within_stage", True, False),
])
def test_what_the_model_must_build(stage_heads, gamma, strategy, aux, blocks):
    assert needs_aux_heads(stage_heads, gamma, strategy) is aux
    assert needs_block_features(gamma, strategy) is blocks
