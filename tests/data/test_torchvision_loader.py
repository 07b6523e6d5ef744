"""The torchvision loaders: batches, shards, exact resume, world-size change, validation shards."""
import pytest
import torch

from spnet_dist.data import Loader, build_datasets, build_eval_loader, build_train_loader, num_classes_of
from spnet_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .helpers import IndexDataset, assert_same_batches, imagefolder_cfg, labels_of, take


# ----------------------------------------------------------------------------- batches

def test_batches_from_an_image_folder(image_folder):
    train_set, val_set = build_datasets(imagefolder_cfg(image_folder))
    assert num_classes_of(train_set) == 3
    train = build_train_loader(train_set, micro_batch_size=5, rank=0, world_size=1, seed=0, num_workers=0)
    evaluate = build_eval_loader(val_set, batch_size=10, rank=0, world_size=1, num_workers=0)
    assert isinstance(train, Loader) and isinstance(evaluate, Loader)

    batches = list(train)
    assert len(batches) == len(train) == 24 // 5
    images, labels = batches[0]
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (5,) and labels.dtype == torch.int64
    # ImageNet normalisation: [0, 1] pixels map into [(0 - mean) / std, (1 - mean) / std]
    low = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    assert (images >= low - 1e-5).all() and (images <= high + 1e-5).all()
    assert images.std() > 0.3  # random-noise JPEGs: clearly not a constant tensor

    eval_batches = list(evaluate)
    assert [len(y) for _, y in eval_batches] == [10, 10, 4] and len(evaluate) == 3
    assert torch.cat([y for _, y in eval_batches]).tolist() == val_set.targets


# ----------------------------------------------------------------------------- train sharding

@pytest.mark.parametrize("n,world,batch", [(20, 2, 3), (21, 2, 2), (17, 3, 2)])
def test_train_shards_are_disjoint_and_cover(n, world, batch):
    dataset = IndexDataset(n)
    seen = []
    for rank in range(world):
        loader = build_train_loader(dataset, batch, rank=rank, world_size=world, seed=5)
        labels = [i for batch_labels in labels_of(list(loader)) for i in batch_labels]
        assert len(labels) == len(loader) * batch
        assert len(loader) == (n // world) // batch  # same batch count on every rank
        seen.append(labels)
    flat = [i for labels in seen for i in labels]
    assert len(flat) == len(set(flat))  # disjoint
    # coverage: only the drop_last remainders (of the rank split and of each shard's batches) miss
    assert len(flat) == world * ((n // world) // batch) * batch
    assert len(flat) >= n - world * batch - world


def test_same_seed_same_order_and_set_epoch_reshuffles():
    dataset = IndexDataset(32)
    a = build_train_loader(dataset, 4, seed=1)
    b = build_train_loader(dataset, 4, seed=1)
    assert_same_batches(list(a), list(b))  # also the random part of every sample
    other_seed = build_train_loader(dataset, 4, seed=2)
    assert labels_of(list(other_seed)) != labels_of(list(build_train_loader(dataset, 4, seed=1)))

    loader = build_train_loader(dataset, 4, seed=1)
    loader.set_epoch(0)
    epoch0 = labels_of(list(loader))
    loader.set_epoch(1)
    epoch1 = labels_of(list(loader))
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))
    loader.set_epoch(0)
    assert labels_of(list(loader)) == epoch0


def test_epoch_advances_by_itself_and_position_is_counted():
    loader = build_train_loader(IndexDataset(12), 4, seed=0)
    assert loader.state_dict()["epoch"] == 0
    first = labels_of(list(loader))
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_seen"] == 0
    second = labels_of(list(loader))  # without set_epoch it still reshuffles
    assert first != second
    next(iter(loader))
    assert loader.state_dict()["batches_seen"] == 1
    loader.set_epoch(2)  # the current epoch: position kept (resume then set_epoch must work)
    assert loader.state_dict()["batches_seen"] == 1
    loader.set_epoch(3)
    assert loader.state_dict()["batches_seen"] == 0 and loader.state_dict()["epoch"] == 3


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("consumed", [2, 5, 11])  # mid-epoch, exactly one epoch, across a boundary
def test_resume_matches_an_uninterrupted_run(consumed):
    dataset = IndexDataset(25)  # len(loader) = 25 // 4 = 6 batches per epoch
    reference = build_train_loader(dataset, 4, seed=7)
    expected = take(reference, 15)

    interrupted = build_train_loader(dataset, 4, seed=7)
    head = take(interrupted, consumed)
    state = interrupted.state_dict()
    assert state["epoch"] == consumed // 6 and state["batches_seen"] == consumed % 6

    resumed = build_train_loader(dataset, 4, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # what the trainer's epoch loop does after a resume
    assert_same_batches(head + take(resumed, 15 - consumed), expected)


def test_resume_skips_without_loading_consumed_samples():
    class CountingDataset(IndexDataset):
        loaded = []

        def __getitem__(self, i):
            self.loaded.append(i)
            return super().__getitem__(i)

    dataset = CountingDataset(20)
    first = build_train_loader(dataset, 2, seed=3)
    take(first, 4)
    state = first.state_dict()
    CountingDataset.loaded.clear()
    resumed = build_train_loader(dataset, 2, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 10 - 4 and len(CountingDataset.loaded) == 12


def test_resume_with_image_augmentation_and_workers(image_folder):
    train_set, _ = build_datasets(imagefolder_cfg(image_folder))
    expected = take(build_train_loader(train_set, 4, seed=11, num_workers=0), 9)  # 6 per epoch
    interrupted = build_train_loader(train_set, 4, seed=11, num_workers=2)
    head = take(interrupted, 4)
    resumed = build_train_loader(train_set, 4, seed=11, num_workers=2)
    resumed.load_state_dict(interrupted.state_dict())
    # same pixels, although decoded by other worker processes than in the reference run
    assert_same_batches(head + take(resumed, 5), expected)


def test_resume_after_world_size_change_continues_the_global_order():
    dataset = IndexDataset(48)
    # 2 ranks x batch 3 consumed 2 batches each = the first 12 entries of the global permutation
    old = [build_train_loader(dataset, 3, rank=r, world_size=2, seed=4) for r in range(2)]
    consumed = {i for loader in old for labels in labels_of(take(loader, 2)) for i in labels}
    rest_old = {i for loader in old for labels in labels_of(list(loader)) for i in labels}

    new = [build_train_loader(dataset, 2, rank=r, world_size=3, seed=4) for r in range(3)]
    for loader in new:
        loader.load_state_dict(old[0].state_dict() | {"epoch": 0, "batches_seen": 2})
        assert loader.state_dict()["batches_seen"] == 2  # 12 samples / (3 ranks x 2)
    rest_new = {i for loader in new for labels in labels_of(list(loader)) for i in labels}
    assert consumed.isdisjoint(rest_new) and rest_new == rest_old


def test_too_small_for_one_batch():
    with pytest.raises(ValueError, match="micro_batch_size"):
        build_train_loader(IndexDataset(5), 3, rank=0, world_size=2)


# ----------------------------------------------------------------------------- eval sharding

@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [2, 10, 11])
def test_eval_counts_every_image_exactly_once(world, n):
    dataset = IndexDataset(n)
    seen, sizes = [], []
    for rank in range(world):
        loader = build_eval_loader(dataset, batch_size=3, rank=rank, world_size=world)
        labels = [i for batch_labels in labels_of(list(loader)) for i in batch_labels]
        assert len(labels) == loader.num_samples and loader.dataset_size == n
        assert len(loader) == -(-loader.num_samples // 3)
        seen.extend(labels)
        sizes.append(loader.num_samples)
    assert sorted(seen) == list(range(n))  # no padding, no duplicates, nothing missing
    assert max(sizes) - min(sizes) <= 1


def test_eval_state_is_trivial_and_order_fixed():
    loader = build_eval_loader(IndexDataset(7), 2, rank=1, world_size=2)
    first = labels_of(list(loader))
    loader.set_epoch(5)
    loader.load_state_dict(loader.state_dict())
    assert labels_of(list(loader)) == first == [[1, 3], [5]]
