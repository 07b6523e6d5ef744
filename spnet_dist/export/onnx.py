"""ONNX export of the masked (dense) form, for runtimes that cannot branch per sample.

ONNX graphs have static control flow, so the exported graph computes EVERY block for every
sample and multiplies its residual by the router's 0/1 decision: same outputs as the skipping
model, but no saving in time. The file is named ``model.masked.onnx`` to say so.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..execution import reset_execution
from ..models.resnet import GatedResNet

ONNX_FILE = "model.masked.onnx"


class MaskedForward(nn.Module):
    """(logits, gate_decisions) of a gated ResNet in the masked form: ONNX needs tensor outputs."""

    def __init__(self, model: GatedResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images)
        return out.logits, out.gate_decisions


def export_onnx(model: GatedResNet, path: str | Path, image_size: int) -> Path:
    """Write the masked form of an eval-mode ``model`` to ``path`` (dynamic batch dimension).

    Needs ``onnx`` and ``onnxscript`` (torch's exporter): ``pip install 'spnet-dist[onnx]'``.

    Args:
        model: the inference network (a copy is switched to the masked form).
        path: the ``.onnx`` file to write.
        image_size: input height and width.
    """
    import copy

    masked = reset_execution(copy.deepcopy(model).eval())  # the model's own (masked) forward
    example = torch.zeros(2, masked.in_chans, image_size, image_size)
    program = torch.onnx.export(
        MaskedForward(masked).eval(), (example,), dynamo=True, input_names=["images"],
        output_names=["logits", "gate_decisions"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    program.save(str(path))
    return Path(path)
