"""spnet_dist.export.onnx: the masked (dense) form as ONNX, run in onnxruntime."""
import numpy as np
import pytest
import torch

from spnet_dist.export.onnx import export_onnx
from spnet_dist.models import create_model

from ..models.test_resnet import _mixed_routers


@pytest.mark.slow
def test_masked_onnx_matches_the_model_at_any_batch_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20", aux_heads=False)
    x = torch.randn(7, 3, 32, 32)
    _mixed_routers(model, x)
    model.set_execution("skip")
    model.set_per_image_stages("auto", min_bytes=0)  # as a load_model model with large images: must not unroll
    path = export_onnx(model, tmp_path / "model.masked.onnx", 32)
    assert all(block.execution == "skip" for block in model.gated_blocks())  # the caller's model untouched
    assert model.per_image_stages == "auto"
    session = ort.InferenceSession(str(path))
    for batch in (x[:1], x):
        logits, decisions = session.run(None, {"images": batch.numpy()})
        with torch.no_grad():
            ref = model(batch)
        assert np.array_equal(decisions, ref.gate_decisions.numpy())
        assert np.abs(logits - ref.logits.numpy()).max() < 1e-4
    assert 0 < ref.gate_decisions.mean() < 1  # a real mix: the graph must not hard-code a path
