"""The capacity skip strategy (execution/blocks.py ``forward_capacity``, execution/network.py
``_exact_trunk``): a fixed number of samples per block, no per-block host sync, exact fallback on overflow."""
import pytest
import torch

from spnet_dist.device_audit import HostSyncCounter
from spnet_dist.execution import resolve_skip_strategy, set_execution, skip_capacities, skip_capacity
from spnet_dist.models import create_model

from ..models.test_resnet import _mixed_routers, _randomize_bn


def _model(name, x, forced=None, **kwargs):
    """A model whose routers open for part of the batch; ``forced`` = {block index: True/False};
    ``kwargs`` go to ``create_model``."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs)
    _randomize_bn(model)
    _mixed_routers(model, x)
    blocks = list(model.gated_blocks())
    for index, value in (forced or {}).items():
        blocks[index].router.force = value
    return model


def _masked(model, x):
    set_execution(model, "masked")
    with torch.no_grad():
        return model(x)


def _capacity(model, x):
    """A capacity forward and the host syncs it made."""
    set_execution(model, "skip", skip_strategy="capacity")
    with torch.no_grad(), HostSyncCounter(patch_accelerator=False) as syncs:
        out = model(x)
    return out, syncs.counts


def test_capacity_rule():
    # B r + k sqrt(B r (1 - r)) = 16 + 3 sqrt(8) = 24.49 -> 25; rounded up to 8 -> 32; to 8 at B = 64: 44 -> 48
    assert skip_capacity(32, 0.5, 3.0, 1) == 25
    assert skip_capacity(32, 0.5, 3.0, 8) == 32
    assert skip_capacity(64, 0.5, 3.0, 8) == 48
    assert skip_capacity(10, 0.3, 0.0, 1) == 3  # 10 x 0.3 = 3.0000000000000004 in floats
    assert skip_capacity(32, 1.0, 3.0, 8) == 32 and skip_capacity(32, 0.0, 3.0, 8) == 0
    assert skip_capacity(1, 0.5, 3.0, 8) == 1 and skip_capacity(5, 0.1, 0.0, 8) == 5  # never above B
    model = create_model("spnet_cifar_resnet20")
    assert skip_capacities(model, 32) == [32] * 9  # unset rates are 1.0: capacity = batch
    set_execution(model, capacity_rates=0.5)
    assert model.skip_capacities(32) == [25] * 9  # CPU rounds to 1
    assert model.skip_capacities(32, "cuda") == [32] * 9 and model.skip_capacities(64, "cuda") == [48] * 9
    model.set_skip_capacity(margin=0.0, multiple=4)
    assert model.skip_capacities(30, "cuda") == [16] * 9
    for bad in (dict(rates=[0.5] * 8), dict(rates=1.5), dict(margin=-1.0), dict(multiple=0), dict(multiple=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.set_skip_capacity(**bad)
        with pytest.raises(ValueError, match=f"capacity_{next(iter(bad))}"):
            set_execution(model, **{f"capacity_{key}": value for key, value in bad.items()})
    assert model.skip_capacities(30, "cuda") == [16] * 9  # a refused setting changes nothing
    with pytest.raises(ValueError, match="skip_strategy"):
        model.set_skip_strategy("bucket")
    assert resolve_skip_strategy("auto", torch.device("cuda")) == "capacity"
    assert resolve_skip_strategy("auto", torch.device("cpu")) == "gather"
    assert resolve_skip_strategy("gather", torch.device("cuda")) == "gather"


@pytest.mark.parametrize("name,size,batch,forced", [
    ("spnet_cifar_resnet20", 32, 16, {1: True, 3: False}),
    ("spnet_resnet50", 64, 12, {0: True, 3: False, 7: False}),  # 3 and 7: projection shortcuts closed
], ids=["resnet20", "resnet50"])
def test_capacity_equals_masked_without_overflow_and_syncs_once(name, size, batch, forced):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = _model(name, x, forced)
    masked = _masked(model, x)
    open_counts = masked.gate_decisions.sum(0).long().tolist()
    rates = [n / batch for n in open_counts]
    rates[open_counts.index(next(n for n in open_counts if 0 < n < batch))] = 1.0  # C = B with closed samples
    set_execution(model, capacity_rates=rates, capacity_margin=1.0, capacity_multiple=1)
    caps = skip_capacities(model, batch)
    cases = list(zip(open_counts, caps))
    assert all(n <= c for n, c in cases), "the capacities must hold every open sample (no overflow)"
    assert any(c == batch and n < batch for n, c in cases)  # whole batch, closed ones times 0
    assert any(0 < n < c < batch for n, c in cases)  # gathered, closed samples fill the capacity
    assert any(n == c == 0 for n, c in cases) and any(n == batch for n, c in cases)
    out, syncs = _capacity(model, x)
    assert dict(syncs) == {"bool": 1}  # the one overflow read of the forward; no gather fallback
    assert torch.equal(out.gate_decisions, masked.gate_decisions)
    assert (out.logits - masked.logits).abs().max().item() < 1e-5

    # The per-block region makes no host sync at all; every block can overflow (C < B) or not.
    set_execution(model, capacity_rates=[min(1.0, n / batch + 0.1) for n in open_counts], capacity_margin=0.0)
    with torch.no_grad():
        h = model.forward_stem(x)
        for block, capacity in zip(model.gated_blocks(), skip_capacities(model, batch)):
            with HostSyncCounter(patch_accelerator=False) as syncs:
                h, gate, _ = block.forward_capacity(h, capacity)
            assert syncs.total == 0, dict(syncs.counts)
    set_execution(model, skip_strategy="gather")  # exact work: one nonzero() per block, no overflow read
    with torch.no_grad(), HostSyncCounter(patch_accelerator=False) as syncs:
        gathered = model(x)
    assert dict(syncs.counts) == {"nonzero": model.num_blocks}
    assert (gathered.logits - masked.logits).abs().max().item() < 1e-5


def test_overflow_anywhere_falls_back_to_the_exact_gather_forward():
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = _model("spnet_cifar_resnet20", x)
    masked = _masked(model, x)
    open_counts = masked.gate_decisions.sum(0).long().tolist()
    for last in (False, True):  # one block one sample short, the first or the last partly open one
        rates = [n / 16 for n in open_counts]
        partly = [i for i, n in enumerate(open_counts) if 0 < n < 16]
        short = partly[-1] if last else partly[0]
        rates[short] = (open_counts[short] - 1) / 16
        set_execution(model, capacity_rates=rates, capacity_margin=0.0, capacity_multiple=1)
        out, syncs = _capacity(model, x)
        assert dict(syncs) == {"bool": 1, "nonzero": model.num_blocks}  # overflow read, then the gather forward
        assert torch.equal(out.gate_decisions, masked.gate_decisions)
        assert (out.logits - masked.logits).abs().max().item() < 1e-5
    set_execution(model, capacity_rates=0.0)  # every capacity 0: each partly open block overflows
    out, syncs = _capacity(model, x)
    assert syncs["nonzero"] == model.num_blocks
    assert (out.logits - masked.logits).abs().max().item() < 1e-5
    set_execution(model, skip_strategy="capacity")
    with torch.no_grad():
        features = model.forward_features(x)  # timm's path takes the same fallback
    assert (model.forward_head(features) - masked.logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("batch", [1, 5, 12])
def test_batch_one_and_batches_near_the_multiple(batch):
    # multiple 8: at B = 1 and B = 5 any rate above 0 gives C = B in every block (no flag, no
    # sync at all); at B = 12 exact rates with no margin round each partly open block's count up
    # to 8 or to 12, and closed blocks (rate 0) get C = 0.
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = _model("spnet_cifar_resnet20", torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    masked = _masked(model, x)
    open_counts = masked.gate_decisions.sum(0).long().tolist()
    rates = [0.5] * model.num_blocks if batch < 8 else [n / batch for n in open_counts]
    set_execution(model, capacity_rates=rates, capacity_margin=0.0, capacity_multiple=8)
    caps = skip_capacities(model, batch)
    if batch < 8:
        assert caps == [batch] * model.num_blocks
        assert 0 < sum(open_counts) < batch * model.num_blocks  # closed samples run times 0
    else:
        assert any(n < c < batch for n, c in zip(open_counts, caps)) and set(caps) <= {0, 8, 12}
    out, syncs = _capacity(model, x)
    assert dict(syncs) == ({} if batch < 8 else {"bool": 1})
    assert torch.equal(out.gate_decisions, masked.gate_decisions)
    assert (out.logits - masked.logits).abs().max().item() < 1e-5


def test_capacity_keeps_the_caller_input_and_works_with_autograd_bf16_and_channels_last():
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model = _model("spnet_cifar_resnet20", x)
    masked = _masked(model, x)
    set_execution(model, capacity_rates=(masked.gate_decisions.mean(0) + 0.2).clamp(max=1).tolist(),
                  capacity_margin=0.0)
    assert any(0 < c < 8 for c in skip_capacities(model, 8))
    set_execution(model, "skip", skip_strategy="capacity")
    x_before = x.clone()
    x.requires_grad_(True)
    with HostSyncCounter(patch_accelerator=False) as syncs:
        out = model(x)  # eval mode with autograd on: out-of-place products and sums
    assert dict(syncs.counts) == {"bool": 1}  # no fallback: the capacity path itself ran
    out.logits.sum().backward()
    assert x.grad is not None and torch.equal(x.detach(), x_before)
    assert (out.logits.detach() - masked.logits).abs().max().item() < 1e-5
    cl = model.to(memory_format=torch.channels_last)
    got, syncs = _capacity(cl, x_before)
    assert dict(syncs) == {"bool": 1} and (got.logits - masked.logits).abs().max().item() < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_masked = _masked(model, x_before)
        bf16, syncs = _capacity(model, x_before)
    assert dict(syncs) == {"bool": 1} and bf16.logits.dtype == bf16_masked.logits.dtype
    assert torch.equal(bf16.gate_decisions, bf16_masked.gate_decisions)
    assert (bf16.logits.float() - bf16_masked.logits.float()).abs().max().item() < 0.05
