"""The sampling rules both backends share: order, shards, position, geometry conversion, checks."""
import json
import logging

import pytest
from torch.utils.data import DistributedSampler

from spnet_dist.data.sampling import (ShardedEvalLoader, ShardedTrainLoader, check_on_corrupt, check_rank,
                                      converted_batches_seen, corrupt_image_error, mix_seed, note_skipped,
                                      sample_seed, segment_seed, worker_seed)


@pytest.mark.parametrize("n,world,batch", [(30, 2, 4), (17, 3, 2), (24, 1, 5)])
def test_epoch_order_is_the_distributed_sampler_permutation_cut_to_whole_batches(n, world, batch):
    for epoch in (0, 3):
        shares = []
        for rank in range(world):
            shard = ShardedTrainLoader(n, batch, rank, world, seed=9)
            reference = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=9,
                                           drop_last=True)
            reference.set_epoch(epoch)
            assert len(shard) == (n // world) // batch
            assert shard.epoch_indices(epoch) == list(reference)[:len(shard) * batch]
            shares.append(shard.epoch_indices(epoch))
        flat = [i for share in shares for i in share]
        assert len(flat) == len(set(flat))  # disjoint across (global) ranks


def test_bad_indices_are_replaced_by_spares_of_the_same_rank():
    shard = ShardedTrainLoader(23, 4, rank=0, world_size=1, seed=2)  # 5 whole batches, 3 spares
    used = shard.epoch_indices(1)
    bad = {used[0], used[7]}
    replaced = shard.epoch_indices(1, bad)
    assert len(replaced) == len(used) and not bad & set(replaced)
    share = list(shard._permutation)
    spares = [i for i in share[len(used):] if i not in bad]
    assert [replaced[0], replaced[7]] == spares[:2]  # the samples past the last whole batch first
    assert [r for k, r in enumerate(replaced) if k not in (0, 7)] == [u for k, u in enumerate(used) if k not in (0, 7)]


def test_state_is_json_and_restores_exactly_in_the_same_geometry():
    loader = ShardedTrainLoader(40, 4, rank=1, world_size=2, seed=3)
    loader.epoch, loader.batches_seen, loader.skipped = 2, 3, ["/x.jpg"]
    state = json.loads(json.dumps(loader.state_dict()))
    assert state == {"epoch": 2, "batches_seen": 3, "seed": 3, "world_size": 2, "micro_batch_size": 4,
                     "dataset_size": 40, "skipped": ["/x.jpg"]}
    other = ShardedTrainLoader(40, 4, rank=1, world_size=2, seed=0)
    assert other.restore_position(state) is True
    assert (other.epoch, other.batches_seen, other.seed, other.skipped) == (2, 3, 3, ["/x.jpg"])
    assert other.epoch_indices(2) == loader.epoch_indices(2)


def test_geometry_change_converts_through_the_global_sample_count(caplog):
    assert converted_batches_seen(2, old_world=2, old_batch=3, world=3, batch=2) == 2  # 12 samples
    assert converted_batches_seen(3, old_world=4, old_batch=2, world=1, batch=5) == 4  # 24 -> 4 x 5, rounded down
    old = ShardedTrainLoader(48, 3, 0, 2, seed=4)
    old.batches_seen = 5
    new = ShardedTrainLoader(48, 2, 0, 3, seed=4)
    with caplog.at_level(logging.WARNING, logger="spnet_dist.data.sampling"):
        assert new.restore_position(old.state_dict()) is False
    assert new.batches_seen == 5 and "order is regenerated" in caplog.text  # 30 samples / (3 x 2)
    far = old.state_dict() | {"batches_seen": 1000}
    new.restore_position(far)
    assert new.batches_seen == len(new)  # never past the epoch's end


def test_position_moves_only_on_a_new_epoch():
    loader = ShardedTrainLoader(12, 4)
    loader.batches_seen = 2
    loader.set_epoch(0)
    assert loader.batches_seen == 2
    loader.finish_epoch(0)
    assert (loader.epoch, loader.batches_seen) == (1, 0)
    loader.finish_epoch(0)  # moved by set_epoch/load_state_dict meanwhile: left alone
    assert loader.epoch == 1
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        loader.set_epoch(-1)


def test_state_without_position_keys_is_refused():
    with pytest.raises(ValueError, match="lacks"):
        ShardedTrainLoader(12, 4).restore_position({"epoch": 0})


@pytest.mark.parametrize("n,world", [(2, 3), (10, 3), (11, 2)])
def test_eval_shards_are_strided_and_unpadded(n, world):
    shards = [ShardedEvalLoader(n, 3, rank, world) for rank in range(world)]
    for rank, shard in enumerate(shards):
        assert shard.indices == range(rank, n, world) and len(shard) == -(-shard.num_samples // 3)
    assert sorted(i for shard in shards for i in shard.indices) == list(range(n))


def test_argument_checks_name_what_is_wrong():
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="0 <= rank < world_size"):
            check_rank(rank, world)
    with pytest.raises(ValueError, match="data.on_corrupt"):
        check_on_corrupt("ignore")
    with pytest.raises(ValueError, match="micro_batch_size"):
        ShardedTrainLoader(10, 0)
    with pytest.raises(ValueError, match="seed"):
        ShardedTrainLoader(10, 2, seed=-1)
    with pytest.raises(ValueError, match="train set too small"):
        ShardedTrainLoader(5, 3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ShardedEvalLoader(10, 0)


def test_seeds_depend_on_every_number_that_identifies_them():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) < 2**64
    assert len({sample_seed(7, epoch, index) for epoch in range(3) for index in range(3)}) == 9
    assert len({worker_seed(7, epoch, rank) for epoch in range(3) for rank in range(3)}) == 9
    seeds = {segment_seed(7, rank, epoch, start) for rank in range(2) for epoch in range(2) for start in range(2)}
    assert len(seeds) == 8 and max(seeds) < 2**31


def test_bad_data_messages_and_bookkeeping(caplog):
    err = corrupt_image_error(["/d/a.jpg", "/d/c.jpg"], "truncated")
    assert err.paths == ["/d/a.jpg", "/d/c.jpg"] and "cannot decode /d/a.jpg: truncated" in str(err)
    assert "data.on_corrupt" in str(err) and "\n" not in str(err)
    skipped = []
    with caplog.at_level(logging.WARNING, logger="spnet_dist.data.sampling"):
        note_skipped(["/d/a.jpg", "/d/b.jpg", "/d/a.jpg"], skipped, rank=1)
        note_skipped(["/d/a.jpg"], skipped, rank=1)
    assert skipped == ["/d/a.jpg", "/d/b.jpg"] and caplog.text.count("rank 1: skipping undecodable image") == 2
    assert "skipping undecodable image /d/b.jpg" in caplog.text


def test_the_seed_function_never_changes():
    """mix_seed is part of the checkpoint format: a run resumed after an upgrade must draw the same
    crops, flips and order as before it. These values were computed once; never update them."""
    assert mix_seed(1, 2, 3) == 12137764019763327488
    assert mix_seed(0) == 5153396120588991192
    assert mix_seed(2**64 - 1, 5) == 2221673461379565525
    assert (sample_seed(7, 1, 5), worker_seed(7, 1, 0), segment_seed(7, 1, 2, 3)) == (
        14394314275142938694, 9758595369756947117, 420326103)


def test_every_seed_depends_on_the_run_seed():
    """Two runs of a seed sweep must not augment (or start their workers and DALI pipelines) alike."""
    assert sample_seed(1, 0, 0) != sample_seed(2, 0, 0)
    assert worker_seed(1, 0, 0) != worker_seed(2, 0, 0)
    assert segment_seed(1, 0, 0, 0) != segment_seed(2, 0, 0, 0)


def test_a_new_loader_starts_at_the_first_batch_and_set_epoch_moves_there():
    loader = ShardedTrainLoader(12, 4)
    assert (loader.epoch, loader.batches_seen) == (0, 0)
    loader.batches_seen = 2
    loader.set_epoch(3)
    assert (loader.epoch, loader.batches_seen) == (3, 0)


def test_the_smallest_legal_shapes_are_accepted():
    """A micro-batch of 1, and a shard of exactly one batch, are legal."""
    assert len(ShardedTrainLoader(10, 1)) == 10
    assert len(ShardedTrainLoader(8, 4, rank=1, world_size=2)) == 1
    assert len(ShardedEvalLoader(3, 1)) == 3 and ShardedEvalLoader(3, 1).skipped == []


def test_a_state_with_the_position_keys_only_restores_in_the_current_geometry():
    """States of older versions hold only POSITION_KEYS: the loader's own geometry is assumed."""
    loader = ShardedTrainLoader(40, 4, rank=1, world_size=2, seed=0)
    assert loader.restore_position({"epoch": 2, "batches_seen": 3, "seed": 5}) is True
    assert (loader.epoch, loader.batches_seen, loader.seed, loader.skipped) == (2, 3, 5, [])


def test_a_changed_data_set_is_a_geometry_change(caplog):
    """Same ranks and micro-batch, more images: the order is regenerated, not continued."""
    old = ShardedTrainLoader(40, 4, rank=0, world_size=2, seed=3)
    old.batches_seen = 2
    grown = ShardedTrainLoader(48, 4, rank=0, world_size=2, seed=3)
    with caplog.at_level(logging.WARNING, logger="spnet_dist.data.sampling"):
        assert grown.restore_position(old.state_dict()) is False
    assert "40 images -> 2 x 4 over 48" in caplog.text and grown.batches_seen == 2


def test_bad_data_messages_name_the_file():
    assert str(corrupt_image_error(["/d/a.jpg"])).startswith("cannot decode /d/a.jpg (data.on_corrupt=error")
