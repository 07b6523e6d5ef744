"""Inference-only execution of gated ResNets, applied to a model as a rewrite.

The models (``spnet_dist.models``) compute the masked forward: every block's residual branch for
every sample, multiplied by its 0/1 gate. Everything here is for eval-mode models only and keeps
their function:

* :func:`set_execution`: skip the residual branch of closed samples (gather or capacity
  strategy, ``blocks.py``), run the large early stages one image at a time on the CPU and pass
  the routers' pools along (``network.py``), keep spare buffers between forwards (``spare.py``);
* :func:`optimize_for_inference`: fold BatchNorm into the layer before it and run 1x1
  convolutions on oneDNN (``fuse.py``).

    from spnet_dist.execution import optimize_for_inference, set_execution
    set_execution(model.eval(), "skip", skip_strategy="gather")
    set_execution(model, "masked")  # masked; the plain model again if nothing else was set
    reset_execution(model)  # the plain model again, whatever was set
"""
from .blocks import PoolingRouter, SkippingBlock, gather_samples, scatter_samples_, skip_capacity
from .fuse import FoldedBatchNorm, PointwiseConv, optimize_for_inference
from .network import (InferenceResNet, count_per_image_stages, execution_plan, reset_execution, restore_execution,
                      set_execution, skip_capacities)
from .plan import (EXECUTION_MODES, PER_IMAGE_STAGES, SKIP_STRATEGIES, ExecutionPlan, check_execution,
                   check_per_image_stages, check_skip_strategy, resolve_skip_strategy)

__all__ = [
    "EXECUTION_MODES",
    "PER_IMAGE_STAGES",
    "SKIP_STRATEGIES",
    "ExecutionPlan",
    "FoldedBatchNorm",
    "InferenceResNet",
    "PointwiseConv",
    "PoolingRouter",
    "SkippingBlock",
    "check_execution",
    "check_per_image_stages",
    "check_skip_strategy",
    "count_per_image_stages",
    "execution_plan",
    "gather_samples",
    "optimize_for_inference",
    "reset_execution",
    "restore_execution",
    "resolve_skip_strategy",
    "scatter_samples_",
    "set_execution",
    "skip_capacities",
    "skip_capacity",
]
