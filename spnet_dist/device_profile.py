"""One resolution of every device-dependent setting: ``(config, device) -> DeviceProfile``.

Several config fields mean "it depends on the device": ``engine.channels_last: null``,
``teacher.execution: auto``, ``data.dali_device: auto``, ``engine.backend: auto``, and choices
nobody writes in the config at all (pinned memory, ``cudnn.benchmark``, how the trainer's
evaluation skips closed blocks, the compile backend). :func:`resolve_device_profile` answers all
of them once, from the config and the device the rank computes on, into one frozen
:class:`DeviceProfile`. The trainer resolves it once in its set-up and hands the answers to every
consumer (the step, the loaders, the evaluation); ``spnet-eval`` resolves its own for its device.
No other module reads those raw fields (``tests/test_device_profile.py`` checks the source).

Device-dependent inputs that cannot work on this device are refused here, as a one-line
:class:`~spnet_dist.config.ConfigError` naming the field, before any process group or file
exists: ``model.sync_bn`` without CUDA, ``engine.backend=nccl`` without CUDA,
``data.dali_device=gpu`` without CUDA.

**The CUDA configuration on a CPU (tests only).** With ``SPNET_DEVICE_PROFILE=cuda`` in the
environment, a CPU process gets the answers a CUDA rank would get (channels_last batches, masked
teacher, capacity skip strategy in evaluation, NHWC loader output, pinned memory, DALI ``gpu``,
NCCL, ``cudnn.benchmark``) while computing on the CPU, so the suite runs the configuration GPU
users will actually run (``docs/testing.md``). ``SPNET_DEVICE_PROFILE=cuda:<backend>`` also names
the ``torch.compile`` backend (default ``aot_eager``: the path inductor takes, without code
generation). Five answers have no CPU realisation and are recorded but not applied
(:attr:`DeviceProfile.emulated`): pinned memory (needs a CUDA driver: the loaders do not pin),
DALI ``gpu`` (``mixed`` decoding needs a GPU: DALI decodes on the CPU, still emitting the NHWC
layout), NCCL (the process group is gloo), SyncBatchNorm (CUDA kernels only: BatchNorm stays
plain) and ``cudnn.benchmark`` (no cuDNN on a CPU: the flag is left alone). The variable is
read here only; it is not a user setting.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, ContextManager, Optional, Union

import torch

from .config import ConfigError
from .data import resolve_data_backend
from .data.dali import resolve_dali_device
from .execution import resolve_skip_strategy

__all__ = ["PROFILE_ENV", "EMULATED_COMPILE_BACKEND", "NATIVE_COMPILE_BACKEND", "AUTOCAST_DTYPES",
           "DeviceProfile", "resolve_device_profile", "local_device_type", "autocast_dtype", "autocast_for"]

# Test-only: makes a CPU process resolve as a CUDA rank would ("cuda" or "cuda:<compile backend>").
PROFILE_ENV = "SPNET_DEVICE_PROFILE"
# torch.compile backends: DeepSpeed's default on a real device; CPU-capable stand-in when emulating
# (inductor would generate and build C++ for minutes on 2 cores instead of CUDA kernels).
NATIVE_COMPILE_BACKEND = "inductor"
EMULATED_COMPILE_BACKEND = "aot_eager"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class DeviceProfile:
    """Every device-dependent answer of one rank, resolved once.

    The fields are the answers for :attr:`target`; where the physical device cannot realise one
    (an emulated CUDA profile on a CPU), the ``*_now`` properties say what is actually done.

    Attributes:
        target: ``"cuda"`` or ``"cpu"``: the device type the answers are for.
        compute: ``"cuda"`` or ``"cpu"``: where tensors really live (differs only when emulating).
        backend: process-group backend, ``"nccl"`` or ``"gloo"`` (``engine.backend``).
        channels_last: batches (and so activations) in NHWC; parameters always stay NCHW
            (``engine.channels_last``; see :attr:`memory_format`).
        teacher_execution: ``"masked"`` or ``"skip"``, how an eval-mode teacher runs closed blocks
            (``teacher.execution``).
        eval_skip_strategy: ``"capacity"`` or ``"gather"``, how the trainer's evaluation skips.
        pin_memory: loaders hand out page-locked batches (asynchronous host-to-device copies).
        dali_device: ``"gpu"`` (``mixed`` decoding) or ``"cpu"`` (``data.dali_device``).
        cudnn_benchmark: let cuDNN autotune convolutions (off under ``run.deterministic``).
        autocast_dtype: ``torch.bfloat16``/``torch.float16``, None for fp32 (``engine.precision``).
        compile: ``torch.compile`` the student (``engine.compile``).
        compile_backend: the ``torch.compile`` backend, None when not compiling.
        sync_bn: convert BatchNorm to SyncBatchNorm (``model.sync_bn``).
    """

    target: str
    compute: str
    backend: str
    channels_last: bool
    teacher_execution: str
    eval_skip_strategy: str
    pin_memory: bool
    dali_device: str
    cudnn_benchmark: bool
    autocast_dtype: Optional[torch.dtype]
    compile: bool
    compile_backend: Optional[str]
    sync_bn: bool

    @property
    def emulated(self) -> bool:
        """True for the CUDA answers computed on a CPU (tests, :data:`PROFILE_ENV`)."""
        return self.target != self.compute

    @property
    def memory_format(self) -> torch.memory_format:
        """The batches' memory format (never the parameters': ZeRO keeps flat NCHW views of them)."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def backend_now(self) -> str:
        """The process-group backend actually used (gloo when NCCL is emulated)."""
        return self.backend if self.compute == "cuda" else "gloo"

    @property
    def pin_memory_now(self) -> bool:
        """Pin loader batches (only a CUDA driver can page-lock host memory)."""
        return self.pin_memory and self.compute == "cuda"

    @property
    def dali_device_now(self) -> str:
        """Where DALI decodes (``mixed`` decoding needs a GPU; the layout answer still holds)."""
        return self.dali_device if self.compute == "cuda" else "cpu"

    @property
    def cudnn_benchmark_now(self) -> bool:
        """Whether to set ``torch.backends.cudnn.benchmark`` (a no-op flag without cuDNN: left alone)."""
        return self.cudnn_benchmark and self.compute == "cuda"

    @property
    def sync_bn_now(self) -> bool:
        """Convert to SyncBatchNorm (its kernels are CUDA-only)."""
        return self.sync_bn and self.compute == "cuda"

    def autocast(self) -> ContextManager:
        """The autocast the engine applies, for forwards outside the engine (the EMA teacher, evaluation)."""
        return autocast_for(self.autocast_dtype, self.compute)

    def describe(self) -> str:
        """One line for the run log."""
        where = f"{self.target} (emulated on {self.compute})" if self.emulated else self.target
        compiled = f"compile {self.compile_backend}" if self.compile else "eager"
        return (f"device profile {where}: batches {'NHWC' if self.channels_last else 'NCHW'}, teacher "
                f"{self.teacher_execution}, evaluation {self.eval_skip_strategy}, {compiled}, "
                f"pinned memory {'on' if self.pin_memory_now else 'off'}, process group {self.backend_now}")


def local_device_type() -> str:
    """The device type this process computes on: ``cuda`` when a GPU is visible (as
    ``spnet_dist.distributed.init_distributed`` picks it), else ``cpu``. Needs no process group."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """``engine.precision`` (or ``spnet-eval --precision``) -> the autocast dtype, None for fp32."""
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"engine.precision: {precision!r} is not one of 'bf16', 'fp16', 'fp32'",
                          "engine.precision")
    return AUTOCAST_DTYPES[precision]


def autocast_for(dtype: Optional[torch.dtype], device_type: Union[str, torch.device]) -> ContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type`` (a device's type is taken), no-op for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device_type).type, dtype=dtype)


def _emulation(compute: str, environ: Any) -> tuple[str, Optional[str]]:
    """(target, compile backend override) from :data:`PROFILE_ENV`."""
    value = environ.get(PROFILE_ENV, "").strip()
    if not value:
        return compute, None
    target, _, backend = value.partition(":")
    if target != "cuda":
        raise ConfigError(f"{PROFILE_ENV}: {value!r} is not 'cuda' or 'cuda:<torch.compile backend>' "
                          "(a test-only setting; unset it for a real run)")
    return "cuda", backend or None


def resolve_device_profile(cfg: Any, device: Union[str, torch.device, None] = None,
                           environ: Optional[Any] = None) -> DeviceProfile:
    """Answer every device-dependent setting of ``cfg`` for ``device``; refuse impossible ones.

    Args:
        cfg: a validated :class:`~spnet_dist.config.Config`.
        device: the device this rank computes on (only its type matters); None:
            :func:`local_device_type`. Known before any process group exists.
        environ: the environment to read :data:`PROFILE_ENV` from (default ``os.environ``).

    Raises:
        ConfigError: one line naming the field, for a setting this device cannot run.
    """
    compute = local_device_type() if device is None else torch.device(device).type
    target, compile_backend = _emulation(compute, os.environ if environ is None else environ)
    cuda = target == "cuda"
    e = cfg.engine

    def refuse(name: str, message: str) -> None:
        raise ConfigError(f"{name}: {message} (this rank computes on {compute})", name)

    # ---- process group: NCCL drives CUDA devices only
    if e.backend == "nccl" and not cuda:
        refuse("engine.backend", "'nccl' needs CUDA devices; use 'gloo' or 'auto'")
    backend = ("nccl" if cuda else "gloo") if e.backend == "auto" else e.backend

    # ---- SyncBatchNorm: its kernels exist for CUDA only (torch raises at the first forward otherwise)
    if cfg.model.sync_bn and not cuda:
        refuse("model.sync_bn", "SyncBatchNorm needs CUDA devices; set model.sync_bn=false")

    # ---- DALI: `mixed` decoding needs a GPU; refused only when DALI will actually read the data
    try:
        dali_device = resolve_dali_device(cfg.data.dali_device, torch.device(target))
    except ValueError as err:
        if resolve_data_backend(cfg.data.backend, cfg.data.format) == "dali":
            refuse("data.dali_device", str(err).partition(": ")[2])
        dali_device = "cpu"  # never used: the data is read by torchvision

    # ---- the eval-mode teacher: the skip path costs one nonzero() host sync per block and varying
    # shapes (no cudnn.benchmark reuse, no CUDA graphs, graph breaks); on a CPU MACs are time
    teacher = cfg.teacher.execution
    if teacher == "auto":
        teacher = "masked" if cuda else "skip"

    return DeviceProfile(
        target=target,
        compute=compute,
        backend=backend,
        # NHWC is what tensor-core convolutions want; on a CPU oneDNN gains nothing at these sizes
        channels_last=cuda if e.channels_last is None else bool(e.channels_last),
        teacher_execution=teacher,
        # capacity: one host sync per forward instead of one per block (execution.blocks)
        eval_skip_strategy=resolve_skip_strategy("auto", torch.device(target)),
        pin_memory=cuda,
        dali_device=dali_device,
        # the masked training path has fixed shapes: autotuning pays for itself after a step
        cudnn_benchmark=cuda and not cfg.run.deterministic,
        autocast_dtype=autocast_dtype(e.precision),
        compile=bool(e.compile),
        compile_backend=(compile_backend or (EMULATED_COMPILE_BACKEND if target != compute else NATIVE_COMPILE_BACKEND))
        if e.compile else None,
        sync_bn=bool(cfg.model.sync_bn),
    )
