"""spnet_dist.export.onnx: the masked (dense) form as ONNX, run in onnxruntime."""
import numpy as np
import pytest
import torch

from spnet_dist.execution import InferenceResNet, SkippingBlock, execution_plan, set_execution
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
    # as a load_model model with large images: must not unroll
    set_execution(model, "skip", per_image_stages="auto", per_image_min_bytes=0)
    plan = execution_plan(model)
    path = export_onnx(model, tmp_path / "model.masked.onnx", 32)
    # the caller's model untouched
    assert isinstance(model, InferenceResNet) and all(isinstance(b, SkippingBlock) for b in model.gated_blocks())
    assert execution_plan(model) == plan and plan.mode == "skip" and plan.per_image_stages == "auto"
    session = ort.InferenceSession(str(path))
    for batch in (x[:1], x):
        logits, decisions = session.run(None, {"images": batch.numpy()})
        with torch.no_grad():
            ref = model(batch)
        assert np.array_equal(decisions, ref.gate_decisions.numpy())
        assert np.abs(logits - ref.logits.numpy()).max() < 1e-4
    assert 0 < ref.gate_decisions.mean() < 1  # a real mix: the graph must not hard-code a path
