"""DALI resume inside a segment that began mid-epoch, twice in one epoch.

A DALI segment (one pipeline) starts at batch 0 of an epoch, or mid-epoch: after a resume from a
torchvision state or across a world-size change (no pipeline checkpoint to restore: a new
pipeline starts at the saved batch), or after an undecodable file was skipped (the pipeline is
rebuilt at the failing batch). A checkpoint inside such a segment stores the segment's start
and the pipeline's own checkpoint; resuming it must continue with exactly the batches, pixels
included, that the uninterrupted segment yields: here checked after two resumes in one epoch.
"""
import json
import shutil

import pytest

from spnet_dist.data.dali import DaliRecipe, DaliTrainLoader
from spnet_dist.data.fake import make_fake_imagenet
from spnet_dist.data.torchvision_loader import TrainLoader

from .helpers import IndexDataset, assert_same_batches, labels_of, take

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("no_dali_threads_left")

RECIPE = DaliRecipe("imagenet", 16, True)
N, BATCH, SEED = 30, 4, 5  # 1 rank: 7 batches per epoch


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """30 small JPEGs, sample i of label i."""
    root = make_fake_imagenet(tmp_path_factory.mktemp("segments"), classes=N, per_class=1, val_per_class=1,
                              long_side_range=(24, 40))
    return [(str(p), i) for i, p in enumerate(sorted((root / "train").glob("*/*.JPEG")))]


def _dali(files, **kw):
    return DaliTrainLoader(files, BATCH, seed=SEED, recipe=RECIPE, num_threads=1, **kw)


def _checkpointed(loader) -> dict:
    return json.loads(json.dumps(loader.state_dict()))  # what the checkpoint file holds


def _resumed(files, state, **kw):
    loader = _dali(files, **kw)
    loader.load_state_dict(state)
    loader.set_epoch(state["epoch"])  # the trainer's usual call keeps the position
    return loader


def _mid_epoch_start(files, how: str, tmp_path):
    """(files, loader kwargs, a state whose next segment starts at batch 2 of epoch 0)."""
    if how == "torchvision-state":
        tv = TrainLoader(IndexDataset(N), BATCH, seed=SEED)
        take(tv, 2)
        return files, {}, _checkpointed(tv)
    if how == "world-size-change":
        # 2 ranks x 1 batch of 4 = 8 samples = 2 batches of the 1-rank job
        two = DaliTrainLoader(files[:28], BATCH, 0, 2, seed=SEED, recipe=RECIPE, num_threads=1)
        take(two, 1)
        return files[:28], {}, _checkpointed(two)
    # skipped-file: sample 9 of epoch 0's batch 2 does not decode; the segment restarts at batch 2
    copied = []
    for path, label in files:
        target = tmp_path / "copy" / f"{label:02d}.JPEG"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(path, target)
        copied.append((str(target), label))
    order = _dali(copied).epoch_indices(0)
    bad = copied[order[2 * BATCH + 1]][0]
    open(bad, "wb").write(b"not a JPEG" * 10)
    return copied, {"on_corrupt": "skip"}, None


@pytest.mark.parametrize("how", ["torchvision-state", "world-size-change", "skipped-file"])
def test_two_resumes_inside_a_segment_that_began_mid_epoch(files, tmp_path, how):
    files, kw, start = _mid_epoch_start(files, how, tmp_path)

    def from_start():
        loader = _dali(files, **kw)
        if start is not None:
            loader.load_state_dict(start)
        return loader

    uninterrupted = from_start()
    per_epoch = len(uninterrupted)
    reference = take(uninterrupted, per_epoch - 2 + per_epoch)  # the rest of epoch 0, then epoch 1
    if how == "skipped-file":
        reference = reference[2:]  # batches 0-1 came before the segment that begins at batch 2

    first = from_start()
    if how == "skipped-file":
        take(first, 2)  # batches 0, 1: then the bad file restarts the pipeline at batch 2
    got = take(first, 2)  # batches 2, 3 of the mid-epoch segment
    state = _checkpointed(first)
    assert (state["epoch"], state["segment_start"], state["batches_seen"]) == (0, 2, 4)
    assert state["pipeline"]

    second = _resumed(files, state, **kw)  # resume 1: 2 batches into the segment
    got += take(second, 1)
    state = _checkpointed(second)
    assert (state["epoch"], state["segment_start"], state["batches_seen"]) == (0, 2, 5)

    third = _resumed(files, state, **kw)  # resume 2, same epoch, same segment: 3 batches into it
    got += take(third, len(reference) - len(got))  # to the end of epoch 0, then all of epoch 1
    assert_same_batches(got, reference)
    if how == "torchvision-state":  # and the same samples as the torchvision backend would read
        tv = TrainLoader(IndexDataset(N), BATCH, seed=SEED)
        tv.load_state_dict(start)
        assert labels_of(got) == labels_of(take(tv, len(got)))
