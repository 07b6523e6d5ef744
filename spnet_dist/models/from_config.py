"""The student a run's config describes, built with only the heads its loss reads.

Takes the config duck-typed (anything with ``model.*`` and ``loss.*`` attributes, such as
``spnet_dist.config.Config``): the models never import the config schema or the losses.
"""
from __future__ import annotations

from typing import Any

from .factory import create_model
from .resnet import GatedResNet, load_torchvision_weights

__all__ = ["build_model", "needs_aux_heads", "needs_block_features"]


def needs_aux_heads(stage_heads: bool, gamma: float, evo_strategy: str) -> bool:
    """Whether the model must build the intermediate stage heads (aligner a_k + classifier c_k).

    Only when something reads them: the stage CE (component B) or an L_evo over aligned stage
    features. Without them, Table 3 EXP-1 has no unsupervised heads that could feed gradient
    into the early stages.
    """
    return stage_heads or (gamma > 0 and evo_strategy in ("stages", "to_final"))


def needs_block_features(gamma: float, evo_strategy: str) -> bool:
    """Whether the model must record per-block features (Table 5 EXP-1/2, official CIFAR L_evo)."""
    return gamma > 0 and evo_strategy in ("blocks", "blocks_within_stage", "code_cifar")


def build_model(cfg: Any) -> GatedResNet:
    """The student as ``cfg`` describes it (stage heads and block aligners only if the loss reads them).

    Args:
        cfg: has ``model.{name, num_classes, router_hidden, router_dropout, router_bias,
            gumbel_tau, gumbel_noise, torchvision_weights}`` and ``loss.{stage_heads, gamma,
            evo_strategy}``.
    """
    model = create_model(
        cfg.model.name,
        num_classes=cfg.model.num_classes,
        router_hidden=cfg.model.router_hidden,
        router_dropout=cfg.model.router_dropout,
        router_bias=cfg.model.router_bias,
        gumbel_tau=cfg.model.gumbel_tau,
        gumbel_noise=cfg.model.gumbel_noise,
        aux_heads=needs_aux_heads(cfg.loss.stage_heads, cfg.loss.gamma, cfg.loss.evo_strategy),
        block_align=needs_block_features(cfg.loss.gamma, cfg.loss.evo_strategy),
    )
    if cfg.model.torchvision_weights:
        load_torchvision_weights(model, cfg.model.torchvision_weights)
    return model
