"""The skipping forms of gated blocks (execution/blocks.py ``forward_gather``) against the masked forward."""
import pytest
import torch

from spnet_dist.execution import blocks, set_execution
from spnet_dist.models import create_model, gates

from ..models.test_resnet import _mixed_routers, _randomize_bn
from .test_skip_capacity import _model


def _both(model, x, **kw):
    with torch.no_grad():
        set_execution(model, "masked")
        masked = model(x)
        set_execution(model, "skip")
        skipped = model(x)
    return masked, skipped


@pytest.mark.parametrize("force", [False, True], ids=["all-closed", "all-open"])
def test_whole_batch_closed_or_open_projection_blocks(force):
    # All closed: the projection shortcut (conv + BN) can be negative, so its ReLU must run.
    torch.manual_seed(0)
    model = create_model("spnet_resnet50", num_classes=10).eval()
    _randomize_bn(model)
    model.set_gate_override(force)
    masked, skipped = _both(model, torch.randn(2, 3, 64, 64))
    assert torch.equal(masked.gate_decisions, skipped.gate_decisions)
    assert (masked.logits - skipped.logits).abs().max().item() < 1e-5


def test_skip_path_keeps_the_caller_input_and_works_with_autograd_and_channels_last():
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20")
    x = torch.randn(8, 3, 32, 32)
    _mixed_routers(model, x)
    masked, skipped = _both(model, x)
    assert (masked.gate_decisions.sum(0) % 8 != 0).any()
    x_before = x.clone()
    set_execution(model, "skip")
    x.requires_grad_(True)
    out = model(x)  # eval mode with autograd on: out-of-place sums, gradients reach the input
    out.logits.sum().backward()
    assert x.grad is not None and torch.equal(x.detach(), x_before)
    assert (out.logits.detach() - masked.logits).abs().max().item() < 1e-5
    cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = cl(x_before)
    assert (got.logits - masked.logits).abs().max().item() < 1e-5


def test_skip_path_under_bf16_autocast_matches_masked_dtype_and_values():
    torch.manual_seed(0)
    model = create_model("spnet_cifar_resnet20")
    x = torch.randn(8, 3, 32, 32)
    _mixed_routers(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masked, skipped = _both(model, x)
    assert skipped.logits.dtype == masked.logits.dtype
    assert torch.equal(masked.gate_decisions, skipped.gate_decisions)
    assert (masked.logits.float() - skipped.logits.float()).abs().max().item() < 0.05


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_sample_gather_and_scatter_match_indexing_in_every_layout(layout):
    from spnet_dist.execution.blocks import gather_samples, scatter_samples_

    torch.manual_seed(0)
    x = torch.randn(7, 5, 4, 3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(7, 5, 8, 3)[:, :, ::2]  # neither layout: the indexing fallback
    index = torch.tensor([5, 0, 3])
    got = gather_samples(x, index)
    assert torch.equal(got, x[index])
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    values = torch.randn(3, 5, 4, 3)
    for values_ in (values, values.contiguous(memory_format=torch.channels_last)):  # same and other layout
        for accumulate in (True, False):
            want = x.clone()
            want[index] = want[index] + values_ if accumulate else values_
            out = x.clone() if layout != "channels_last" else x.clone(memory_format=torch.channels_last)
            assert scatter_samples_(out, index, values_, accumulate) is out
            assert torch.equal(out, want), (accumulate, values_.is_contiguous())


def _identity_shortcut(block):
    probe = torch.zeros(1, block.router.fc1.in_features, 8, 8)
    return block.shortcut(probe) is probe


@pytest.mark.parametrize("name, size", [("spnet_cifar_resnet20", 32), ("spnet_resnet50", 64)])
def test_skipping_routers_pool_only_the_samples_a_block_changed(name, size, monkeypatch):
    """A block with an identity shortcut leaves its closed samples unchanged, so the next router
    reuses their pool (forward_gather's third result) and pools only the open samples' new rows."""
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(4))
    model = _model(name, x, forced={1: False})  # an identity block closed for the whole batch
    pooled_rows = []
    real_pool = gates.global_pool

    def counting_pool(t):
        pooled_rows.append(t.shape[0])
        return real_pool(t)

    monkeypatch.setattr(gates, "global_pool", counting_pool)  # the plain routers' own pooling
    monkeypatch.setattr(blocks, "global_pool", counting_pool)  # the skipping path's pooling (block inputs, open rows)
    masked, skipped = _both(model, x)
    batch, decisions = x.shape[0], masked.gate_decisions
    assert torch.equal(skipped.gate_decisions, decisions)
    assert (masked.logits - skipped.logits).abs().max().item() < 1e-5
    assert sum(pooled_rows[:model.num_blocks]) == batch * model.num_blocks  # masked: every router pools the batch
    expected = batch  # the first router pools its input
    for index, (block, column) in enumerate(zip(model.gated_blocks(), decisions.T)):
        n_open = int(column.sum())
        if _identity_shortcut(block) and n_open < batch:
            expected += n_open  # the open rows, pooled by the block (the last one's pool goes unused)
        elif index < model.num_blocks - 1:
            expected += batch  # the next router pools every sample
    assert sum(pooled_rows[model.num_blocks:]) == expected < batch * model.num_blocks
    partly = [i for i, column in enumerate(decisions.T[:-1]) if 0 < column.sum() < batch
              and _identity_shortcut(list(model.gated_blocks())[i])]
    assert partly, "the test needs an identity block open for part of the batch"
