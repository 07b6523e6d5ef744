"""SP-Net training objective (paper §3.2–3.4, §4.3) as pure functions plus one criterion.

    L_total = L_cls + α·L_path + β·L_logits + γ·L_evo (+ w_cost·L_cost)        (paper eq. 12)

Every function takes tensors (or ``SPNetOutput`` objects) and returns a scalar tensor; nothing
here holds state. Where the official code (huanyuhello/SP-Net) differs from the paper, the
paper form is the default and the code form is selectable (docs/paper_fidelity.md).

All terms are computed in fp32 whatever the autocast dtype of the inputs: the distillation terms
are small differences of similar numbers and bf16 would round them away. Teacher tensors are
detached inside every function, so no gradient can reach the dynamic auxiliary module even if a
caller forgets ``torch.no_grad``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spnet_dist.models.from_config import needs_aux_heads, needs_block_features  # noqa: F401 (re-exported)
from spnet_dist.models.output import SPNetOutput

PATH_FORMS = ("paper", "code")
LOGITS_FORMS = ("paper", "code")
EVO_STRATEGIES = ("stages", "blocks", "blocks_within_stage", "to_final", "code_cifar")
COST_FORMS = ("two_sided", "hinge")
COST_REDUCTIONS = ("sum", "mean")
COST_RATES = ("probs", "decisions")
CLS_FORMS = ("paper", "code")

# Official code, L_logits: weight of each head's MSE, counted from the final head backwards.
_CODE_LOGITS_WEIGHTS = (1.0, 0.2, 0.1, 0.01)
# Official code, L_logits: the weighted sum is multiplied by 0.1 once more
# (train_cifar.py / train_img.py: ``loss_kd = (loss_k1 + loss_k2 + ...) * 0.1``).
_CODE_LOGITS_SCALE = 0.1
# Official code, L_cls: CE weight of each head, counted from the final head backwards
# (train_cifar.py: 1.0, 0.2, 0.1; train_img.py: 1.0, 0.2, 0.1, 0.01).
_CODE_CLS_WEIGHTS = (1.0, 0.2, 0.1, 0.01)
# Official code, L_path: 0.1 · MSE on raw router logits.
_CODE_PATH_SCALE = 0.1


# ----------------------------------------------------------------------------------------------
# L_cls (eq. 11)
# ----------------------------------------------------------------------------------------------
def classification_loss(
    stage_logits: Sequence[Tensor], target: Tensor, stage_heads: bool, form: str = "paper"
) -> Tensor:
    """L_cls = Σ_k CE(y_k, Y) over all K stage classifiers (paper eq. 11).

    Args:
        stage_logits: K tensors (B, C), first stage first; the last one is the final head.
        target: (B,) integer class labels.
        stage_heads: if False, only the final head is supervised (no multi-stage classification,
            the "B" component of paper Table 3 switched off).
        form: "paper": unweighted sum (eq. 11). "code": Σ_k w_k · CE with w = 1, 0.2, 0.1, 0.01
            from the final head backwards (official code), see :func:`code_head_weights`.
    """
    if not stage_heads:
        return F.cross_entropy(stage_logits[-1].float(), target)
    if form == "paper":
        return sum(F.cross_entropy(y.float(), target) for y in stage_logits)
    if form == "code":
        weights = code_head_weights(len(stage_logits), _CODE_CLS_WEIGHTS, "cls_form")
        return sum(w * F.cross_entropy(y.float(), target) for w, y in zip(weights, stage_logits))
    raise ValueError(f"loss.cls_form must be one of {CLS_FORMS}, got {form!r}")


# ----------------------------------------------------------------------------------------------
# L_path (eq. 7)
# ----------------------------------------------------------------------------------------------
def path_loss(student: SPNetOutput, teacher: SPNetOutput, form: str = "paper") -> Tensor:
    """Executing-path distillation from the teacher (dynamic auxiliary module).

    Args:
        student: output of the dynamic inference network F^d.
        teacher: output of the EMA teacher F^t (detached here).
        form: "paper": Σ_n (v_n^t − v_n^d)² on execution probabilities, summed over blocks and
            averaged over the batch (eq. 7). "code": 0.1 · MSE of the raw router logits
            (B, N, 2), mean over all elements (official code).
    """
    if form == "paper":
        v_d = student.gate_probs.float()  # (B, N)
        v_t = teacher.gate_probs.detach().float()  # (B, N)
        _check_same_shape("gate_probs", v_d, v_t)
        return (v_t - v_d).pow(2).sum(dim=1).mean()
    if form == "code":
        g_d = student.gate_logits.float()  # (B, N, 2)
        g_t = teacher.gate_logits.detach().float()  # (B, N, 2)
        _check_same_shape("gate_logits", g_d, g_t)
        return _CODE_PATH_SCALE * F.mse_loss(g_d, g_t)
    raise ValueError(f"loss.path_form must be one of {PATH_FORMS}, got {form!r}")


# ----------------------------------------------------------------------------------------------
# L_logits (eq. 8)
# ----------------------------------------------------------------------------------------------
def code_head_weights(num_heads: int, weights: Sequence[float] = _CODE_LOGITS_WEIGHTS,
                      field: str = "logits_form") -> list[float]:
    """Per-head weights of the official code, first head first (K=3 → 0.1, 0.2, 1.0).

    Args:
        num_heads: K, the number of stage classifiers (at most 4, as in the official code).
        weights: the code's weights from the final head backwards.
        field: the config field named in the error.
    """
    if not 1 <= num_heads <= len(weights):
        raise ValueError(
            f"loss.{field}='code' defines weights for 1..{len(weights)} heads "
            f"{tuple(weights)} (final head first), the model has K={num_heads}; use 'paper'"
        )
    return list(reversed(weights[:num_heads]))


def code_logits_weights(num_heads: int) -> list[float]:
    """Per-head weights of the official code's L_logits, first head first (K=3 → 0.1, 0.2, 1.0)."""
    return code_head_weights(num_heads, _CODE_LOGITS_WEIGHTS, "logits_form")


def logits_loss(
    student: SPNetOutput, teacher: SPNetOutput, form: str = "paper", final_only: bool = False
) -> Tensor:
    """Logits distillation from the teacher.

    Args:
        student: output of F^d; all K stage heads are distilled.
        teacher: output of F^t (detached here).
        form: "paper": Σ_k KL(softmax(y_k^t) ‖ softmax(y_k^d)), batch-mean (eq. 8).
            "code": 0.1 · Σ_k w_k · MSE(y_k^d, y_K^t), every head regressed onto the teacher's
            FINAL logits with weights 1, 0.2, 0.1, 0.01 from the final head backwards and the
            official code's extra factor 0.1, so β = 1 reproduces the released scripts.
        final_only: distil the final head only (no stage heads, Table 3 EXP-1): heads that
            are not supervised by labels must not feed distillation gradient into the stages.
    """
    ys_d = [y.float() for y in student.stage_logits]  # K × (B, C)
    ys_t = [y.detach().float() for y in teacher.stage_logits]  # K × (B, C)
    if len(ys_d) != len(ys_t):
        raise ValueError(f"student has {len(ys_d)} stage heads, teacher has {len(ys_t)}")
    if final_only:
        ys_d, ys_t = ys_d[-1:], ys_t[-1:]
    if form == "paper":
        # F.kl_div(input=log q, target=log p, log_target=True) = Σ p (log p − log q) = KL(p ‖ q).
        return sum(
            F.kl_div(
                F.log_softmax(y_d, dim=-1),
                F.log_softmax(y_t, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            for y_d, y_t in zip(ys_d, ys_t)
        )
    if form == "code":
        weights = code_logits_weights(len(ys_d))
        final_t = ys_t[-1]  # (B, C)
        return _CODE_LOGITS_SCALE * sum(w * F.mse_loss(y_d, final_t) for w, y_d in zip(weights, ys_d))
    raise ValueError(f"loss.logits_form must be one of {LOGITS_FORMS}, got {form!r}")


# ----------------------------------------------------------------------------------------------
# L_evo (eq. 9–10, Table 5)
# ----------------------------------------------------------------------------------------------
def evolution_loss(features: Sequence[Tensor]) -> Tensor:
    """Feature-evolution direction loss ½ Σ_i (1 − cos(d_{i+1}, d_i)) (paper eq. 9–10).

    d_i = f_{i+1} − f_i are first-order differences of consecutive aligned features (eq. 9);
    the cosine is taken per sample over the feature dim and the loss is averaged over the batch.

    Args:
        features: M tensors (B, D) of aligned features, in network order. With M < 3 there is
            no pair of differences, so the loss is 0.
    """
    if len(features) < 3:
        ref = features[0] if features else None
        return torch.zeros((), device=ref.device if ref is not None else None)
    # One stacked tensor and three kernels instead of a Python loop over the M-2 pairs.
    fs = torch.stack([f.float() for f in features])  # (M, B, D)
    diffs = fs[1:] - fs[:-1]  # (M-1, B, D), eq. 9
    cos = F.cosine_similarity(diffs[1:], diffs[:-1], dim=-1)  # (M-2, B)
    return 0.5 * (1.0 - cos).mean(dim=1).sum()


def to_final_evolution_loss(features: Sequence[Tensor]) -> Tensor:
    """Official ImageNet code's L_evo: Σ_{i<j} (1 − cos(d_i, d_j)) with d_k = f_K − f_k.

    Every earlier aligned feature is differenced against the final one and every pair of those
    differences is pulled to the same direction (``train_img.py``: pairs (0,1), (1,2), (0,2) for
    K = 4), with ``F.cosine_embedding_loss`` semantics: the per-sample 1 − cos averaged over the
    batch, no ½ factor.

    Args:
        features: K tensors (B, D) of aligned stage features, the final one last. With K < 3
            there is no pair of differences and the loss is 0.
    """
    if len(features) < 3:
        ref = features[0] if features else None
        return torch.zeros((), device=ref.device if ref is not None else None)
    fs = [f.float() for f in features]
    diffs = [fs[-1] - f for f in fs[:-1]]  # (K-1) × (B, D)
    total = torch.zeros((), device=fs[0].device)
    for i in range(len(diffs)):
        for j in range(i + 1, len(diffs)):
            total = total + (1.0 - F.cosine_similarity(diffs[i], diffs[j], dim=-1)).mean()
    return total


def evolution_features(out: SPNetOutput, strategy: str = "stages") -> list[list[Tensor]]:
    """The feature chains L_evo regularises, one list per chain (paper Table 5).

    Args:
        out: the student's output.
        strategy: "stages" (EXP-3, the paper's default) and "to_final" (official ImageNet code,
            see :func:`to_final_evolution_loss`): the K aligned stage features, one chain.
            "blocks" (EXP-1): every block's output across the whole network, mapped by its
            stage's aligner (one per stage, so consecutive blocks of a stage are compared in
            the same space and a skipped block gives a zero difference), one chain.
            "blocks_within_stage" (EXP-2): one chain per stage of that stage's raw pooled
            block outputs (same width within a stage: no aligner needed, as in the official
            CIFAR code). "code_cifar" (official CIFAR code): per stage the raw pooled outputs
            of its first, middle (index n // 2) and last block; the code weights each
            1 − cos by 1, i.e. γ_code = γ / 2 here (the ½ of eq. 10).

    Returns:
        A list of chains; each chain is a list of (B, D) tensors in network order.
    """
    if strategy in ("stages", "to_final"):
        return [list(out.stage_features)]
    if strategy not in EVO_STRATEGIES:
        raise ValueError(f"loss.evo_strategy must be one of {EVO_STRATEGIES}, got {strategy!r}")
    if out.block_features is None:
        raise ValueError(f"loss.evo_strategy={strategy!r} needs a model built with block_align=True")
    if strategy == "blocks":
        return [list(out.block_features)]
    pooled = out.block_pooled if out.block_pooled is not None else out.block_features
    if len(out.block_stage) != len(pooled):
        raise ValueError(f"block_stage has {len(out.block_stage)} entries, block features {len(pooled)}")
    chains: dict[int, list[Tensor]] = {}
    for stage, feat in zip(out.block_stage, pooled):
        chains.setdefault(stage, []).append(feat)
    stage_chains = [chains[s] for s in sorted(chains)]
    if strategy == "code_cifar":
        return [[c[0], c[len(c) // 2], c[-1]] for c in stage_chains]
    return stage_chains


# ----------------------------------------------------------------------------------------------
# L_cost (§4.3)
# ----------------------------------------------------------------------------------------------
def cost_loss(rates_from: Tensor, target: float, form: str = "two_sided", reduction: str = "sum") -> Tensor:
    """Execution-rate regulariser that steers the computational cost (paper §4.3).

    Args:
        rates_from: (B, N) per-sample execution values of the student: the noise-free
            probabilities ``gate_probs`` (paper: "relaxed executing decision") or the hard
            straight-through samples ``gate_decisions`` (official code: ``w[:, 1]``).
        target: t, the target execution rate in [0, 1].
        form: "two_sided": (r_n − t)² (paper §4.3, official CIFAR code). "hinge":
            relu(r_n − t)², only rates above the target are penalised (official ImageNet code).
            r_n = mean over the batch of block n's values is its execution rate.
        reduction: "sum" over the N blocks (paper §4.3: Σ_n) or "mean" (official code:
            ``acts / len(activation_rates)``; N times weaker, times the code's ``lossfact``).
    """
    rates = rates_from.float().mean(dim=0)  # (N,)
    excess = rates - target  # (N,)
    if form == "two_sided":
        per_block = excess.pow(2)
    elif form == "hinge":
        per_block = F.relu(excess).pow(2)
    else:
        raise ValueError(f"loss.cost_form must be one of {COST_FORMS}, got {form!r}")
    if reduction == "sum":
        return per_block.sum()
    if reduction == "mean":
        return per_block.mean()
    raise ValueError(f"loss.cost_reduction must be one of {COST_REDUCTIONS}, got {reduction!r}")


# ----------------------------------------------------------------------------------------------
# The criterion
# ----------------------------------------------------------------------------------------------
def _check_same_shape(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {name} {tuple(student.shape)} and teacher {name} {tuple(teacher.shape)} differ"
        )


def _check_weight(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"loss.{name} must be a finite number >= 0, got {value!r}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"loss.{name} must be one of {tuple(choices)}, got {value!r}")


class SPNetCriterion(nn.Module):
    """L_total = L_cls + α·L_path + β·L_logits + γ·L_evo + w_cost·L_cost (eq. 12, §4.3).

    A term is computed only when it is switched on: teacher terms need ``teacher_enabled`` and a
    positive weight, L_evo needs γ > 0 and a strategy other than "none", L_cost needs
    ``cost_weight > 0`` (which requires ``target_rate``). With everything off the total is
    exactly ``F.cross_entropy`` on the final head.

    Args:
        stage_heads: supervise all K stage classifiers (eq. 11) or only the final one.
        alpha: α, weight of L_path.
        beta: β, weight of L_logits.
        gamma: γ, weight of L_evo.
        path_form: "paper" | "code", see :func:`path_loss`.
        logits_form: "paper" | "code", see :func:`logits_loss`.
        evo_strategy: "stages" | "blocks" | "blocks_within_stage" | "to_final" | "code_cifar" |
            "none", see :func:`evolution_features`.
        cost_weight: weight of L_cost; 0 switches it off (the official code's ``lossfact``).
        target_rate: t in [0, 1], the target execution rate of L_cost.
        cost_form: "two_sided" | "hinge", see :func:`cost_loss`.
        cost_reduction: "sum" (paper) | "mean" (official code) over blocks, see :func:`cost_loss`.
        cost_rate: "probs" (paper: noise-free execution probabilities) | "decisions" (official
            code: hard straight-through samples), what the block rates are averaged from.
        cls_form: "paper" | "code" (per-head CE weights 1, 0.2, 0.1, 0.01 from the final head
            backwards), see :func:`classification_loss`.
        teacher_enabled: whether an EMA teacher exists; without it L_path and L_logits are skipped.
    """

    FIELDS = (
        "stage_heads", "alpha", "beta", "gamma", "path_form", "logits_form",
        "evo_strategy", "cost_weight", "target_rate", "cost_form",
        "cost_reduction", "cost_rate", "cls_form",
    )

    def __init__(
        self,
        *,
        stage_heads: bool = True,
        alpha: float = 1.0,
        beta: float = 0.5,
        gamma: float = 1e-4,
        path_form: str = "paper",
        logits_form: str = "paper",
        evo_strategy: str = "stages",
        cost_weight: float = 0.0,
        target_rate: Optional[float] = None,
        cost_form: str = "two_sided",
        cost_reduction: str = "sum",
        cost_rate: str = "probs",
        cls_form: str = "paper",
        teacher_enabled: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(stage_heads, bool):
            raise ValueError(f"loss.stage_heads must be true or false, got {stage_heads!r}")
        if not isinstance(teacher_enabled, bool):
            raise ValueError(f"teacher_enabled must be true or false, got {teacher_enabled!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("cost_weight", cost_weight)):
            _check_weight(name, value)
        _check_choice("path_form", path_form, PATH_FORMS)
        _check_choice("logits_form", logits_form, LOGITS_FORMS)
        _check_choice("evo_strategy", evo_strategy, EVO_STRATEGIES + ("none",))
        _check_choice("cost_form", cost_form, COST_FORMS)
        _check_choice("cost_reduction", cost_reduction, COST_REDUCTIONS)
        _check_choice("cost_rate", cost_rate, COST_RATES)
        _check_choice("cls_form", cls_form, CLS_FORMS)
        if target_rate is not None and (
            isinstance(target_rate, bool)
            or not isinstance(target_rate, (int, float))
            or not 0.0 <= target_rate <= 1.0
        ):
            raise ValueError(f"loss.target_rate must be in [0, 1] or null, got {target_rate!r}")
        if cost_weight > 0 and target_rate is None:
            raise ValueError("loss.cost_weight > 0 needs loss.target_rate (a rate in [0, 1])")

        self.stage_heads = stage_heads
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.path_form, self.logits_form = path_form, logits_form
        self.evo_strategy = evo_strategy
        self.cost_weight = float(cost_weight)
        self.target_rate = None if target_rate is None else float(target_rate)
        self.cost_form = cost_form
        self.cost_reduction, self.cost_rate, self.cls_form = cost_reduction, cost_rate, cls_form
        self.teacher_enabled = teacher_enabled

    @classmethod
    def from_config(cls, loss_cfg: Any, teacher_enabled: bool) -> "SPNetCriterion":
        """Build from any object carrying the ``loss`` section's fields as attributes.

        Args:
            loss_cfg: e.g. the ``loss`` dataclass of ``spnet_dist.config``; must have every name in
                :attr:`FIELDS` (a missing one is an error, not a silent default).
            teacher_enabled: whether the run has an EMA teacher (the ``teacher`` section).
        """
        missing = [name for name in cls.FIELDS if not hasattr(loss_cfg, name)]
        if missing:
            raise ValueError(f"loss config lacks field(s) {', '.join('loss.' + m for m in missing)}")
        return cls(**{name: getattr(loss_cfg, name) for name in cls.FIELDS}, teacher_enabled=teacher_enabled)

    def forward(
        self, student: SPNetOutput, target: Tensor, teacher: Optional[SPNetOutput] = None
    ) -> dict[str, Tensor]:
        """Compute the enabled terms.

        Args:
            student: output of the student (the dynamic inference network).
            target: (B,) integer class labels.
            teacher: output of the EMA teacher, computed under no_grad; required when
                ``teacher_enabled``, ignored otherwise.

        Returns:
            ``{"cls", "path", "logits", "evo", "cost"}`` restricted to the enabled terms, each
            UNweighted, plus ``"total"``, the weighted sum that is back-propagated.
        """
        terms: dict[str, Tensor] = {
            "cls": classification_loss(student.stage_logits, target, self.stage_heads, self.cls_form)
        }
        total = terms["cls"]

        if self.teacher_enabled:
            if teacher is None:
                raise ValueError("teacher output is None but the criterion was built with teacher_enabled=True")
            if self.alpha > 0:
                terms["path"] = path_loss(student, teacher, self.path_form)
                total = total + self.alpha * terms["path"]
            if self.beta > 0:
                # Without stage heads only the final head is supervised, so only it is distilled.
                terms["logits"] = logits_loss(student, teacher, self.logits_form, final_only=not self.stage_heads)
                total = total + self.beta * terms["logits"]

        if self.gamma > 0 and self.evo_strategy != "none":
            chains = evolution_features(student, self.evo_strategy)
            if self.evo_strategy == "to_final":
                terms["evo"] = to_final_evolution_loss(chains[0])
            else:
                terms["evo"] = sum(evolution_loss(chain) for chain in chains)
            total = total + self.gamma * terms["evo"]

        if self.cost_weight > 0:
            rates_from = student.gate_probs if self.cost_rate == "probs" else student.gate_decisions
            terms["cost"] = cost_loss(rates_from, self.target_rate, self.cost_form, self.cost_reduction)
            total = total + self.cost_weight * terms["cost"]

        terms["total"] = total
        return terms
