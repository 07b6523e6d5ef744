import pytest
import torch
import torchvision

from spnet_dist.models import SPNetOutput, create_model, load_torchvision_weights


def _randomize_bn(model):
    """Non-trivial BN statistics, so equality checks are not satisfied by accident."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _mixed_routers(model, x, seed=0):
    """Routers whose eval-mode decisions differ between samples and blocks: BN statistics are
    set from ``x`` itself (momentum 1), so the router inputs vary by O(1) across samples, and
    the last router layer is random with zero bias."""
    g = torch.Generator().manual_seed(seed)
    for block in model.gated_blocks():
        block.router.fc2.weight.data.normal_(0, 1.0, generator=g)
        block.router.fc2.bias.data.zero_()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


@pytest.fixture(scope="module")
def resnet50_pair():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    _randomize_bn(tv)
    tv.eval()
    gated = create_model("spnet_resnet50").eval()
    load_torchvision_weights(gated, tv.state_dict())
    return gated, tv


def test_all_gates_open_matches_torchvision_resnet50(resnet50_pair):
    gated, tv = resnet50_pair
    gated.set_gate_override(True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (gated(x).logits - tv(x)).abs().max().item()
    gated.set_gate_override(None)
    assert diff < 1e-4


def test_torchvision_load_is_strict_except_routers_and_heads(tmp_path):
    tv = torchvision.models.resnet50()
    gated = create_model("spnet_resnet50")
    state = tv.state_dict()
    load_torchvision_weights(gated, state)
    assert torch.equal(gated.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    broken = dict(state)
    del broken["layer2.0.downsample.1.running_var"]
    with pytest.raises(ValueError, match="layer2.0.downsample.1.running_var"):
        load_torchvision_weights(gated, broken)
    with pytest.raises(ValueError, match="unexpected"):
        load_torchvision_weights(gated, {**state, "extra.weight": torch.zeros(1)})
    from safetensors.torch import save_file

    save_file(state, tmp_path / "r50.safetensors")
    load_torchvision_weights(create_model("spnet_resnet50"), tmp_path / "r50.safetensors")
    torch.save(state, tmp_path / "r50.pth")
    load_torchvision_weights(create_model("spnet_resnet50"), tmp_path / "r50.pth")
    with pytest.raises(FileNotFoundError, match="model.torchvision_weights"):
        load_torchvision_weights(gated, tmp_path / "missing.pth")


def test_all_gates_closed_depends_only_on_stem_shortcuts_and_head():
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet32").eval()
    model.set_gate_override(False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x).logits
        for block in model.gated_blocks():  # residual branches must not matter at all
            block.conv1.weight.mul_(3.0).add_(1.0)
            block.bn2.bias.add_(5.0)
        after = model(x).logits
        # the same network computed by hand: stem -> option-A shortcuts (+relu) -> pool -> fc
        h = model.forward_stem(x)
        for block in model.gated_blocks():
            h = torch.relu(block.shortcut(h))
        manual = model.fc(h.mean(dim=(2, 3)))
    assert torch.equal(before, after)
    torch.testing.assert_close(before, manual)


def test_output_contract_cifar():
    model = create_model("spnet_cifar_resnet20", num_classes=7, block_align=True).train()
    out = model(torch.randn(3, 3, 32, 32))
    assert isinstance(out, SPNetOutput)
    assert out.logits.shape == (3, 7)
    assert len(out.stage_logits) == 3 and out.stage_logits[-1] is out.logits
    assert out.gate_probs.shape == out.gate_decisions.shape == (3, 9)
    assert out.gate_logits.shape == (3, 9, 2)
    assert [f.shape for f in out.stage_features] == [(3, 64)] * 3
    assert len(out.block_features) == 9 and all(f.shape == (3, 64) for f in out.block_features)
    assert out.block_stage == (0, 0, 0, 1, 1, 1, 2, 2, 2)


def test_eval_deterministic_and_batch_size_one():
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    a, b = model(x), model(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.gate_decisions, b.gate_decisions)


def test_training_passes_gradients_to_routers():
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20").train()
    out = model(torch.randn(8, 3, 32, 32))
    torch.nn.functional.cross_entropy(out.logits, torch.arange(8) % 10).backward()
    for block in model.gated_blocks():
        assert block.router.fc2.weight.grad.abs().sum() > 0, "straight-through estimator must reach every router"


def test_inference_copy_drops_training_heads():
    model = create_model("spnet_cifar_resnet20", block_align=True)
    slim = model.inference_copy().eval()
    keys = slim.state_dict().keys()
    assert not any(k.startswith(("aux_heads", "block_aligners")) for k in keys)
    assert "fc.weight" in keys and any(".router." in k for k in keys)
    out = slim(torch.randn(2, 3, 32, 32))
    assert len(out.stage_logits) == 1 and out.block_features is None


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 32, 32), (2, 3, 4, 4), (3, 32, 32)],
    ids=["channels", "too-small", "not-4d"],
)
def test_bad_input_shape_is_a_clear_error(shape):
    model = create_model("spnet_cifar_resnet20").eval()
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        model(torch.randn(*shape))


def test_imagenet_model_rejects_tiny_images():
    with pytest.raises(ValueError, match="H, W >= 32"):
        create_model("spnet_resnet50").eval().forward_features(torch.randn(1, 3, 16, 16))


def test_classifier_heads_run_in_fp32_under_bf16_autocast():
    # Issue 6, finding 8: the heads whose logits the losses compare run with autocast off.
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 16, 16))
    assert all(y.dtype == torch.float32 for y in out.stage_logits)
    assert all(f.dtype == torch.float32 for f in out.stage_features)
    # exactly the fp32 computation on the same (pooled, upcast) features
    torch.testing.assert_close(out.logits, model.fc(out.stage_features[-1]), rtol=0, atol=0)
    for head, feature, logits in zip(model.aux_heads, out.stage_features[:-1], out.stage_logits[:-1]):
        torch.testing.assert_close(logits, head.fc(feature), rtol=0, atol=0)


def test_masked_forward_on_the_meta_device():
    # The CPU guard of issue 6: a tensor created without a device inside the forward would land on
    # the CPU and meet 'meta' activations (as it would meet CUDA ones): torch raises on the mix.
    model = create_model("spnet_cifar_resnet20").to("meta").train()
    out = model(torch.empty(4, 3, 16, 16, device="meta"))
    tensors = [out.logits, out.gate_probs, out.gate_decisions, out.gate_logits, *out.stage_logits]
    assert all(t.device.type == "meta" for t in tensors)


def test_inference_stem_pools_before_its_relu_with_the_same_values():
    torch.manual_seed(0)
    model = create_model("spnet_resnet50", num_classes=10).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torchvision_order = model.maxpool(torch.relu(model.bn1(model.conv1(x))))
        assert torch.equal(model.forward_stem(x), torchvision_order)
