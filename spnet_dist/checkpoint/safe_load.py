"""No arbitrary unpickling: every DeepSpeed ``.pt`` file of a checkpoint is opened with
``torch.load(weights_only=True)`` and an allow-list of the few DeepSpeed classes it holds.

DeepSpeed 0.19 opens its files with ``torch.load(weights_only=False)`` (a full unpickler: a file
naming ``os.system`` runs it). Two of its call paths read our checkpoints, and both are routed
through :func:`load` (measured call sites and classes: docs/library-facts.md, "Safe loading"):

* resume: ``engine.load_checkpoint`` reads every file (model states, ZeRO shards, through
  DeepSpeed's state-dict loader too) with ``engine.checkpoint_engine.load``, DeepSpeed's own
  extension point for storage back-ends. :func:`engine_loads_safely` swaps in the torch engine
  with a safe ``load`` (:func:`safe_torch_checkpoint_engine`) for the duration of one load;
* export of ZeRO 1/2: ``deepspeed.utils.zero_to_fp32`` calls ``torch.load(..., weights_only=False)``
  itself, on its module-global ``torch``, with no engine to swap. :func:`consolidation_loads_safely`
  gives that module, for the duration of one consolidation, a view of torch whose ``load`` is
  :func:`load`. ZeRO 0 exports read the model-state file with :func:`load` directly.

A file that names any other global is refused with :class:`CheckpointError`, one line naming the
file and the global. Run directories from elsewhere are then as safe to open as their tensors.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
import threading
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .store import CheckpointError

__all__ = ["DEEPSPEED_GLOBALS", "load", "safe_torch_checkpoint_engine", "engine_loads_safely",
           "consolidation_loads_safely"]

# Every non-torch global in DeepSpeed 0.19.8's checkpoint files at ZeRO 0, 1 and 2 (bf16, fp16
# and fp32 autocast; multistep, cosine and warm-up schedules): ZeRO 0's model-state file holds
# only torch types and builtins; each ZeRO 1/2 optimizer shard holds these three.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # the ZeRO optimizer's (static) loss scaler
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # the shard's "zero_stage" entry
    "deepspeed.utils.tensor_fragment.fragment_address",  # offsets of each parameter in the flat shard
)


def _allowed() -> list[Any]:
    out = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def load(path: str | Path, map_location: Any = "cpu", mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` allowing :data:`DEEPSPEED_GLOBALS` only.

    Raises:
        CheckpointError: the file names another global (one line naming the file and the
            global), or is not a torch file.
    """
    try:
        with torch.serialization.safe_globals(_allowed()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        try:
            names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(DEEPSPEED_GLOBALS))
        except Exception:  # noqa: BLE001 - the refusal stands; only its detail is missing
            names = []
        what = ", ".join(names) if names else " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: refused to unpickle {what} (not a tensor or an allow-listed "
                              "DeepSpeed class; checkpoint files are loaded with weights_only=True)") from None
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot be read as a torch file ({' '.join(str(err).split())[:200]})") from None


def _torch_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine


@functools.cache
def safe_torch_checkpoint_engine() -> type:
    """DeepSpeed's torch checkpoint engine (same settings, same saving) whose ``load`` is :func:`load`.

    Built on first use so that importing this package does not import DeepSpeed.
    """

    class SafeTorchCheckpointEngine(_torch_engine_class()):
        def __init__(self, engine: Any) -> None:  # no super().__init__: it only logs and reads config
            self.__dict__.update(vars(engine))

        def load(self, path: str, map_location: Any = None) -> Any:
            return load(path, map_location=map_location)

    return SafeTorchCheckpointEngine


@contextlib.contextmanager
def engine_loads_safely(engine: Any) -> Iterator[None]:
    """While open, ``engine.load_checkpoint`` reads every file through :func:`load`.

    Raises:
        CheckpointError: the engine uses another DeepSpeed checkpoint engine (fast / decoupled /
            DataStates back-ends), whose loads this cannot vouch for.
    """
    current = engine.checkpoint_engine
    if type(current) is not _torch_engine_class():
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(current).__name__}: only the torch engine's "
                              "loads are made safe (weights_only=True); leave the 'checkpoint' section unset")
    engine.checkpoint_engine = safe_torch_checkpoint_engine()(current)
    try:
        yield
    finally:
        engine.checkpoint_engine = current


class _SafeTorchView(types.ModuleType):
    """``torch`` as ``zero_to_fp32`` sees it during one consolidation: only ``load`` differs."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,
             mmap: bool | None = None, **_: Any) -> Any:
        # DeepSpeed passes weights_only=False: ignored, the safe load decides.
        return load(f, map_location=map_location, mmap=mmap)


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def consolidation_loads_safely() -> Iterator[Callable[..., Any]]:
    """Yield ``get_fp32_state_dict_from_zero_checkpoint`` with every file it opens read by :func:`load`."""
    from deepspeed.utils import zero_to_fp32

    with _PATCH_LOCK:  # the module global is shared: one consolidation at a time
        saved = zero_to_fp32.torch
        zero_to_fp32.torch = _SafeTorchView()
        try:
            yield zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
        finally:
            zero_to_fp32.torch = saved
