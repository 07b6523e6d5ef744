"""Augmentation randomness, checked on pixels: a sample gets a new random crop and flip in every
epoch, and the same ones for the same (seed, epoch, sample) in any run, whatever the number of
workers (what makes a resumed run reproduce its batches). Both backends."""
import pytest
import torch

from spnet_dist.data import build_loaders
from spnet_dist.data.fake import make_fake_imagenet
from spnet_dist.data.torchvision_loader import TrainLoader

from .helpers import IndexDataset, data_cfg

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("no_dali_threads_left")

N, BATCH, EPOCHS = 12, 4, 3


@pytest.fixture(scope="module")
def labelled_files(tmp_path_factory):
    """12 training images, one per class: a label identifies a file."""
    return make_fake_imagenet(tmp_path_factory.mktemp("seeds"), classes=N, per_class=1, val_per_class=1,
                              long_side_range=(40, 64))


def _pixels_per_epoch(train) -> list[dict[int, torch.Tensor]]:
    """For each epoch, the augmented image of every sample, by label."""
    epochs = []
    for epoch in range(EPOCHS):
        train.set_epoch(epoch)
        epochs.append({int(y): x.clone() for images, labels in train for x, y in zip(images, labels)})
        assert sorted(epochs[-1]) == list(range(N))  # 1 rank, 12 = 3 x 4: every sample every epoch
    return epochs


@pytest.mark.parametrize("backend,workers", [("torchvision", (0, 2)), ("dali", (1, 1))])
def test_augmentation_is_new_every_epoch_and_the_same_in_every_run(labelled_files, backend, workers):
    runs = []
    for num_workers in workers:
        cfg = data_cfg(labelled_files, backend=backend, num_workers=num_workers, augment="imagenet")
        train, _ = build_loaders(cfg, BATCH, seed=3)
        runs.append(_pixels_per_epoch(train))
    first, second = runs
    for epoch in range(EPOCHS):
        for label in range(N):
            assert torch.equal(first[epoch][label], second[epoch][label]), (epoch, label)
    for label in range(N):
        for a in range(EPOCHS):
            for b in range(a + 1, EPOCHS):
                # a random-resized crop + flip at 16 px: equal pixels mean equal random draws
                assert not torch.equal(first[a][label], first[b][label]), f"sample {label}: epoch {a} == {b}"


def test_each_sample_and_epoch_draws_its_own_randomness():
    """IndexDataset: sample i is i + torch.rand(...): subtracting i leaves the draw itself."""
    loader = TrainLoader(IndexDataset(N), BATCH, seed=3)
    draws = {}
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, labels in loader:
            for x, y in zip(images, labels):
                draws[epoch, int(y)] = x - float(y)
    flat = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(flat) for b in flat[i + 1:])
    again = TrainLoader(IndexDataset(N), BATCH, seed=3, num_workers=1)
    again.set_epoch(1)
    for images, labels in again:
        for x, y in zip(images, labels):
            assert torch.equal(x - float(y), draws[1, int(y)])
    other_seed = TrainLoader(IndexDataset(N), BATCH, seed=4)
    images, labels = next(iter(other_seed))
    assert not torch.equal(images[0] - float(labels[0]), draws[0, int(labels[0])])
