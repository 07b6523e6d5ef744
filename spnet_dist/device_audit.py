"""Catch GPU-only bugs on a CPU machine: tensors created without a device, host-device syncs.

On CPU every tensor lives on the same device and a host sync costs nothing, so two classes of
bug pass every CPU test and only show up on the first GPU job:

* a tensor created without ``device=`` lands on the CPU and later meets a CUDA tensor
  (``torch.stack`` / ``cat`` / arithmetic refuse mixed devices: the epoch-end crash every GPU run would have hit);
* a ``.item()``, ``float(t)``, ``nonzero()`` or ``accelerator.synchronize()`` inside the step
  stalls the GPU queue every micro-batch.

Both are visible to a :class:`~torch.overrides.TorchFunctionMode`, which sees every torch call
made while it is active. :class:`DeviceAudit` records factory calls (``torch.tensor``,
``zeros``, ``full``, ``arange``, ...) made *by this package's code* without a ``device``
argument; :class:`HostSyncCounter` counts the calls that wait for the device, plus DeepSpeed's
``accelerator.synchronize()``. Tests wrap one training step and one evaluation in them.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["DeviceAudit", "HostSyncCounter", "FACTORIES", "SYNC_CALLS", "SYNC_FUNCTIONS"]

# Factory functions that place their result on the default (CPU) device unless told otherwise.
FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
    torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
    torch.scalar_tensor,
})

# Tensor methods and functions that copy a value to the host (a sync on CUDA) or, like nonzero,
# need a device value to know their output's shape. ``bool(t)`` reaches the mode as
# ``Tensor.__bool__``; ``is_nonzero`` is the same read spelled as a call (torch.compile's dynamo
# turns ``if t:`` into it), so both are listed.
SYNC_CALLS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
    torch.Tensor.is_nonzero: "is_nonzero", torch.is_nonzero: "is_nonzero",
    torch.Tensor.__float__: "float", torch.Tensor.__int__: "int", torch.Tensor.__index__: "index",
    torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero", torch.Tensor.argwhere: "nonzero",
    torch.argwhere: "nonzero", torch.Tensor.cpu: "cpu", torch.Tensor.numpy: "numpy",
    torch.masked_select: "masked_select", torch.Tensor.masked_select: "masked_select",
    torch.equal: "equal", torch.Tensor.equal: "equal", torch.allclose: "allclose",
    torch.Tensor.allclose: "allclose", torch.unique: "unique", torch.Tensor.unique: "unique",
}

# Functions that block the host until the device has finished: ``(owner, attribute, name)``,
# patched by HostSyncCounter while it is active (they never reach a TorchFunctionMode). Only
# calls that look the attribute up at call time are seen (``torch.cuda.synchronize()``, not a
# ``from torch.cuda import synchronize`` bound earlier).
SYNC_FUNCTIONS = (
    (torch.cuda, "synchronize", "torch.cuda.synchronize"),
    (torch.cpu, "synchronize", "torch.cpu.synchronize"),
    (torch.accelerator, "synchronize", "torch.accelerator.synchronize"),
    (torch.cuda.Event, "synchronize", "torch.cuda.Event.synchronize"),
    (torch.cuda.Stream, "synchronize", "torch.cuda.Stream.synchronize"),
)

_PACKAGE = str(Path(__file__).resolve().parent)
# Host-side by design: the data pipeline builds CPU batches (pinned, then copied non_blocking).
_EXEMPT = (str(Path(_PACKAGE) / "data"),)


_TORCH = str(Path(torch.__file__).resolve().parent)
_TORCH_DATA = str(Path(_TORCH) / "utils" / "data")


def _caller_in_package(depth: int = 2) -> str | None:
    """``file:line`` of the code that made the torch call, if it is this package's (data excepted)."""
    frame = sys._getframe(depth)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH)
                                 or frame.f_code.co_filename == __file__):
        if frame.f_code.co_filename.startswith(_TORCH_DATA):
            return None  # DataLoader collation: host-side batches by design
        frame = frame.f_back  # skip torch's own wrappers (nn.Module call, overrides, ...)
    if frame is None:
        return None
    filename = frame.f_code.co_filename
    if not filename.startswith(_PACKAGE) or filename.startswith(_EXEMPT):
        return None  # DeepSpeed, tests, user code, the data pipeline: not audited here
    return f"{Path(filename).relative_to(Path(_PACKAGE).parent)}:{frame.f_lineno}"


class DeviceAudit(TorchFunctionMode):
    """Record this package's tensor factory calls that do not name a device.

    Use as a context manager around a training step / evaluation; afterwards
    :attr:`violations` lists ``"spnet_dist/train.py:123 torch.tensor"`` entries.
    """

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            where = _caller_in_package()
            if where is not None:
                self.violations.append(f"{where} torch.{func.__name__}")
        return func(*args, **kwargs)


class HostSyncCounter(TorchFunctionMode):
    """Count host-device synchronisations made by anyone (this package, DeepSpeed, torch).

    Value reads seen by the torch-function mode (:data:`SYNC_CALLS`: ``item``, ``bool(t)``,
    ``float(t)``, ``int(t)``, ``tolist``, ``cpu``, ``nonzero``, ...) and blocking waits
    (:data:`SYNC_FUNCTIONS`, counted as ``"torch.cuda.synchronize"``, ``"torch.cuda.Event.synchronize"``
    ...; DeepSpeed's ``get_accelerator().synchronize()`` as ``"accelerator.synchronize"``). On
    CUDA a DeepSpeed accelerator sync also counts as the ``torch.cuda.synchronize`` it calls.

    Args:
        patch_accelerator: also count ``deepspeed.accelerator.get_accelerator().synchronize``.
    """

    def __init__(self, patch_accelerator: bool = True) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._patch = patch_accelerator
        self._accelerator: Any = None
        self._restore: list[tuple[Any, str, Any]] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _counting(self, name: str, original: Any) -> Any:
        counts = self.counts

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    def __enter__(self) -> "HostSyncCounter":
        for owner, attr, name in SYNC_FUNCTIONS:
            original = getattr(owner, attr)
            self._restore.append((owner, attr, original))
            setattr(owner, attr, self._counting(name, original))
        if self._patch:
            from deepspeed.accelerator import get_accelerator

            self._accelerator = get_accelerator()
            # instance attribute shadows the method (the bound method is what DeepSpeed calls)
            self._accelerator.synchronize = self._counting("accelerator.synchronize", self._accelerator.synchronize)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._accelerator is not None:
            del self._accelerator.synchronize
            self._accelerator = None
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = SYNC_CALLS.get(func)
        if name is not None:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))
