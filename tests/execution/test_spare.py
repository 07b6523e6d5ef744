"""Spare buffers (execution/spare.py) and their two users: the skipping blocks' gathers and the join
of the per-image stages (the latter in test_per_image_stages.py)."""
import copy
import pickle

import torch

from spnet_dist.execution import set_execution
from spnet_dist.execution.spare import Spare, batch_view

from .test_skip_capacity import _model


def test_a_spare_is_reused_only_when_it_fits_and_nothing_else_holds_it():
    spare, like = Spare(), torch.empty(0)
    with torch.no_grad():
        first = spare.take(100, like)
        assert spare.take(100, like) is not first  # taken: a nested user gets its own
        spare.give(first)
        assert spare.take(60, like) is first  # smaller requests fit
        spare.give(first)
        assert spare.take(101, like) is not first  # too small: a new one, the old one dropped
        assert spare.take(10, like.double()).dtype == torch.float64  # other dtype: a new one
    spare.give(first)  # autograd on: not kept
    with torch.no_grad():
        assert spare.take(100, like) is not first
    with torch.no_grad():
        spare.give(first)
    with torch.inference_mode():  # a no_grad tensor is not handed out in inference mode, nor the reverse
        assert spare.take(100, like) is not first
    with torch.no_grad():
        spare.give(first)
        spare.clear()
        assert spare.take(100, like) is not first
        spare.give(first)
        for copied in (copy.deepcopy(spare), pickle.loads(pickle.dumps(spare))):  # a copied model's spare: empty
            assert isinstance(copied, Spare) and copied.take(100, like) is not first
        assert spare.take(100, like) is first


def test_batch_view_lays_samples_out_like_the_given_tensor():
    flat = torch.arange(2 * 3 * 4 * 5 + 9, dtype=torch.float32)
    for layout in (torch.contiguous_format, torch.channels_last):
        view = batch_view(flat, 2, torch.empty(1, 3, 4, 5).contiguous(memory_format=layout))
        assert view.shape == (2, 3, 4, 5) and view.is_contiguous(memory_format=layout)
        assert view.data_ptr() == flat.data_ptr()


def test_skipping_blocks_gather_into_one_spare_without_autograd():
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _model("spnet_cifar_resnet20", x)
    gathered = []  # (block, storage address of its gathered samples); the tensors held, see above
    held = []

    def record(index):
        def hook(_module, args):
            if args[0].shape[0] not in (0, x.shape[0]):  # a partly open block: its gathered samples
                held.append(args[0])
                gathered.append((index, args[0].untyped_storage().data_ptr()))
        return hook

    for index, block in enumerate(model.gated_blocks()):
        block.conv1.register_forward_pre_hook(record(index))
    with torch.no_grad():
        masked = model(x)
        set_execution(model, "skip")
        runs = [model(x), model(x)]
    assert len(gathered) >= 4, "blocks must be open for part of the batch"
    assert len({address for _, address in gathered}) == 1, "every gather of both forwards reuses one spare"
    for out in runs:
        assert torch.equal(out.gate_decisions, masked.gate_decisions)
        torch.testing.assert_close(out.logits, masked.logits, rtol=0, atol=1e-5)
    gathered.clear()
    model(x).logits.sum().backward()  # autograd saved every gathered batch: each its own
    assert len({address for _, address in gathered}) == len(gathered) >= 2
