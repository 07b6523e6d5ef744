"""The skipping forms of a gated block and its router (inference only).

A gated block's masked forward (``spnet_dist.models.blocks``) computes the residual branch for
every sample and multiplies it by the 0/1 gate. In eval mode a closed sample's residual is
multiplied by 0, so it need not run at all. Two ways to skip it:

* ``"gather"`` (:meth:`SkippingBlock.forward_gather`): the open samples are listed with
  ``nonzero()`` and only they run the residual. Exact work, but the host must read the list to
  size the gathered batch: one host-device synchronisation per block on CUDA (free on CPU, where
  nothing runs asynchronously).
* ``"capacity"`` (:meth:`SkippingBlock.forward_capacity`, mixture-of-experts style): the residual
  runs on a fixed number C of samples, chosen on the host from the batch size alone
  (:func:`skip_capacity`), open samples first; closed samples that fill the capacity are
  multiplied by their 0 gate (the masked arithmetic). Nothing is read from the device per block,
  so CUDA kernels queue back to back and every block sees a shape known in advance. A block whose
  open samples exceed C returns a device-side overflow flag; the network reads the OR of all
  flags once per forward and redoes the forward with ``"gather"`` (``network.py``), so the output
  is always exact.

The classes here are never built: :func:`spnet_dist.execution.set_execution` gives a model's
blocks and routers these forms by switching their class (as ``fuse.py`` switches 1x1
convolutions), and switches them back; parameters, buffers and state-dict keys do not change.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.blocks import GatedBlock
from ..models.gates import GateOutput, Router, global_pool
from .spare import Spare, batch_view


def skip_capacity(batch: int, rate: float, margin: float = 3.0, multiple: int = 1) -> int:
    """Samples a block's residual runs on under the capacity strategy, from the batch size alone.

    C = min(B, round_up(ceil(B r + k sqrt(B r (1 - r))), m)): the expected number of open
    samples plus ``margin`` binomial standard deviations, so with independent decisions at the
    block's measured rate a batch overflows rarely (k = 3: ~0.1 % per block), and an overflow
    costs a recomputation, never a wrong result.

    Args:
        batch: B.
        rate: r, the block's expected execution rate in [0, 1] (1: C = B, never overflows).
        margin: k, in binomial standard deviations.
        multiple: m; C is rounded up to a multiple of it (8 on CUDA: tensor-core friendly
            batch sizes, and fewer distinct shapes for cuDNN's autotuner).
    """
    mean = batch * rate
    # the tiny epsilon keeps float noise (10 * 0.3 = 3.0000000000000004) from adding a sample
    need = math.ceil(mean + margin * math.sqrt(max(mean * (1.0 - rate), 0.0)) - 1e-9)
    need = -(-need // multiple) * multiple
    return max(0, min(batch, need))


def _sample_rows(x: Tensor) -> Optional[Tensor]:
    """A (B, C*H*W) view of ``x`` when each sample is one contiguous block of memory (NCHW or
    channels_last), else None. Row gathers and scatters on it are plain row copies: on CPU,
    ``index_select``/``index_add_`` on it ran 1.5x/4x faster than advanced indexing and
    ``index_add_`` on the 4-D channels_last tensor (ResNet-50 stage 1, batch 32, 17 rows)."""
    if x.is_contiguous():
        return x.view(x.shape[0], -1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # a view: NHWC memory is contiguous
    return None


def gather_samples(x: Tensor, index: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``x[index]`` along the batch dimension, in ``x``'s memory format.

    Args:
        x: (B, ...) samples.
        index: (n,) sample indices.
        out: a flat tensor of at least n samples' elements to gather into (a :class:`Spare`'s);
            None allocates.
    """
    rows = _sample_rows(x)
    if rows is None:
        return x[index]  # advanced indexing keeps a channels_last layout (index_select would not)
    if out is None:
        picked = rows.index_select(0, index)
    else:
        picked = torch.index_select(rows, 0, index, out=out[:index.numel() * rows.shape[1]].view(-1, rows.shape[1]))
    return batch_view(picked.view(-1), index.numel(), x)  # rows back to (n, C, H, W) in x's layout


def scatter_samples_(out: Tensor, index: Tensor, values: Tensor, accumulate: bool) -> Tensor:
    """``out[index] += values`` (``accumulate``) or ``out[index] = values``, in place; returns ``out``."""
    rows_out, rows_values = _sample_rows(out), _sample_rows(values)
    same_layout = out.is_contiguous() == values.is_contiguous()
    if rows_out is None or rows_values is None or not same_layout:
        return out.index_add_(0, index, values) if accumulate else out.index_copy_(0, index, values)
    if accumulate:
        rows_out.index_add_(0, index, rows_values)
    else:
        rows_out.index_copy_(0, index, rows_values)
    return out


class PoolingRouter(Router):
    """A router that can be handed the global pool of its input when the caller already has it
    (a skipping block knows it for the samples it left unchanged; the per-image stages pool each
    image while it is in cache)."""

    def forward(self, x: Tensor, pooled: Optional[Tensor] = None) -> GateOutput:
        """The verdict on block input ``x``; ``pooled`` is ``global_pool(x)`` (B, C) fp32 if known."""
        return self.decide(global_pool(x) if pooled is None else pooled)


class SkippingBlock(GatedBlock):
    """A gated block whose residual branch runs only where it is needed (eval mode).

    Its router is a :class:`PoolingRouter`. In training mode it runs the masked forward.
    """

    router: PoolingRouter

    def forward(self, x: Tensor) -> tuple[Tensor, GateOutput]:
        """The block on its own: the gather form in eval mode, the masked forward in training."""
        if self.training:
            return super().forward(x)
        out, gate, _ = self.forward_gather(x)
        return out, gate

    def _closed(self, out: Tensor, in_place: bool) -> Tensor:
        """relu(shortcut) of a block closed for every sample."""
        return out if self.shortcut_nonnegative else F.relu(out, inplace=in_place)

    @staticmethod
    def _add_rows_relu(out: Tensor, index: Tensor, res: Tensor, in_place: bool) -> Tensor:
        """relu(out with ``res`` added to rows ``index``), promoting like the masked path; in place
        on ``out`` when autograd is off and no promotion is needed."""
        dtype = torch.promote_types(out.dtype, res.dtype)
        if not (in_place and out.dtype == dtype):
            out = out.to(dtype, copy=True)
        return scatter_samples_(out, index, res.to(dtype), accumulate=True).relu_()

    def forward_gather(self, x: Tensor, pooled: Optional[Tensor] = None, spare: Optional[Spare] = None
                       ) -> tuple[Tensor, GateOutput, Optional[Tensor]]:
        """relu(shortcut(x) + v * residual(x)) computing ``residual`` only where v = 1.

        Open samples run together: gather -> residual -> scatter-add (index_add_). Without
        autograd the sums are formed in place (the block input is the previous block's output,
        owned by the network), so a partly open block allocates only the gathered batch and its
        residual. The open-sample list is read on the host (``nonzero``): free on CPU; on CUDA it
        is one synchronisation per block, the price of launching the residual kernels on exactly
        the open samples.

        Args:
            x: the block input (B, C, H, W).
            pooled: ``global_pool(x)`` if known (the previous block's third result), else None.
            spare: where to gather the open samples when autograd is off on the CPU (kept between
                blocks and forwards by the network); None allocates.

        Returns:
            The output, the router's verdict, and ``global_pool(output)`` when the shortcut is the
            identity (closed samples keep their pool, open ones are pooled from their new rows:
            less than a pass over the output), else None.
        """
        if pooled is None:
            pooled = global_pool(x)  # what the router would compute; kept for the closed samples
        gate = self.router(x, pooled)
        out = self.shortcut(x)  # the shortcut always runs (projection included)
        keeps_pool = out is x  # closed samples leave the block unchanged
        open_idx = gate.decision.nonzero().squeeze(1)  # (B_open,)
        n_open = open_idx.numel()
        in_place = not torch.is_grad_enabled()
        if n_open == 0:
            return self._closed(out, in_place), gate, pooled if keeps_pool else None
        if n_open == x.shape[0]:
            res = self.residual(x)
            if in_place and res.dtype == out.dtype:
                return res.add_(out).relu_(), gate, None
            return F.relu(out + res), gate, None  # promotes like the masked path (bf16 residual, fp32 shortcut)
        # sized for the batch: any count fits. CPU only: CUDA's caching allocator reuses memory itself.
        flat = spare.take(x.numel(), x) if spare is not None and in_place and x.device.type == "cpu" else None
        x_open = gather_samples(x, open_idx, out=flat)  # (B_open, C, H, W)
        res = self.residual(x_open)
        if in_place and self.shortcut_nonnegative and res.dtype == out.dtype:
            # The closed rows of a non-negative shortcut are final already (relu is the
            # identity there): only the open rows are written, no pass over the whole batch.
            shortcut_open = x_open if keeps_pool else gather_samples(out, open_idx)
            rows = res.add_(shortcut_open).relu_()
            pooled_out = pooled.index_copy(0, open_idx, global_pool(rows)) if keeps_pool else None
            out = scatter_samples_(out, open_idx, rows, accumulate=False)
        else:
            out, pooled_out = self._add_rows_relu(out, open_idx, res, in_place), None
        if flat is not None:
            spare.give(flat)  # x_open is dead: nothing returned views it
        return out, gate, pooled_out

    def forward_capacity(self, x: Tensor, capacity: int, pooled: Optional[Tensor] = None
                         ) -> tuple[Tensor, GateOutput, Optional[Tensor]]:
        """relu(shortcut(x) + v * residual(x)) with ``residual`` run on a fixed ``capacity`` samples, open first.

        No device value is read: the capacity comes from the batch size (:func:`skip_capacity`),
        the open samples are moved to the front by a stable argsort of the decisions (a device
        op), and the first C are gathered. Their residual is multiplied by their gate, so closed
        samples that fill the capacity add exactly 0, as in the masked path. If more than C
        samples are open, the rest are dropped here and the overflow flag tells the network to
        redo the forward with the gather form.

        Args:
            x: the block input (B, C, H, W).
            capacity: C, the samples the residual runs on.
            pooled: ``global_pool(x)`` if known, else None.

        Returns:
            The output, the router's verdict, and a 0-dim device bool, True when more samples
            were open than ``capacity`` (the output is then inexact), or None when the capacity
            holds the whole batch.
        """
        gate = self.router(x, pooled)
        decision = gate.decision  # (B,)
        if capacity >= x.shape[0]:  # nothing to gather: every sample runs, closed ones times 0
            return self.forward_masked(x, decision), gate, None
        out = self.shortcut(x)  # the shortcut always runs (projection included)
        in_place = not torch.is_grad_enabled()
        overflow = decision.sum() > capacity  # 0-dim bool on the device, never read here
        if capacity == 0:
            return self._closed(out, in_place), gate, overflow
        take = torch.argsort(decision, descending=True, stable=True)[:capacity]  # (C,) open first
        res = self.residual(gather_samples(x, take))  # (C, C_out, H, W)
        factor = decision[take].view(-1, 1, 1, 1).to(res.dtype)
        res = res.mul_(factor) if in_place else res * factor
        return self._add_rows_relu(out, take, res, in_place), gate, overflow
