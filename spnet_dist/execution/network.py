"""Run an eval-mode gated ResNet by an execution plan: skipping blocks, per-image stages, pool reuse.

:func:`set_execution` applies an :class:`~spnet_dist.execution.plan.ExecutionPlan` to a model in
place, the way ``fuse.py`` rewrites 1x1 convolutions: the network becomes an
:class:`InferenceResNet`, its routers :class:`~spnet_dist.execution.blocks.PoolingRouter` and, to
skip, its blocks :class:`~spnet_dist.execution.blocks.SkippingBlock`, each a subclass of the
model's own class made once per class here. Parameters, buffers, state-dict keys,
``isinstance(model, GatedResNet)``, ``model.to`` / ``eval`` / ``copy.deepcopy`` are unchanged.
Back at the default plan (masked, no per-image stages, default capacities; :func:`reset_execution`)
every module is its plain class again with the attributes it had before: the training forward
never runs here.

What an :class:`InferenceResNet` adds to the masked forward, in eval mode only (training mode
runs the model's own forward):

* the skipping blocks, with the capacity strategy's exact fallback: the OR of the blocks'
  overflow flags is read once per forward, and the forward is redone with gathers if set;
* the per-image stages (:meth:`InferenceResNet.count_per_image_stages`);
* the routers' global pools passed along: a block that left its closed samples unchanged pools
  only its open rows for the next router, and the per-image stages pool each image while it is
  in cache;
* spare buffers (``spare.py``) for the gathered samples and the joined batch, per model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, TypeVar, Union

import torch
from torch import Tensor, nn

from ..models.blocks import GatedBasicBlock, GatedBlock, GatedBottleneck
from ..models.gates import GateOutput, Router, global_pool
from ..models.output import SPNetOutput
from ..models.resnet import GatedCifarResNet, GatedImageNetResNet, GatedResNet, Trunk
from .blocks import PoolingRouter, SkippingBlock, skip_capacity
from .plan import DEFAULT_PLAN, ExecutionPlan
from .spare import Spare, batch_view

_Module = TypeVar("_Module", bound=nn.Module)


class _Spares:
    """A model's spare buffers (spare.py): the open samples its skipping blocks gather (up to a
    batch-sized activation, 26 MB in ResNet-50's stage 3 at batch 32), and the batch its per-image
    stages are joined into (51 MB at batch 32 for ResNet-50 at 224 px, more than glibc serves from
    its heap: a fresh one came from an mmap whose 12.5k pages the kernel zeroed, ~15 ms a forward)."""

    def __init__(self) -> None:
        self.gathered = Spare()
        self.joined = Spare()


class _BlockRun:
    """How the blocks of one forward run (``GatedResNet._run_stages``'s step), and what they pass on.

    Attributes:
        pooled: ``global_pool`` of the next block's input when the last block knew it, else None.
        overflow: the capacity blocks' overflow flags (0-dim device bools, never read here).
    """

    __slots__ = ("pooled", "overflow", "_gathered", "_rates", "_margin", "_multiple")

    def __init__(self, model: "InferenceResNet", step: str, device: torch.device) -> None:
        self.pooled: Optional[Tensor] = None
        self.overflow: list[Tensor] = []
        self._gathered = model._spares.gathered
        if step == "capacity":
            plan = model.execution_plan
            self._rates = dict(zip(model.gated_blocks(), plan.rates(model.num_blocks)))
            self._margin, self._multiple = plan.capacity_margin, plan.multiple(device)

    def masked(self, block: GatedBlock, x: Tensor) -> tuple[Tensor, GateOutput]:
        gate = block.router(x, self.pooled)
        self.pooled = None
        return block.forward_masked(x, gate.decision), gate

    def gather(self, block: SkippingBlock, x: Tensor) -> tuple[Tensor, GateOutput]:
        out, gate, self.pooled = block.forward_gather(x, self.pooled, self._gathered)
        return out, gate

    def capacity(self, block: SkippingBlock, x: Tensor) -> tuple[Tensor, GateOutput]:
        capacity = skip_capacity(x.shape[0], self._rates[block], self._margin, self._multiple)
        out, gate, overflow = block.forward_capacity(x, capacity, self.pooled)
        self.pooled = None
        if overflow is not None:
            self.overflow.append(overflow)
        return out, gate


def _join(x: Tensor, parts: Sequence[Trunk]) -> Trunk:
    """The trunk of a batch from those of its consecutive parts, whose outputs were copied into ``x``."""
    return Trunk(
        x=x,
        gates=[GateOutput(torch.cat([g.logits for g in gates]), torch.cat([g.prob for g in gates]),
                          torch.cat([g.decision for g in gates])) for gates in zip(*(p.gates for p in parts))],
        stage_pooled=[torch.cat(t) for t in zip(*(p.stage_pooled for p in parts))],
        block_pooled=[torch.cat(t) for t in zip(*(p.block_pooled for p in parts))],
    )


def _then(first: Trunk, later: Trunk) -> Trunk:
    """``first`` followed by the stages that ran on its output."""
    return Trunk(later.x, first.gates + later.gates, first.stage_pooled + later.stage_pooled,
                 first.block_pooled + later.block_pooled)


class InferenceResNet(GatedResNet):
    """A gated ResNet run by its :attr:`execution_plan` in eval mode (made by :func:`set_execution`).

    Its methods set the plan, as :func:`set_execution` does; ``load_model`` returns such models.
    """

    execution_plan: ExecutionPlan
    _spares: _Spares

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> SPNetOutput:
        if self.training:
            return super().forward(x)
        self.check_input(x)
        return self._output(self._exact_trunk(x, record=True))

    def forward_features(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward_features(x)
        self.check_input(x)
        return self._exact_trunk(x, record=False).x

    def _exact_trunk(self, x: Tensor, record: bool) -> Trunk:
        """Every stage by the plan, redone with gathers if a capacity block overflowed.

        The OR of the blocks' device-side overflow flags is read here, once per forward: the
        only host sync of a capacity-strategy forward (none at all when no block has fewer
        slots than the batch). An overflow means some open sample did not run its residual,
        so the whole forward is recomputed with exact gathers (the in-place block sums have
        overwritten the intermediate activations, so it cannot resume mid-network).
        """
        trunk, overflow = self._trunk(x, self.execution_plan.block_step(x.device), record)
        if overflow and bool(torch.stack(overflow).any()):
            trunk, _ = self._trunk(x, "gather", record)
        return trunk

    def _trunk(self, x: Tensor, step: str, record: bool) -> tuple[Trunk, list[Tensor]]:
        """The stem and every stage, the leading ones image by image when ``count_per_image_stages`` says so.

        Args:
            x: the input images.
            step: how every block runs: "masked", "gather" or "capacity".
            record: as in ``GatedResNet._run_stages``.

        Returns:
            The trunk and the blocks' capacity overflow flags.
        """
        run = _BlockRun(self, step, x.device)
        block_step = getattr(run, step)
        every_stage = range(self.num_stages)
        per_image = self.count_per_image_stages(x)
        if per_image == 0:
            return self._run_stages(self.forward_stem(x), every_stage, record, block_step), run.overflow
        parts, pools, joined = [], [], None
        batch_stages = every_stage[per_image:]
        for i in range(x.shape[0]):
            run.pooled = None
            part = self._run_stages(self.forward_stem(x[i:i + 1]), every_stage[:per_image], record, block_step)
            if joined is None:
                flat = self._spares.joined.take(x.shape[0] * part.x[0].numel(), part.x)
                joined = batch_view(flat, x.shape[0], part.x)
            joined[i:i + 1].copy_(part.x)  # while still in cache: measured ~25 % cheaper than one torch.cat at the end
            if batch_stages:
                # The next router's pool, while the image is in cache (bitwise what pooling the joined
                # batch gives: 6 ms of a batch-32 ResNet-50 forward that way, under 1.5 ms here).
                pools.append(run.pooled if run.pooled is not None else global_pool(part.x))
            parts.append(dataclasses.replace(part, x=joined))  # the image's own output can go now
        run.pooled = torch.cat(pools) if pools else None
        trunk = _then(_join(joined, parts), self._run_stages(joined, batch_stages, record, block_step))
        if trunk.x.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            self._spares.joined.give(flat)  # else the joined batch is the result (every stage ran per image): the caller's now
        return trunk, run.overflow

    def count_per_image_stages(self, x: Tensor) -> int:
        """How many leading stages (with the stem) run one image at a time for input ``x``.

        "auto" (``per_image_stages``): in eval mode on the CPU, the stem and the leading stages
        whose output holds at least ``per_image_min_bytes`` per image (ResNet-50 at 224 px: stem,
        stages 1 and 2), then the rest on the whole batch.

        Why: at batch 32 those activations are 50-100 MB tensors. glibc maps every allocation
        that large fresh from the kernel, which zeroes each page on first touch, and a pass over
        100 MB misses every cache; one image's 1.6-3.2 MB tensors are reused from the heap and
        stay in cache. Measured on ResNet-50, batch 32, 1 CPU thread, routers open for half
        the samples (tools/bench_inference.py): the dense forward 2.43 -> 2.09 s, the skipping
        forward 1.54 -> 1.22 s; a skipping block at batch 1 needs no gather at all. The later
        stages keep the batch: their weights are large next to one image's activations (a
        ResNet-50 stage-3 block per image was 15 % slower, the first one 3 % of the whole dense
        forward). Outputs are the same up to float rounding (in eval mode every layer works per
        sample). GPUs want whole batches: "auto" leaves CUDA inputs alone. Without autograd the
        batch the images are joined into is kept for the next forward (a fresh one cost ~15 ms
        of page zeroing per forward).

        0 while a graph is captured (torch.compile, torch.export and the ONNX exporter, jit
        tracing): the per-image loop would unroll at the traced batch size.
        """
        plan = self.execution_plan
        if plan.per_image_stages == "off" or self.training or x.device.type != "cpu" or x.shape[0] == 1:
            return 0
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return 0
        height, width = x.shape[-2:]
        stride, count = self.stem_stride, 0
        for stage_idx, channels in enumerate(self.stage_widths):
            stride *= 1 if stage_idx == 0 else 2
            output_bytes = channels * math.ceil(height / stride) * math.ceil(width / stride) * x.element_size()
            if output_bytes < plan.per_image_min_bytes:
                break
            count += 1
        return count

    # ---------------------------------------------------------------- the plan, as methods
    def set_execution(self, mode: Optional[str] = None, **options) -> "GatedResNet":
        """:func:`set_execution` on this model (it may become its plain class again)."""
        return set_execution(self, mode, **options)

    def set_skip_strategy(self, strategy: str) -> None:
        """How "skip" runs (``blocks.py``): "gather" (exact work, one host sync per block on CUDA),
        "capacity" (a fixed number of samples per block, one host sync per forward, exact fallback
        on overflow) or "auto" (capacity on CUDA, gather elsewhere)."""
        set_execution(self, skip_strategy=strategy)

    def set_skip_capacity(self, rates: Union[float, Sequence[float], None] = None, margin: Optional[float] = None,
                          multiple: Optional[int] = None) -> None:
        """Set the capacity rule of the capacity skip strategy (``blocks.skip_capacity``).

        Args:
            rates: expected execution rate of every block (one value for all, or one per block in
                execution order), each in [0, 1]; None keeps the current ones.
            margin: binomial standard deviations added to the expected open count (>= 0); None keeps it.
            multiple: capacities are rounded up to a multiple of it (>= 1); None keeps it.
        """
        set_execution(self, capacity_rates=rates, capacity_margin=margin, capacity_multiple=multiple)

    def skip_capacities(self, batch: int, device: Union[str, torch.device] = "cpu") -> list[int]:
        """Every block's capacity for a batch of ``batch`` on ``device`` (capacity strategy)."""
        return skip_capacities(self, batch, device)

    def set_per_image_stages(self, mode: str, min_bytes: Optional[int] = None) -> None:
        """"auto" or "off" (:meth:`count_per_image_stages`); ``min_bytes``: the per-image size of a
        stage's output from which it runs per image, None keeps the current one (1 MiB)."""
        set_execution(self, per_image_stages=mode, per_image_min_bytes=min_bytes)


# ---------------------------------------------------------------- applying a plan

# Each plain class's execution subclass, and back.
_VARIANTS: dict[tuple[type, type], type] = {}
_PLAIN: dict[type, type] = {}
_PREFIX = {InferenceResNet: "Inference", SkippingBlock: "Skipping", PoolingRouter: "Pooling"}


def _variant(mixin: type, plain: type) -> type:
    """``plain``'s subclass with ``mixin``'s methods (``mixin`` itself when ``plain`` is its base)."""
    variant = _VARIANTS.get((mixin, plain))
    if variant is None:
        if mixin.__bases__ == (plain,):
            variant = mixin
        else:
            name = _PREFIX[mixin] + plain.__name__
            if name in globals():
                name = f"{name}_{len(_VARIANTS)}"
            variant = type(name, (mixin, plain), {"__module__": __name__, "__qualname__": name, "__doc__": (
                f"{plain.__name__} with {mixin.__name__}'s forward (made by spnet_dist.execution.set_execution).")})
            globals()[name] = variant  # importable by name: a switched model pickles
        _VARIANTS[(mixin, plain)] = variant
        _PLAIN[variant] = plain
    return variant


for _mixin, _plain in ((InferenceResNet, GatedCifarResNet), (InferenceResNet, GatedImageNetResNet),
                       (SkippingBlock, GatedBasicBlock), (SkippingBlock, GatedBottleneck), (PoolingRouter, Router)):
    _variant(_mixin, _plain)


def _switch(module: _Module, mixin: type, on: bool) -> None:
    """Give ``module`` ``mixin``'s forward (``on``) or its plain class back."""
    cls = type(module)
    if on and not issubclass(cls, mixin):
        module.__class__ = _variant(mixin, cls)
    elif not on and issubclass(cls, mixin):
        module.__class__ = _PLAIN[cls]


def execution_plan(model: GatedResNet) -> ExecutionPlan:
    """The plan ``model`` runs by (the default one for a plain model)."""
    return model.execution_plan if isinstance(model, InferenceResNet) else DEFAULT_PLAN


def set_execution(model: GatedResNet, mode: Optional[str] = None, *, skip_strategy: Optional[str] = None,
                  per_image_stages: Optional[str] = None, per_image_min_bytes: Optional[int] = None,
                  capacity_rates: Union[float, Sequence[float], None] = None, capacity_margin: Optional[float] = None,
                  capacity_multiple: Optional[int] = None) -> GatedResNet:
    """Set how the eval-mode ``model`` runs, in place; every argument left None keeps its current value.

    Back at the default plan (:class:`~spnet_dist.execution.plan.ExecutionPlan`: masked, per-image
    stages off, default capacities, gather; or :func:`reset_execution`) the model and its modules
    are their plain classes again, with the attributes they had before.

    Args:
        model: a gated ResNet (plain or already switched).
        mode: "skip" (a block's residual branch runs only on its open samples) or "masked".
        skip_strategy: how "skip" runs: "gather", "capacity" or "auto" (``blocks.py``).
        per_image_stages: "auto" or "off" (:meth:`InferenceResNet.count_per_image_stages`).
        per_image_min_bytes: the per-image output size from which a stage runs per image.
        capacity_rates: expected execution rate of every block (one value for all, or one per
            block in execution order), each in [0, 1] (``blocks.skip_capacity``).
        capacity_margin: binomial standard deviations added to the expected open count (>= 0).
        capacity_multiple: capacities are rounded up to a multiple of it (>= 1).

    Returns:
        ``model``.
    """
    return _apply(model, execution_plan(model).changed(
        model.num_blocks, mode=mode, skip_strategy=skip_strategy, per_image_stages=per_image_stages,
        per_image_min_bytes=per_image_min_bytes, capacity_rates=capacity_rates, capacity_margin=capacity_margin,
        capacity_multiple=capacity_multiple))


def reset_execution(model: GatedResNet) -> GatedResNet:
    """The plain model again (the default plan): every module its own class, with the attributes it
    had before :func:`set_execution`, whatever was set; returns ``model``."""
    return _apply(model, DEFAULT_PLAN)


def restore_execution(model: GatedResNet, plan: ExecutionPlan) -> GatedResNet:
    """Put back a plan taken with :func:`execution_plan` exactly (the plain model for the default
    plan): a compiled training graph's guards see the same classes and attributes again, so a
    temporary switch (evaluation, path snapshots) does not recompile it."""
    return _apply(model, plan)


def _apply(model: GatedResNet, plan: ExecutionPlan) -> GatedResNet:
    switched = plan != DEFAULT_PLAN
    for block in model.gated_blocks():
        _switch(block, SkippingBlock, switched and plan.mode == "skip")
        _switch(block.router, PoolingRouter, switched)
    _switch(model, InferenceResNet, switched)
    if switched:
        model.execution_plan = plan
        if "_spares" not in model.__dict__:
            model._spares = _Spares()
    else:
        for name in ("execution_plan", "_spares"):
            model.__dict__.pop(name, None)
    return model


def skip_capacities(model: GatedResNet, batch: int, device: Union[str, torch.device] = "cpu") -> list[int]:
    """Every block's capacity under the capacity strategy for a batch of ``batch`` on ``device``."""
    plan, device = execution_plan(model), torch.device(device)
    return [skip_capacity(batch, rate, plan.capacity_margin, plan.multiple(device))
            for rate in plan.rates(model.num_blocks)]


def count_per_image_stages(model: GatedResNet, x: Tensor) -> int:
    """How many leading stages of ``model`` run one image at a time for input ``x`` (0 for a plain model)."""
    return model.count_per_image_stages(x) if isinstance(model, InferenceResNet) else 0
