"""The one return type of every SP-Net forward pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class SPNetOutput:
    """What a gated ResNet returns; losses and metrics read fields by name, never by position.

    Shapes: B = batch, N = number of gated residual blocks, K = number of stage classifiers
    (3 for CIFAR ResNets, 4 for ImageNet ResNets), D = width of the aligned feature space
    (the last stage's width), C = number of classes.

    Attributes:
        logits: (B, C) output of the final classifier, the only head kept for inference.
        stage_logits: K tensors (B, C), first stage first; ``stage_logits[-1] is logits``.
        gate_probs: (B, N) v_n, the router's execution probability softmax(router_logits)[:, 1]
            without Gumbel noise; differentiable. Used by L_path and L_cost.
        gate_decisions: (B, N) u_n in {0, 1} (float), the factor each block's residual branch
            was multiplied by. In training it is the hard straight-through Gumbel sample
            (forward value 0/1, gradient of the soft sample); in eval mode logit1 > logit0.
        gate_logits: (B, N, 2) raw router logits (the official code's L_path reads these).
        stage_features: K tensors (B, D): a_k(avgpool(x_{l_k})), the aligned stage features of
            L_evo; a_K is the identity, so ``stage_features[-1]`` is the pooled final feature.
        block_features: N tensors (B, D) of per-block pooled outputs mapped by their stage's
            aligner (one aligner per stage), or None unless the model was built with
            ``block_align=True`` (L_evo strategies over blocks need them).
        block_stage: N ints, the stage index (0-based) of each gated block.
        block_pooled: N tensors (B, C_k) of raw pooled per-block outputs (None unless
            ``block_align=True``): within a stage all have the same width, no aligner needed.
    """

    logits: Tensor
    stage_logits: list[Tensor]
    gate_probs: Tensor
    gate_decisions: Tensor
    gate_logits: Tensor
    stage_features: list[Tensor]
    block_features: Optional[list[Tensor]]
    block_stage: tuple[int, ...]
    block_pooled: Optional[list[Tensor]] = None
