"""Per-image early stages (execution/network.py ``count_per_image_stages``, ``_trunk``): on the CPU the stem and
the stages with large activations run one image at a time, the rest on the whole batch; every
output must be what the whole-batch forward gives."""
from unittest import mock

import pytest
import torch

from spnet_dist.execution import count_per_image_stages, set_execution
from spnet_dist.execution.spare import batch_view
from spnet_dist.models import create_model
from spnet_dist.models.gates import global_pool

from .test_skip_capacity import _model

STAGE_OUTPUT_BYTES_224 = [256 * 56 * 56 * 4, 512 * 28 * 28 * 4, 1024 * 14 * 14 * 4, 2048 * 7 * 7 * 4]


def test_the_stages_that_run_per_image_follow_the_size_of_their_output():
    model = create_model("spnet_resnet50", num_classes=10).eval()
    x = torch.empty(2, 3, 224, 224)
    assert count_per_image_stages(model, x) == 0  # built by create_model: off
    set_execution(model, per_image_stages="auto")
    assert model.count_per_image_stages(x) == 2  # 3.2 MB and 1.6 MB per image >= 1 MiB; 0.8 MB < 1 MiB
    assert model.count_per_image_stages(torch.empty(2, 3, 160, 160)) == 1  # 1.6 MB, then 0.8 MB
    assert model.count_per_image_stages(torch.empty(2, 3, 225, 225)) == 2  # odd sizes round up like the convs
    model.set_per_image_stages("auto", min_bytes=STAGE_OUTPUT_BYTES_224[1])  # a stage exactly at the limit runs per image
    assert model.count_per_image_stages(x) == 2
    model.set_per_image_stages("auto", min_bytes=STAGE_OUTPUT_BYTES_224[1] + 1)
    assert model.count_per_image_stages(x) == 1
    model.set_per_image_stages("auto", min_bytes=0)
    assert model.count_per_image_stages(x) == 4
    assert model.count_per_image_stages(x[:1]) == 0  # one image: nothing to split
    assert model.count_per_image_stages(torch.empty(2, 3, 224, 224, device="meta")) == 0  # not the CPU (as CUDA)
    assert model.count_per_image_stages(x.to(torch.bfloat16)) == 4
    model.set_per_image_stages("auto", min_bytes=STAGE_OUTPUT_BYTES_224[1])
    assert model.count_per_image_stages(x.to(torch.bfloat16)) == 1  # half the bytes per element
    model.train()
    assert model.count_per_image_stages(x) == 0  # training keeps whole batches (BatchNorm batch statistics)
    model.eval()
    for capture in ("torch.compiler.is_compiling", "torch.jit.is_tracing"):  # compile / export / ONNX, jit.trace
        with mock.patch(capture, return_value=True):
            assert model.count_per_image_stages(x) == 0  # a per-image loop would unroll at the traced batch size
    model.eval()
    model.set_per_image_stages("off")
    assert count_per_image_stages(model, x) == 0
    cifar = create_model("spnet_cifar_resnet20", num_classes=10).eval()
    set_execution(cifar, per_image_stages="auto")
    assert cifar.count_per_image_stages(torch.empty(8, 3, 32, 32)) == 0  # 64 KB per image


@pytest.mark.parametrize("mode, min_bytes", [("bogus", None), ("auto", -1), ("auto", 1.5), ("auto", True)])
def test_bad_settings_are_one_line_errors(mode, min_bytes):
    model = create_model("spnet_cifar_resnet20", num_classes=10)
    with pytest.raises(ValueError, match="per_image_stages|min_bytes"):
        set_execution(model, per_image_stages=mode, per_image_min_bytes=min_bytes)
    set_execution(model, skip_strategy="capacity")  # an InferenceResNet: its method checks the same
    with pytest.raises(ValueError, match="per_image_stages|min_bytes"):
        model.set_per_image_stages(mode, min_bytes)


def _every_field(out):
    tensors = [out.logits, out.gate_probs, out.gate_logits, *out.stage_logits, *out.stage_features]
    return tensors + list(out.block_features or []) + list(out.block_pooled or [])


def _pair(name, size, batch):
    """A model with mixed routers, aux heads and block aligners, and its input."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return _model(name, x, block_align=True), x


@pytest.mark.parametrize("name, size, min_bytes, expected_stages", [
    ("spnet_cifar_resnet20", 32, 0, 3),  # every stage per image
    ("spnet_resnet50", 64, 256 * 16 * 16 * 4, 1),  # stage 1 per image, stages 2-4 on the batch
])
@pytest.mark.parametrize("execution, strategy", [("masked", "gather"), ("skip", "gather"), ("skip", "capacity")])
def test_per_image_stages_give_the_whole_batch_outputs(name, size, min_bytes, expected_stages, execution, strategy):
    model, x = _pair(name, size, batch=6)
    # capacity: some blocks overflow, some do not
    set_execution(model, execution, skip_strategy=strategy, capacity_rates=0.7, capacity_margin=0.0)
    with torch.no_grad():
        whole = model(x)
        whole_features = model.forward_features(x)
        set_execution(model, per_image_stages="auto", per_image_min_bytes=min_bytes)
        assert count_per_image_stages(model, x) == expected_stages
        stem_batches = []
        hook = model.conv1.register_forward_hook(lambda _m, inp, _out: stem_batches.append(inp[0].shape[0]))
        per_image = model(x)
        per_image_features = model.forward_features(x)
        hook.remove()
    assert stem_batches[:x.shape[0]] == [1] * x.shape[0], "the stem must have run one image at a time"
    decisions = whole.gate_decisions
    assert (decisions.sum(0) % decisions.shape[0] != 0).any(), "some block must be open for only part of the batch"
    assert torch.equal(per_image.gate_decisions, decisions)
    for got, want in zip(_every_field(per_image) + [per_image_features], _every_field(whole) + [whole_features],
                         strict=True):
        # batch-1 convolutions round differently: ~1e-6 relative noise, which router logits of up to ~30 pass on
        # to the gate probabilities; a wrong or misplaced sample differs by O(1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_a_capacity_overflow_in_a_per_image_stage_falls_back_to_the_exact_forward():
    model, x = _pair("spnet_cifar_resnet20", 32, batch=6)
    with torch.no_grad():
        masked = model(x)
    # capacity 0 everywhere: every open block overflows
    set_execution(model, "skip", skip_strategy="capacity", capacity_rates=0.0, capacity_margin=0.0,
                  per_image_stages="auto", per_image_min_bytes=0)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out.gate_decisions, masked.gate_decisions)
    assert (out.logits - masked.logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_joined_batch_keeps_the_layout_of_its_parts(channels_last):
    part = torch.randn(1, 8, 5, 5)
    if channels_last:
        part = part.contiguous(memory_format=torch.channels_last)
    joined = batch_view(torch.empty(4 * 8 * 5 * 5 + 7), 4, part)  # a spare buffer may be larger
    assert joined.shape == (4, 8, 5, 5) and joined.dtype == part.dtype
    assert joined.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model, x = _pair("spnet_cifar_resnet20", 32, batch=3)
    model = model.to(memory_format=torch.channels_last)
    set_execution(model, per_image_stages="auto", per_image_min_bytes=16 * 32 * 32 * 4)  # stage 1 per image
    with torch.no_grad():
        features = model.forward_features(x)
    assert features.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("execution", ["masked", "skip"])
def test_gradients_flow_through_the_per_image_stages(execution):
    """Eval mode with autograd on (saliency maps, input attacks): the join keeps the graph."""
    model, x = _pair("spnet_cifar_resnet20", 32, batch=4)
    set_execution(model, execution)
    x.requires_grad_(True)
    grads = []
    for mode in ("off", "auto"):
        set_execution(model, per_image_stages=mode, per_image_min_bytes=0)
        x.grad = None
        model(x).logits.sum().backward()
        grads.append(x.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-4 * grads[0].abs().max().item())


@pytest.mark.parametrize("execution", ["masked", "skip"])
def test_the_first_batch_router_gets_the_pool_of_the_joined_batch_from_the_per_image_stages(execution):
    """Pooled image by image while in cache, bitwise what pooling the joined batch gives."""
    model, x = _pair("spnet_resnet50", 64, batch=5)
    set_execution(model, execution, per_image_stages="auto", per_image_min_bytes=256 * 16 * 16 * 4)  # stage 1 per image
    given = []
    model.stages[1][0].router.register_forward_pre_hook(lambda _m, args: given.append(args))
    with torch.no_grad():
        model(x)
    (joined, pooled), = given
    assert pooled is not None and torch.equal(pooled, global_pool(joined))


def _joined_batches_seen(model, stage):
    """The memory of the input of ``stage``'s first router at every forward (the joined batch).
    The tensors are held here, so new memory can never take the address of earlier memory."""
    seen, held = [], []

    def record(_module, args):
        held.append(args[0])
        seen.append(args[0].untyped_storage().data_ptr())

    model.stages[stage][0].router.register_forward_pre_hook(record)
    return seen


def test_the_joined_batch_is_reused_only_where_nothing_else_can_see_it():
    """The batch the per-image stages are joined into is kept for the next forward (a fresh 51 MB
    tensor costs ~15 ms of page zeroing at batch 32), but never under autograd, never when it is the
    forward's result, never twice at once, never across inference mode and no_grad."""
    model, x = _pair("spnet_cifar_resnet20", 32, batch=3)
    x2 = torch.randn_like(x)
    set_execution(model, "skip")
    with torch.no_grad():
        want = [model(x).logits, model(x2).logits]
    model.set_per_image_stages("auto", min_bytes=16 * 32 * 32 * 4)  # stage 1 per image, joined before stage 2
    seen = _joined_batches_seen(model, stage=1)

    def close(got, i):
        torch.testing.assert_close(got, want[i], rtol=0, atol=1e-5)

    with torch.no_grad():
        close(model(x).logits, 0)
        close(model(x2).logits, 1)
    assert seen[1] == seen[0], "the second forward must join into the first one's batch"
    with torch.no_grad():
        torch.testing.assert_close(model(x[:2]).logits, want[0][:2], rtol=0, atol=1e-5)  # another batch size
    with torch.inference_mode():  # the no_grad spare cannot be written in inference mode: a new one
        close(model(x).logits, 0)
        close(model(x2).logits, 1)
    with torch.no_grad():
        close(model(x).logits, 0)
    assert seen[4] == seen[3] and seen[3] != seen[1]

    # A forward nested in another (a hook running the model again) must not write into the batch
    # the outer forward is still reading.
    nested = []

    def run_nested(_module, _args):
        if not nested:
            nested.append(None)  # once: the nested forward meets this hook too
            nested.append(model(x2).logits)

    hook = model.stages[1][1].router.register_forward_pre_hook(run_nested)
    with torch.no_grad():
        close(model(x).logits, 0)
    hook.remove()
    close(nested[1], 1)

    # Autograd: the graph of the first forward saved the joined batch; a second forward must not overwrite it.
    xs = [x.clone().requires_grad_(True), x2.clone().requires_grad_(True)]
    losses = [model(xi).logits.sum() for xi in xs]
    losses[0].backward()  # "modified by an inplace operation" if the second forward had reused it
    grad = xs[0].grad.clone()
    model.set_per_image_stages("off")
    xs[0].grad = None
    model(xs[0]).logits.sum().backward()
    torch.testing.assert_close(grad, xs[0].grad, rtol=0, atol=1e-4 * xs[0].grad.abs().max().item())

    # When every stage runs per image the joined batch is the result: the caller owns it.
    model.set_per_image_stages("auto", min_bytes=0)
    with torch.no_grad():
        features = model.forward_features(x)
        kept = features.clone()
        model.forward_features(x2)
    assert torch.equal(features, kept)
