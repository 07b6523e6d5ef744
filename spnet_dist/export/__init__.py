"""From a training run to inference: ``spnet-export``, ``spnet-eval`` and the ONNX form.

* :mod:`.writer`: ``spnet-export`` (``python -m spnet_dist.export``): one checkpoint of a run ->
  ``OUT/model.safetensors`` + ``OUT/config.json``, through the checkpoint package's resolver and
  validator and its safe loading;
* :mod:`.eval_model`: ``spnet-eval``: an export evaluated on an image folder, on 1 or N ranks;
* :mod:`.onnx`: the masked (dense) form as ONNX;
* :mod:`.inference`: opening an export, :func:`spnet_dist.load_model` (torch + safetensors only),
  and the timm entry points whose ``pretrained=True`` loads one.

Nothing here
imports the trainer: the network comes from ``spnet_dist.models.from_config``, the checkpoint
from ``spnet_dist.checkpoint``, the measured rates from ``spnet_dist.run_dir``.

The writer's names are imported on first use (PEP 562), so that opening an export does not
import the config, checkpoint and data modules the writer needs. ``spnet_dist.export.cli`` is
spnet-export's entry point (as in installs made before the package existed).
"""
from typing import Any

__all__ = ["ExportError", "cli", "export", "export_config", "export_module", "static_state"]


def __getattr__(name: str) -> Any:
    if name == "ExportError":
        from .inference import ExportError

        return ExportError
    if name in __all__:
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
